"""DAG construction at paper scale: the workflow's dry run vs a minimal Snakefile of its shape.

    .venv/bin/python bench/dag.py [--rows 1200000 12000000] [--repeats 1] [--work DIR]

For each row count it writes a LAION-style URL list (url, caption, width, height; distinct
https URLs) and times ``snakemake --dry-run --quiet rules`` of a fresh copy of this workflow
under ``configs/paper.yaml``, with ``url_list`` pointing at that list and ``shards.count``
unset, so the shard count comes from the list's parquet footer (10k rows a shard: 120 shards
at 1.2M, 1,200 at 12M). Benchmark data and models are not needed: the paper config names them
by hub id and path, which are params, not inputs.

The baseline ("minimal") is generated from the project's own dry run on two shards: the
same rules, the same input, output, log and benchmark files per job (shard lists as
``expand``, source files as literal paths), outputs ``touch``ed, no input functions, params,
config or imports; all three dry runs must plan the same jobs per rule. "minimal+script" adds
an empty ``script:`` to each rule, to tell what Snakemake charges per script job from what the
workflow's own code costs. Also timed: an empty Snakefile, what every ``snakemake`` call costs
here before any DAG is built. Wall and CPU (user + sys) seconds are medians of ``--repeats``
alternated runs; CPU is the steadier figure on a shared machine. The ratio project/minimal at
the largest row count is printed last.
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from hic import codebase  # noqa: E402

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
SHARD = re.compile(r"(?<!\d)\d{5}(?!\d)")  # a shard name: five digits (Snakefile constraint)
FILE_KINDS = ("input", "output", "log", "benchmark")
URL_LIST_SCHEMA = pa.schema(
    [("url", pa.string()), ("caption", pa.string()), ("width", pa.int64()), ("height", pa.int64())]
)


# ---------------------------------------------------------------- inputs


def write_url_list(path: Path, rows: int, batch: int = 1_000_000) -> None:
    """A LAION-style parquet list of ``rows`` distinct https URLs, written in batches."""
    with pq.ParquetWriter(path, URL_LIST_SCHEMA) as w:
        for start in range(0, rows, batch):
            i = pa.array(range(start, min(start + batch, rows)), pa.int64())
            n = pc.cast(i, pa.string())
            host = pc.cast(pc.bit_wise_and(i, 255), pa.string())
            url = pc.binary_join_element_wise("https://img", host, ".example.com/p/", n, ".jpg", "")
            caption = pc.binary_join_element_wise("a photo, number ", n, "")
            size = pc.add(pc.bit_wise_and(i, 511), 256)
            w.write_table(pa.table({"url": url, "caption": caption, "width": size, "height": size}))


def copy_workflow(dest: Path) -> Path:
    return codebase.copy_workflow(REPO, dest)


def override(path: Path, url_list: Path, count: int | None) -> Path:
    """Config on top of configs/paper.yaml: this list, shard count fixed or from its rows."""
    count_yaml = "null" if count is None else str(count)
    path.write_text(f"url_list: ['{url_list}']\nshards: {{count: {count_yaml}}}\n")
    return path


# ---------------------------------------------------------------- running snakemake


@dataclass(frozen=True)
class Run:
    wall: float
    cpu: float  # user + sys of snakemake: less sensitive than wall to others' load
    jobs: dict[str, int]
    out: str


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def snakemake(cwd: Path, *args: str) -> Run:
    """One timed snakemake call; fails with its output when snakemake fails."""
    cpu, start = children_cpu(), time.perf_counter()
    proc = subprocess.run([SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, children_cpu() - cpu
    if proc.returncode:
        sys.exit(f"snakemake {' '.join(args)} failed in {cwd}:\n{proc.stdout}\n{proc.stderr}")
    out = proc.stdout + proc.stderr
    return Run(wall, cpu, job_counts(out), out)


def job_counts(out: str) -> dict[str, int]:
    """Rule -> jobs, from the first "Job stats" table of a dry run."""
    jobs: dict[str, int] = {}
    for line in out.split("Job stats:", 1)[-1].splitlines():
        parts = line.split()
        if parts[:1] == ["total"]:
            break
        if len(parts) == 2 and parts[1].isdigit():
            jobs[parts[0]] = int(parts[1])
    return jobs


def dry_run(cwd: Path, *args: str) -> Run:
    return snakemake(cwd, "--dry-run", "--quiet", "rules", *args)


# ---------------------------------------------------------------- the minimal Snakefile


@dataclass(frozen=True)
class Job:
    rule: str
    files: dict[str, list[str]]  # kind -> paths, in the dry run's order
    wildcards: dict[str, str]


def parse_jobs(out: str) -> list[Job]:
    """The jobs a verbose dry run prints (``rule x:`` blocks with input/output/... lines)."""
    jobs, rule, fields = [], None, {}
    for line in [*out.splitlines(), "rule end:"]:
        if m := re.fullmatch(r"(?:local)?rule (\w+):", line.strip()):
            if rule:
                wildcards = dict(w.split("=", 1) for w in split(fields.get("wildcards", "")))
                files = {k: split(fields.get(k, "")) for k in FILE_KINDS}
                jobs.append(Job(rule, files, wildcards))
            rule, fields = m.group(1), {}
        elif rule and (m := re.fullmatch(r"\s+(\w+): (.*)", line)):
            fields[m.group(1)] = m.group(2)
    return jobs


def split(field: str) -> list[str]:
    return [p for p in field.split(", ") if p]


def generalise(path: str, wildcards: dict[str, str]) -> str:
    """A job's file back to its rule's pattern: wildcard values become ``{name}``."""
    for name, value in wildcards.items():
        path = re.sub(rf"(?<![A-Za-z0-9]){re.escape(value)}(?![A-Za-z0-9])", f"{{{name}}}", path)
    return path


def rule_shape(job: Job) -> dict[str, list[tuple[str, bool]]]:
    """Kind -> (pattern, is a list over all shards). On the two-shard probe a file that takes
    every shard shows up once per shard number; a lone number (a list's name) is kept."""
    shape = {}
    for kind, paths in job.files.items():
        patterns = [generalise(p, job.wildcards) for p in paths]
        per_shard = Counter(SHARD.sub("{shard}", p) for p in patterns)
        items = []
        for p in patterns:
            every = SHARD.sub("{shard}", p)
            items.append((every, True) if per_shard[every] > 1 else (p, False))
        shape[kind] = list(dict.fromkeys(items))
    return shape


def shapes(jobs: Iterable[Job]) -> dict[str, dict[str, list[tuple[str, bool]]]]:
    """Rule -> file patterns; every job of a rule must have the same shape."""
    found: dict[str, dict] = {}
    for job in jobs:
        shape = rule_shape(job)
        if found.setdefault(job.rule, shape) != shape:
            sys.exit(f"rule {job.rule}: jobs differ in shape, a minimal Snakefile cannot copy it")
    return found


def file_item(pattern: str, every_shard: bool, kind: str) -> str:
    path = repr(pattern)
    if kind == "output":
        return (
            f"*[touch(p) for p in expand({path}, shard=SHARDS)]"
            if every_shard
            else f"touch({path})"
        )
    return f"expand({path}, shard=SHARDS)" if every_shard else path


def minimal_snakefile(rules: dict[str, dict[str, list[tuple[str, bool]]]], script: bool) -> str:
    """Rules with the project's names and files only; the shard count comes from --config.
    ``script`` adds an empty ``script:`` to every rule but ``all``, as the project's have."""
    lines = [
        "# Generated by bench/dag.py: the project's DAG shape and nothing else.",
        'SHARDS = [f"{i:05d}" for i in range(int(config["n_shards"]))]',
        "",
        'wildcard_constraints:\n    shard=r"\\d{5}",',
        "",
    ]
    # The target rule first: Snakemake's default target.
    for rule in sorted(rules, key=lambda r: r != "all"):
        lines.append(f"rule {rule}:")
        for kind, files in rules[rule].items():
            if files:
                lines.append(f"    {kind}:")
                lines += [f"        {file_item(p, every, kind)}," for p, every in files]
        if script and rule != "all":
            lines.append('    script:\n        "noop.py"')
        lines.append("")
    return "\n".join(lines)


def existing_sources(rules: dict, project: Path) -> list[str]:
    """Relative input paths that are source files (prompts, scripts/hic/...), not outputs."""
    return sorted(
        {
            p
            for shape in rules.values()
            for p, every in shape["input"]
            if not every and not Path(p).is_absolute() and (project / p).is_file()
        }
    )


def make_minimal(dest: Path, project: Path, probe: str, script: bool) -> Path:
    rules = shapes(parse_jobs(probe))
    dest.mkdir(parents=True)
    for source in existing_sources(rules, project):  # existence is what the DAG checks
        (dest / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / source, dest / source)
    (dest / "noop.py").write_text("")
    (dest / "Snakefile").write_text(minimal_snakefile(rules, script))
    return dest


# ---------------------------------------------------------------- report

SIDES = ("project", "minimal", "minimal+script")


def median_of(runs: Sequence[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


@dataclass(frozen=True)
class Result:
    rows: int
    shards: int
    jobs: int
    runs: dict[str, list[Run]]  # side -> repeats

    def wall(self, side: str) -> float:
        return median_of(self.runs[side], "wall")

    def cpu(self, side: str) -> float:
        return median_of(self.runs[side], "cpu")


def report(results: Sequence[Result], empty: Run) -> None:
    print(f"\nempty Snakefile (snakemake startup): {empty.wall:.2f} s wall, {empty.cpu:.2f} s CPU")
    print(
        "rows | shards | jobs | wall s: project, minimal, minimal+script | ratio | "
        "CPU s: project, minimal, minimal+script | ratio | project CPU ms/job"
    )
    for r in results:
        walls = ", ".join(f"{r.wall(s):.2f}" for s in SIDES)
        cpus = ", ".join(f"{r.cpu(s):.2f}" for s in SIDES)
        per_job = 1000 * (r.cpu("project") - empty.cpu) / r.jobs  # net of startup
        print(
            f"{r.rows:,} | {r.shards:,} | {r.jobs:,} | {walls} | "
            f"{r.wall('project') / r.wall('minimal'):.2f} | {cpus} | "
            f"{r.cpu('project') / r.cpu('minimal'):.2f} | {per_job:.2f}"
        )
    if len(results) > 1:
        first, last = results[0], results[-1]
        growth = (last.cpu("project") - empty.cpu) / (first.cpu("project") - empty.cpu)
        scale = last.jobs / first.jobs
        print(f"project CPU net of startup grows {growth:.1f}x for {scale:.1f}x jobs")
    last = results[-1]
    print(
        f"ratio project/minimal at {last.rows:,} rows ({last.jobs:,} jobs): "
        f"{last.wall('project') / last.wall('minimal'):.2f} wall, "
        f"{last.cpu('project') / last.cpu('minimal'):.2f} CPU"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_200_000, 12_000_000])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hic-bench-dag"))
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    project = copy_workflow(args.work / "project")
    paper = ("--configfile", "configs/paper.yaml")

    lists = {}
    for rows in args.rows:
        lists[rows] = args.work / f"urls_{rows}.parquet"
        start = time.perf_counter()
        write_url_list(lists[rows], rows)
        print(f"wrote {rows:,} URLs in {time.perf_counter() - start:.1f} s", flush=True)

    # The project's jobs on two shards, printed in full, give the minimal Snakefile its shape.
    probe_cfg = override(args.work / "probe.yaml", lists[args.rows[0]], count=2)
    probe = snakemake(project, "--dry-run", *paper, str(probe_cfg)).out
    minimal = {
        side: make_minimal(args.work / side, project, probe, script=side.endswith("script"))
        for side in SIDES[1:]
    }
    empty = args.work / "empty"
    empty.mkdir()
    (empty / "Snakefile").write_text('rule all:\n    output: touch("done")\n')
    empty_runs = [dry_run(empty) for _ in range(args.repeats)]

    results = []
    for rows in args.rows:
        cfg = override(args.work / f"paper_{rows}.yaml", lists[rows], count=None)
        runs: dict[str, list[Run]] = {side: [] for side in SIDES}
        for _ in range(args.repeats):  # alternated, so load from others hits every side alike
            runs["project"].append(dry_run(project, *paper, str(cfg)))
            jobs = runs["project"][-1].jobs
            for side, folder in minimal.items():
                runs[side].append(dry_run(folder, "--config", f"n_shards={jobs['download']}"))
                if runs[side][-1].jobs != jobs:
                    sys.exit(f"{side} plans other jobs: {runs[side][-1].jobs} vs {jobs}")
            print(
                f"{rows:,} rows: " + ", ".join(f"{s} {runs[s][-1].wall:.2f} s" for s in SIDES),
                flush=True,
            )
        results.append(Result(rows, jobs["download"], sum(jobs.values()), runs))
    report(results, Run(median_of(empty_runs, "wall"), median_of(empty_runs, "cpu"), {}, ""))


if __name__ == "__main__":
    main()
