"""What the workflow's code is: the files a copy of it needs, and what each script imports.

Used by the workflow (library modules are rule inputs, so editing one re-runs its stages), by
the test that every stage's conda env provides the packages its code imports, and by the tests
and benchmarks that run the workflow in a fresh copy."""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path


def imports(script: Path) -> tuple[list[Path], set[str]]:
    """(hic modules imported directly or transitively, top-level third-party module names)."""
    package = script.parent / "hic" if script.parent.name != "hic" else script.parent
    todo, seen, external = [script], set(), set()
    while todo:
        for node in ast.walk(ast.parse(todo.pop().read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
                if node.module == "hic":  # from hic import demo_world
                    names = [f"hic.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                top, _, rest = name.partition(".")
                if top != "hic":
                    if top not in sys.stdlib_module_names:
                        external.add(top)
                    continue
                module = package / f"{rest.split('.')[0]}.py"
                if rest and module.exists() and module not in seen:
                    seen.add(module)
                    todo.append(module)
    return sorted(seen), external


#: What a copy of the workflow needs to run: no results/ or .snakemake/ of earlier runs.
WORKFLOW_FILES = (
    "Snakefile",
    "config.yaml",
    "configs",
    "rules",
    "scripts",
    "schemas",
    "envs",
    "report",
    "profiles",
    "prompts",
    "data",
)


def copy_workflow(repo: Path, dest: Path) -> Path:
    """Copy the workflow in ``repo`` to ``dest`` (created if needed); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = repo / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest
