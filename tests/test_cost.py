import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hic.cost import (
    Stage,
    Target,
    gpu_rules,
    job_seconds,
    main,
    pilot_stages,
    project,
    rule_blocks,
    shard_counts,
    stage_number,
    totals,
    trained_samples,
)

REPO = Path(__file__).resolve().parents[1]
HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"

RULES = """\
rule caption:
    output:
        "x"
    threads: 2
    resources:
        gpu=1,
    script:
        "a.py"


rule pack:
    output:
        "y"
    resources:
        mem_mb=100,
    script:
        "b.py"
"""


def write_benchmark(path: Path, *seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{s}\t0:00:00\t1\t1\t1\t1\t0\t0\t0\t{s}\n" for s in seconds)
    path.write_text(HEADER + rows)


def write_status(path: Path, success: int, failed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    statuses = ["success"] * success + ["failed_to_download"] * failed
    pq.write_table(
        pa.table({"key": [str(i) for i in range(len(statuses))], "status": statuses}), path
    )


@pytest.fixture
def pilot(tmp_path):
    """Two shards of 10 URLs (8 and 6 downloaded); download, one GPU stage and a global one."""
    bench = tmp_path / "benchmarks"
    write_status(tmp_path / "images/00000.parquet", 8, 2)
    write_status(tmp_path / "images/00001.parquet", 6, 4)
    write_benchmark(bench / "download/00000.tsv", 4.0)
    write_benchmark(bench / "download/00001.tsv", 6.0)
    write_benchmark(bench / "caption/00000.tsv", 10.0, 14.0)  # two repeats: mean 12
    write_benchmark(bench / "caption/00001.tsv", 16.0)
    write_benchmark(bench / "train/hierarchical.tsv", 30.0)
    write_benchmark(bench / "tables.tsv", 2.0)
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules/a.smk").write_text(RULES)
    return tmp_path


def test_job_seconds_is_the_mean_of_the_repeats(pilot):
    assert job_seconds(pilot / "benchmarks/caption/00000.tsv") == 12.0


def test_gpu_rules_are_the_ones_asking_for_a_gpu():
    assert gpu_rules(rule_blocks([RULES])) == {"caption"}
    workflow = rule_blocks(p.read_text() for p in (REPO / "rules").glob("*.smk"))
    assert gpu_rules(workflow) == {
        "caption_scene",
        "propose_regions",
        "verify_labels",
        "caption_regions",
        "refine_regions",
        "train_clip",
        "evaluate",
    }


def test_pilot_stages_relate_seconds_to_urls_or_downloaded_images(pilot):
    counts = shard_counts(pilot / "images")
    assert counts == {"00000": (10, 8), "00001": (10, 6)}
    stages = {s.name: s for s in pilot_stages(pilot / "benchmarks", counts, {"caption"})}
    assert stages["download"] == Stage("download", False, True, 2, 10.0, 20)
    assert stages["caption"] == Stage("caption", True, True, 2, 28.0, 14)
    assert stages["train"] == Stage("train", False, False, 1, 30.0, 0)
    assert not stages["tables"].per_shard


def test_pilot_shard_without_a_status_table_is_an_error(pilot):
    write_benchmark(pilot / "benchmarks/download/00002.tsv", 1.0)
    with pytest.raises(ValueError, match="00002"):
        pilot_stages(pilot / "benchmarks", shard_counts(pilot / "images"), set())


def test_projection_scales_per_unit_seconds_and_counts_global_stages_once():
    stages = [
        Stage("download", False, True, 2, 10.0, 20),  # 0.5 s per URL
        Stage("caption", True, True, 2, 28.0, 14),  # 2 s per image
        Stage("train", True, False, 1, 3600.0, 0),
    ]
    target = Target(urls=36000, shard_size=1000, success_rate=0.5, gpus=4, cpu_jobs=12)
    got = {p.stage: p for p in project(stages, target, {"caption": 2.0}, {})}
    assert got["download"].job_hours == pytest.approx(36000 * 0.5 / 3600)  # 5 h
    assert got["download"].wall_hours == pytest.approx(3 * 1000 * 0.5 / 3600)  # 36 shards / 12
    assert got["caption"].seconds_per_unit == 1.0  # sped up 2x
    assert got["caption"].job_hours == pytest.approx(18000 / 3600)
    assert got["caption"].wall_hours == pytest.approx(9 * 500 / 3600)  # 36 shards / 4 GPUs
    assert (got["train"].job_hours, got["train"].source) == (1.0, "once")
    t = totals(list(got.values()), target)
    assert t["gpu_hours"] == pytest.approx(6.0)
    assert t["cpu_job_hours"] == pytest.approx(5.0)
    assert t["wall_hours_overlapped"] == pytest.approx(max(5 / 4, 5 / 12) + 1.0)
    assert t["wall_hours_sequential"] == pytest.approx(1500 / 3600 + 4500 / 3600 + 1.0)


def test_a_measured_rate_replaces_the_pilot_and_gpu_speedup_covers_gpu_stages():
    stages = [Stage("caption", True, True, 2, 28.0, 14), Stage("verify", True, True, 1, 7, 7)]
    target = Target(urls=100, shard_size=100, success_rate=1.0, gpus=1, cpu_jobs=1)
    got = {p.stage: p for p in project(stages, target, {"gpu": 4.0}, {"caption": 10.0})}
    assert (got["caption"].seconds_per_unit, got["caption"].source) == (0.1, "rate")
    assert got["verify"].seconds_per_unit == 0.25


def test_stage_number_parses_and_rejects():
    assert stage_number("caption_scene=40") == ("caption_scene", 40.0)
    assert stage_number("gpu=2.5e1") == ("gpu", 25.0)
    for bad in ("caption_scene", "=3", "x=0", "x=-1", "x=fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            stage_number(bad)


def test_cli_prints_the_table_and_totals(pilot, capsys):
    main(
        [
            "--images", "1000", "--gpus", "2", "--cpu-jobs", "4", "--shard-size", "100",
            "--benchmarks", str(pilot / "benchmarks"), "--status", str(pilot / "images"),
            "--rules", str(pilot / "rules"), "--speedup", "caption=2",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "1,000 URLs in 10 shards of 100, 70% downloaded; 2 GPUs, 4 CPU jobs" in out
    assert "| caption | GPU | 1 / image | pilot |" in out
    assert "| train | CPU | - | once |" in out
    assert "GPU-hours:" in out and "wall hours:" in out


def test_cli_works_from_rates_alone_and_rejects_unknown_stages(pilot, capsys):
    common = ["--images", "100", "--rules", str(pilot / "rules")]
    missing = ["--benchmarks", str(pilot / "none"), "--status", str(pilot / "none")]
    main([*common, *missing, "--rate", "caption=5"])
    assert "| caption | GPU | 0.2 / image | rate |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*common, *missing, "--rate", "captoin=5"])
    with pytest.raises(SystemExit):
        main([*common, *missing])


def test_training_is_priced_per_sample_and_epoch(pilot):
    clip = pilot / "clip/hier"
    clip.mkdir(parents=True)
    (clip / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n\n')
    (clip / "provenance.json").write_text(
        json.dumps({"params": {"settings": {"batch_size": 10, "epochs": 2}}})
    )
    write_benchmark(pilot / "benchmarks/train_clip/hier.tsv", 60.0)  # 2 s per sample
    trained = trained_samples(pilot / "clip")
    assert trained == {"hier": (30, 2)}
    counts = shard_counts(pilot / "images")
    stages = pilot_stages(pilot / "benchmarks", counts, {"train_clip"}, trained)
    stages = {s.name: s for s in stages}
    assert stages["train_clip"] == Stage("train_clip", True, False, 1, 60.0, 30)
    target = Target(1000, 100, 0.5, gpus=8, cpu_jobs=1, epochs=3, train_gpus=4)
    (got,) = project([stages["train_clip"]], target, {}, {})
    assert got.source == "per sample" and got.seconds_per_unit == 2.0
    assert got.job_hours == pytest.approx(2.0 * 500 * 3 / 3600)  # 500 images x 3 epochs
    assert got.wall_hours == pytest.approx(2.0 * 500 * 3 / 4 / 3600)  # over 4 GPUs
    # Twice the images or epochs, twice the bill: it is not counted once any more.
    doubled = Target(2000, 100, 0.5, gpus=8, cpu_jobs=1, epochs=3, train_gpus=4)
    assert project([stages["train_clip"]], doubled, {}, {})[0].job_hours == 2 * got.job_hours
