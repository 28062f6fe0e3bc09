"""What the workflow's code is: the files a copy of it needs, what each script imports, and
what its code does (``code_fingerprint``).

Used by the workflow (a stage's code fingerprint is a param, so a behavioural edit re-runs it
and a comment does not), by the test that every stage's conda env provides the packages its
code imports, and by the tests and benchmarks that run the workflow in a fresh copy."""

from __future__ import annotations

import ast
import hashlib
import shutil
import sys
from pathlib import Path

#: Modules that decide how a stage runs or is recorded, not what it writes: logging,
#: provenance stamping, resource bounds, speed settings, threads, the SLURM shim and this
#: module. Editing one re-runs nothing, so their imports are not followed either.
INFRASTRUCTURE = frozenset(
    {"codebase", "duck", "provenance", "runlog", "slurm_status", "speed", "threads"}
)


def _module_file(package: Path, dotted: str) -> Path | None:
    """The file of ``hic.<dotted>`` (a module, or a subpackage's __init__), if it exists."""
    parts = dotted.split(".")
    for path in (
        package.joinpath(*parts).with_suffix(".py"),
        package.joinpath(*parts, "__init__.py"),
    ):
        if path.exists():
            return path
    return None


def imports(
    script: Path, skip: frozenset[str] = frozenset(), extra: tuple[str, ...] = ()
) -> tuple[list[Path], set[str]]:
    """(hic modules imported directly or transitively, top-level third-party module names).

    ``extra``: dotted names of hic modules used without a static import (a method module the
    run's settings select), followed like imports. Modules named in ``skip`` are neither
    listed nor followed."""
    package = script.parent / "hic" if script.parent.name != "hic" else script.parent
    todo, seen, external = [script], set(), set()
    pending = [f"hic.{name}" for name in extra]
    while todo or pending:
        names, pending = pending, []
        if todo:
            for node in ast.walk(ast.parse(todo.pop().read_text())):
                if isinstance(node, ast.Import):
                    names += [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.append(node.module)
                    if node.module.partition(".")[0] == "hic":  # from hic(.x) import module
                        names += [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            top, _, rest = name.partition(".")
            if top != "hic":
                if top not in sys.stdlib_module_names:
                    external.add(top)
                continue
            if not rest or rest.split(".")[0] in skip:
                continue
            module = _module_file(package, rest)
            if module is not None and module not in seen:
                seen.add(module)
                todo.append(module)
    return sorted(seen), external


def behaviour(source: str) -> str:
    """What Python ``source`` does, as text: its syntax tree without comments, formatting,
    docstrings or function annotations, so only an edit that can change behaviour changes it."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            node.returns = None
            for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
                arg.annotation = None
            for arg in (node.args.vararg, node.args.kwarg):
                if arg is not None:
                    arg.annotation = None
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def code_fingerprint(script: Path, extra: tuple[str, ...] = ()) -> str:
    """A hash of what ``script`` and the library modules it uses do (``behaviour``), leaving
    out ``INFRASTRUCTURE``. A rule passes it as a param: Snakemake then re-runs the stage when
    its code's behaviour changes, and not for a comment, a docstring or a touched file.
    ``extra``: modules the script loads by name (``imports``)."""
    modules, _ = imports(script, skip=INFRASTRUCTURE, extra=extra)
    digest = hashlib.sha256()
    for path in [script, *modules]:
        digest.update(f"{path.name}\0{behaviour(path.read_text())}\0".encode())
    return digest.hexdigest()[:16]


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
