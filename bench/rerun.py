"""What a finished run re-runs after edits that change nothing, and after one that does.

    .venv/bin/python bench/rerun.py [--baseline 627eb03] [--work DIR]

Runs the tiny demo workflow (the tests' configuration) to the end twice: once in a copy of
this working tree and once in a copy of the baseline commit (``git archive``; by default the
last commit before re-runs followed code behaviour, when library modules were rule inputs
and Snakemake's "code" trigger was on). Then, for each side, it asks ``snakemake --dry-run``
what would run after each scenario, restoring every file's content and modification time in
between:

- ``comment``: comments added to, and module docstrings lengthened in, every Python file
  under scripts/;
- ``touch``: every workflow file's modification time moved forward (a fresh checkout, a pull);
- ``speed``: batch sizes and the vLLM engine's memory share changed (settings both sides'
  schemas know);
- ``behaviour``: one function added to ``scripts/hic/select_regions.py`` (the expected plan:
  select_regions and everything downstream of it, nothing upstream).

Prints jobs per scenario and side; the ratio printed last is the baseline's needless jobs
(scenarios comment, touch and speed) over this tree's, "inf" when this tree plans none.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from hic import codebase  # noqa: E402

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
TINY = """
demo_world: {n_images: 36, n_benchmark_pairs: 4, width: 96, height: 72, classify_per_class: 2}
shards: {size: 16}
caption_scene: {batch_size: 2}
clip: {defaults: {epochs: 2, batch_size: 8, warmup: 2}}
"""
SPEED = """
caption_scene: {batch_size: 3, vllm: {gpu_memory_utilization: 0.8}}
verify_labels: {batch_size: 5}
caption_regions: {batch_size: 5}
refine_regions: {batch_size: 5}
"""


def run(cwd: Path, *args: str) -> str:
    proc = subprocess.run(
        [SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, env=os.environ
    )
    if proc.returncode:
        raise RuntimeError(f"snakemake {' '.join(args)} in {cwd} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def planned(cwd: Path, *configs: str) -> dict[str, int]:
    out = run(cwd, "--dry-run", "--quiet", "rules", "--configfile", *configs)
    jobs = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            jobs[parts[0]] = int(parts[1])
    return jobs


def baseline_copy(rev: str, dest: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def files(wf: Path) -> list[Path]:
    skip = {"results", ".snakemake", "resources"}
    return [p for p in wf.rglob("*") if p.is_file() and not skip & set(p.relative_to(wf).parts)]


def scenario(wf: Path, name: str) -> dict[str, int]:
    """Apply scenario ``name``, plan, then put every file back as it was (content, mtime)."""
    saved = {p: (p.read_bytes(), p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in files(wf)}
    configs = ["tiny.yaml"]
    try:
        if name == "comment":
            for p in sorted((wf / "scripts").rglob("*.py")):
                text = p.read_text()
                if text.startswith('"""'):  # a longer module docstring
                    text = '"""Edited. ' + text[3:]
                p.write_text("# edited\n" + text.replace("\n\n\ndef ", "\n\n\n# why\ndef "))
        elif name == "touch":
            later = time.time() + 10
            for p in saved:
                os.utime(p, (later, later))
        elif name == "speed":
            (wf / "speed.yaml").write_text(SPEED)
            configs.append("speed.yaml")
        elif name == "behaviour":
            module = wf / "scripts/hic/select_regions.py"
            module.write_text(module.read_text() + "\n\ndef unused():\n    return 1\n")
        return planned(wf, *configs)
    finally:
        for p, (data, atime, mtime) in saved.items():
            p.write_bytes(data)
            os.utime(p, ns=(atime, mtime))
        (wf / "speed.yaml").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="627eb03")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hic-bench-rerun"))
    args = parser.parse_args(argv)
    sides = {
        "this tree": codebase.copy_workflow(REPO, args.work / "current"),
        f"baseline {args.baseline}": baseline_copy(args.baseline, args.work / "baseline"),
    }
    results = {}
    for side, wf in sides.items():
        (wf / "tiny.yaml").write_text(TINY)
        started = time.perf_counter()
        run(wf, "--configfile", "tiny.yaml", "--cores", "2")
        print(f"{side}: full run {time.perf_counter() - started:.0f} s", flush=True)
        assert planned(wf, "tiny.yaml") == {}, f"{side}: a second run is not empty"
        results[side] = {s: scenario(wf, s) for s in ("comment", "touch", "speed", "behaviour")}
    names = list(sides)
    print(f"\n| scenario | {' | '.join(names)} |\n| --- | --- | --- |")
    for s in ("comment", "touch", "speed", "behaviour"):
        cells = [str(sum(results[n][s].values())) for n in names]
        print(f"| {s} | {' | '.join(cells)} |")
    for n in names:
        print(f"{n}, behaviour: {dict(sorted(results[n]['behaviour'].items()))}")
    needless = {n: sum(sum(results[n][s].values()) for s in ("comment", "touch", "speed"))
                for n in names}  # fmt: skip
    ratio = needless[names[1]] / needless[names[0]] if needless[names[0]] else float("inf")
    print(f"needless jobs, baseline / this tree: {needless[names[1]]} / {needless[names[0]]}"
          f" = {ratio}")  # fmt: skip


if __name__ == "__main__":
    main()
