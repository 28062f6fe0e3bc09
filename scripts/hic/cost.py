"""What a run will cost: wall time and GPU-hours per stage, projected from a pilot run.

Every rule writes a Snakemake benchmark file (``results/benchmarks/<rule>/<wildcards>.tsv`` or
``results/benchmarks/<rule>.tsv``; column ``s`` is the job's wall seconds). A per-shard stage
(files named by a five-digit shard) is turned into seconds per unit of work: per URL for
``download``, per downloaded image for the stages after it, the counts read from the pilot's
status tables (``results/images/{shard}.parquet``). A stage measured elsewhere can be given as
a throughput instead (``--rate stage=images/s`` per job). The rates are then projected to a
target URL count, shard size and success rate:

- job-hours of a stage = seconds per unit × units; a GPU stage (``resources: gpu=1`` in
  ``rules/*.smk``) holds one GPU per job, so its job-hours are GPU-hours;
- its wall time alone = rounds of ``pool`` parallel shard jobs × seconds per shard job, the pool
  being the GPUs or the CPU job slots;
- the whole run lies between the stages overlapping perfectly (each pool busy all the time)
  and the stages running one after another.

Training (``train_clip``, one job per run) is priced per sample and epoch: its pilot seconds
over the samples it trained (steps in ``results/clip/<run>/metrics.jsonl`` × its batch size),
times the target's downloaded images × ``--epochs`` × runs, spread over ``--train-gpus`` GPUs
a run (DDP, taken as scaling linearly). Other global stages (tables, stats, ...) are counted
once, as long as they took in the pilot. Per-job overhead such as model loading is spread over the
pilot's images, so a pilot with small shards overstates the per-image cost: pilot on one shard
of the real size when the bill matters. ``--speedup stage=F`` (or ``gpu=F`` for every GPU
stage) divides a stage's pilot seconds, e.g. when the pilot ran on CPU and the run will not.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

#: Stages whose unit of work is a URL; every other per-shard stage works per downloaded image.
PER_URL = frozenset({"download"})
#: Global stages priced per trained sample and epoch (one job per run).
PER_SAMPLE = frozenset({"train_clip"})
_SHARD = re.compile(r"\d{5}")
_RULE = re.compile(r"^rule\s+(\w+)\s*:", re.MULTILINE)
_NUMBER = re.compile(r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_GPU = re.compile(r"^\s+resources:\s*\n(?:\s+\w+\s*=.*\n)*?\s+gpu\s*=\s*([1-9]\d*)", re.MULTILINE)


@dataclass(frozen=True)
class Stage:
    """A rule's pilot jobs: their count, summed wall seconds and (per-shard rules) units."""

    name: str
    gpu: bool
    per_shard: bool
    jobs: int
    seconds: float
    units: int


@dataclass(frozen=True)
class Target:
    """The run to price."""

    urls: int
    shard_size: int
    success_rate: float
    gpus: int
    cpu_jobs: int
    epochs: float = 1.0  # of each training run
    train_gpus: int = 1  # GPUs per training run

    @property
    def shards(self) -> int:
        return math.ceil(self.urls / self.shard_size)


@dataclass(frozen=True)
class Projection:
    stage: str
    gpu: bool
    seconds_per_unit: float | None  # None for a global stage
    source: str  # pilot | rate | per sample | once
    job_hours: float
    wall_hours: float


def job_seconds(path: Path) -> float:
    """Mean ``s`` of a Snakemake benchmark file (one row per ``--benchmark-repeats``)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise ValueError(f"{path}: no benchmark rows")
    return sum(float(r["s"]) for r in rows) / len(rows)


def rule_blocks(rule_files: Iterable[str]) -> dict[str, str]:
    """Rule name -> its text, from the text of .smk files."""
    blocks = {}
    for text in rule_files:
        starts = [(m.start(), m.group(1)) for m in _RULE.finditer(text)] + [(len(text), "")]
        for (start, name), (end, _) in zip(starts, starts[1:], strict=False):
            blocks[name] = text[start:end]
    return blocks


def gpu_rules(blocks: Mapping[str, str]) -> set[str]:
    """Rules declaring ``resources: gpu=N`` with N > 0."""
    return {name for name, text in blocks.items() if _GPU.search(text)}


def shard_counts(status_dir: Path) -> dict[str, tuple[int, int]]:
    """shard -> (URLs, downloaded images) from the download status tables."""
    counts = {}
    for path in sorted(status_dir.glob("*.parquet")):
        if _SHARD.fullmatch(path.stem):
            status = pq.read_table(path, columns=["status"])["status"]
            counts[path.stem] = (len(status), pc.sum(pc.equal(status, "success")).as_py() or 0)
    return counts


def trained_samples(clip_dir: Path) -> dict[str, tuple[int, float]]:
    """run -> (samples trained, epochs) of the pilot's training runs: the steps logged in
    ``metrics.jsonl`` × the batch size in ``provenance.json`` (the run's params)."""
    runs = {}
    for metrics in sorted(clip_dir.glob("*/metrics.jsonl")):
        provenance = metrics.with_name("provenance.json")
        if not provenance.exists():
            continue
        settings = json.loads(provenance.read_text())["params"]["settings"]
        steps = sum(1 for line in metrics.read_text().splitlines() if line.strip())
        runs[metrics.parent.name] = (steps * settings["batch_size"], settings.get("epochs", 1))
    return runs


def pilot_stages(
    bench_dir: Path,
    counts: Mapping[str, tuple[int, int]],
    gpu: set[str],
    trained: Mapping[str, tuple[int, float]] | None = None,
) -> list[Stage]:
    """One Stage per rule with benchmark files under ``bench_dir``; a rule whose every file
    is ``<rule>/<shard>.tsv`` is per-shard, any other is global. A training rule's units are
    the samples its runs trained (``trained``: run -> (samples, epochs)), when known."""
    files: dict[str, list[Path]] = {}
    for path in sorted(bench_dir.rglob("*.tsv")):
        rule = path.relative_to(bench_dir).parts[0].removesuffix(".tsv")
        files.setdefault(rule, []).append(path)
    stages = []
    for rule, paths in files.items():
        shards = [p.stem for p in paths if _SHARD.fullmatch(p.stem) and p.parent.name == rule]
        per_shard = len(shards) == len(paths)
        units = 0
        if per_shard:
            if missing := [s for s in shards if s not in counts]:
                raise ValueError(f"{rule}: no status table for shard(s) {missing[:5]}")
            units = sum(counts[s][0 if rule in PER_URL else 1] for s in shards)
            if units == 0:
                raise ValueError(f"{rule}: its pilot shards hold no images to relate time to")
        elif rule in PER_SAMPLE and trained and all(p.stem in trained for p in paths):
            units = sum(trained[p.stem][0] for p in paths)
        seconds = sum(job_seconds(p) for p in paths)
        stages.append(Stage(rule, rule in gpu, per_shard, len(paths), seconds, units))
    return stages


def factor(stage: Stage, speedup: Mapping[str, float]) -> float:
    """The stage's own speed-up, else the ``gpu`` one for a GPU stage, else 1."""
    return speedup.get(stage.name, speedup.get("gpu", 1.0) if stage.gpu else 1.0)


def project(
    stages: Sequence[Stage],
    target: Target,
    speedup: Mapping[str, float],
    rates: Mapping[str, float],
) -> list[Projection]:
    """Job-hours and stand-alone wall hours of every stage at the target size.

    ``rates`` (units per second per job, measured elsewhere) replace the pilot's figures of
    their stages and are taken as they are, without speed-up."""
    out = []
    for stage in stages:
        pool = target.gpus if stage.gpu else target.cpu_jobs
        if not stage.per_shard and stage.units:  # training: per sample and epoch, each run
            per_unit = stage.seconds / stage.units / factor(stage, speedup)
            per_run = per_unit * target.urls * target.success_rate * target.epochs
            gpus = target.train_gpus if stage.gpu else 1
            rounds = math.ceil(stage.jobs * gpus / pool)
            out.append(
                Projection(
                    stage.name,
                    stage.gpu,
                    per_unit,
                    "per sample",
                    per_run * stage.jobs / 3600,
                    rounds * per_run / gpus / 3600,
                )
            )
            continue
        if not stage.per_shard:
            seconds = stage.seconds / factor(stage, speedup)
            wall = seconds / min(stage.jobs, pool)
            out.append(Projection(stage.name, stage.gpu, None, "once", seconds / 3600, wall / 3600))
            continue
        if stage.name in rates:
            per_unit, source = 1.0 / rates[stage.name], "rate"
        else:
            per_unit, source = stage.seconds / stage.units / factor(stage, speedup), "pilot"
        units = target.urls * (1.0 if stage.name in PER_URL else target.success_rate)
        per_job = per_unit * units / target.shards
        rounds = math.ceil(target.shards / pool)
        out.append(
            Projection(
                stage.name,
                stage.gpu,
                per_unit,
                source,
                per_unit * units / 3600,
                rounds * per_job / 3600,
            )
        )
    return out


def rate_stages(rates: Mapping[str, float], gpu: set[str]) -> list[Stage]:
    """Per-shard stages known only by a measured throughput (``project`` reads ``rates``)."""
    return [Stage(name, name in gpu, True, 0, 0.0, 0) for name in rates]


#: Projection sources of per-shard stages, which run in the GPU or CPU pool side by side.
SCALED = frozenset({"pilot", "rate"})


def totals(projections: Sequence[Projection], target: Target) -> dict[str, float]:
    """GPU-hours, CPU job-hours and the run's wall time between its two bounds."""

    def hours(gpu: bool, per_shard: bool | None = None) -> float:
        return sum(
            p.job_hours
            for p in projections
            if p.gpu == gpu and (per_shard is None or (p.source in SCALED) == per_shard)
        )

    global_wall = sum(p.wall_hours for p in projections if p.source not in SCALED)
    overlapped = max(hours(True, True) / target.gpus, hours(False, True) / target.cpu_jobs)
    return {
        "gpu_hours": hours(True),
        "cpu_job_hours": hours(False),
        "wall_hours_overlapped": overlapped + global_wall,
        "wall_hours_sequential": sum(p.wall_hours for p in projections),
    }


def _hours(h: float) -> str:
    """Hours to a useful precision; a stage of seconds reads "<0.01", not as nothing."""
    if h >= 100:
        return f"{h:,.0f}"
    if h >= 1:
        return f"{h:.1f}"
    if h >= 0.01:
        return f"{h:.2f}"
    return "<0.01"


def format_report(projections: Sequence[Projection], target: Target) -> str:
    """A markdown table of the projection and its totals."""
    lines = [
        f"{target.urls:,} URLs in {target.shards:,} shards of {target.shard_size:,}, "
        f"{target.success_rate:.0%} downloaded; {target.gpus} GPUs, {target.cpu_jobs} CPU jobs; "
        f"training {target.epochs:g} epochs on {target.train_gpus} GPU(s) a run",
        "",
        "| stage | runs on | seconds per unit | from | job-hours | wall hours |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    order = sorted(projections, key=lambda p: (p.source == "once", -p.job_hours))
    for p in order:
        unit = "URL" if p.stage in PER_URL else "sample-epoch" if p.stage in PER_SAMPLE else "image"
        per_unit = "-" if p.seconds_per_unit is None else f"{p.seconds_per_unit:.3g} / {unit}"
        lines.append(
            f"| {p.stage} | {'GPU' if p.gpu else 'CPU'} | {per_unit} | {p.source} | "
            f"{_hours(p.job_hours)} | {_hours(p.wall_hours)} |"
        )
    t = totals(projections, target)
    lines += [
        "",
        f"GPU-hours: {_hours(t['gpu_hours'])}; CPU job-hours: {_hours(t['cpu_job_hours'])}",
        f"wall hours: {_hours(t['wall_hours_overlapped'])} (stages overlapping) to "
        f"{_hours(t['wall_hours_sequential'])} (one stage after another)",
    ]
    if any(p.source == "once" for p in projections):
        lines.append(
            "'once': a global stage, as long as it took in the pilot; it does not scale with "
            "the URL count"
        )
    return "\n".join(lines)


def stage_number(item: str) -> tuple[str, float]:
    """``"caption_scene=40"`` -> ("caption_scene", 40.0): a --speedup or --rate value."""
    name, _, value = item.partition("=")
    if not re.fullmatch(r"\w+", name) or not _NUMBER.fullmatch(value) or float(value) <= 0:
        raise argparse.ArgumentTypeError(f"{item!r}: expected STAGE=NUMBER with NUMBER > 0")
    return name, float(value)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hic.cost", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, required=True, help="URLs to process")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--cpu-jobs", type=int, default=16, help="CPU jobs running at once")
    parser.add_argument("--shard-size", type=int, default=10000)
    parser.add_argument("--success-rate", type=float, help="share downloaded (default: pilot's)")
    parser.add_argument("--benchmarks", type=Path, default=Path("results/benchmarks"))
    parser.add_argument("--status", type=Path, default=Path("results/images"))
    parser.add_argument("--rules", type=Path, default=Path("rules"))
    parser.add_argument("--clip", type=Path, default=Path("results/clip"))
    parser.add_argument("--epochs", type=float, help="per training run (default: the pilot's)")
    parser.add_argument("--train-gpus", type=int, default=1, help="GPUs per training run")
    parser.add_argument(
        "--speedup", nargs="+", action="extend", type=stage_number, default=[],
        metavar="STAGE=F", help="divide a stage's pilot seconds by F (gpu=F: every GPU stage)",
    )  # fmt: skip
    parser.add_argument(
        "--rate", nargs="+", action="extend", type=stage_number, default=[],
        metavar="STAGE=N", help="a per-shard stage's measured throughput, N units/s per job",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if min(args.images, args.gpus, args.cpu_jobs, args.shard_size, args.train_gpus) < 1:
        parser.error(
            "--images, --gpus, --cpu-jobs, --shard-size and --train-gpus must be at least 1"
        )
    if args.success_rate is not None and not 0 < args.success_rate <= 1:
        parser.error("--success-rate must be in (0, 1]")
    blocks = rule_blocks(p.read_text() for p in sorted(args.rules.glob("*.smk")))
    speedup, rates = dict(args.speedup), dict(args.rate)
    if unknown := sorted((set(speedup) | set(rates)) - set(blocks) - {"gpu"}):
        parser.error(f"no rule named {unknown} in {args.rules}/*.smk")
    gpu = gpu_rules(blocks)
    counts = shard_counts(args.status) if args.status.is_dir() else {}
    trained = trained_samples(args.clip) if args.clip.is_dir() else {}
    pilot = pilot_stages(args.benchmarks, counts, gpu, trained) if args.benchmarks.is_dir() else []
    stages = [s for s in pilot if s.name not in rates] + rate_stages(rates, gpu)
    if not stages:
        parser.error(f"no benchmark files under {args.benchmarks} and no --rate given")
    urls = sum(u for u, _ in counts.values())
    success = args.success_rate or (sum(d for _, d in counts.values()) / urls if urls else 1.0)
    epochs = args.epochs or max((e for _, e in trained.values()), default=1)
    target = Target(
        args.images, args.shard_size, success, args.gpus, args.cpu_jobs, epochs, args.train_gpus
    )
    print(format_report(project(stages, target, speedup, rates), target))


if __name__ == "__main__":
    main(sys.argv[1:])
