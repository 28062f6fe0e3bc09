"""A stage's code fingerprint follows what its code does, not how the files look."""

from pathlib import Path

import pytest

from hic.codebase import behaviour, code_fingerprint

MODULE = '''"""A module."""

from __future__ import annotations


def f(x: int) -> int:
    """Double it."""
    return 2 * x  # why
'''


@pytest.mark.parametrize(
    "edit",
    [
        MODULE + "\n# a trailing comment\n",
        MODULE.replace('"""Double it."""', '"""Twice x, documented at length."""'),
        MODULE.replace('"""A module."""', '"""Another docstring."""'),
        MODULE.replace("def f(x: int) -> int:", "def f(\n    x: float,\n) -> float:"),
        MODULE.replace("return 2 * x  # why", "return (2 *\n            x)"),
    ],
    ids=["comment", "docstring", "module-docstring", "annotations", "formatting"],
)
def test_edits_that_cannot_change_behaviour_keep_it(edit):
    assert behaviour(edit) == behaviour(MODULE)


@pytest.mark.parametrize(
    "edit",
    [
        MODULE.replace("2 * x", "3 * x"),
        MODULE.replace("(x: int)", "(x: int = 1)"),
        MODULE + "\nLIMIT = 4\n",
        MODULE.replace('"""Double it."""\n', '"""Double it."""\n    print("x")\n'),
    ],
    ids=["expression", "default", "new-constant", "new-statement"],
)
def test_edits_that_can_change_behaviour_change_it(edit):
    assert behaviour(edit) != behaviour(MODULE)


def make_scripts(root: Path) -> Path:
    """A script importing hic.a (which imports hic.b) and the logging module hic.runlog."""
    (root / "hic").mkdir(parents=True)
    (root / "hic/a.py").write_text("from hic.b import g\n\n\ndef f():\n    return g()\n")
    (root / "hic/b.py").write_text("def g():\n    return 1\n")
    (root / "hic/c.py").write_text("def h():\n    return 2\n")
    (root / "hic/runlog.py").write_text("FORMAT = '%(message)s'\n")
    script = root / "stage.py"
    script.write_text("from hic.a import f\nfrom hic.runlog import FORMAT\n\nprint(f(), FORMAT)\n")
    return script


def test_fingerprint_follows_the_modules_a_script_uses(tmp_path):
    script = make_scripts(tmp_path)
    before = code_fingerprint(script)
    (tmp_path / "hic/c.py").write_text("def h():\n    return 3\n")  # not imported
    (tmp_path / "hic/b.py").write_text("def g():\n    return 1  # noted\n")  # a comment
    (tmp_path / "hic/runlog.py").write_text("FORMAT = '%(asctime)s %(message)s'\n")  # logging
    assert code_fingerprint(script) == before
    (tmp_path / "hic/b.py").write_text("def g():\n    return 2\n")  # imported through hic.a
    assert code_fingerprint(script) != before


def test_fingerprint_of_every_stage_script_is_computed(tmp_path):
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    prints = {p.stem: code_fingerprint(p) for p in sorted(scripts.glob("*.py"))}
    assert all(len(v) == 16 for v in prints.values())
    assert len(set(prints.values())) == len(prints)  # every stage has code of its own
