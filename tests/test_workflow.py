"""The workflow as a user runs it: lint, config validation, dry runs and the tiny end-to-end run."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import (
    BIN,
    RANDOM_MODELS,
    REPO,
    copy_workflow,
    planned_jobs,
    random_propose_settings,
    snakemake,
)
from hic.refine_regions import contains_box_phrase

# A smaller demo world than the default, so the end-to-end run takes seconds.
TINY = (
    RANDOM_MODELS
    + random_propose_settings(batch_size=4)
    + """
demo_world: {n_images: 36, n_benchmark_pairs: 4, width: 96, height: 72, classify_per_class: 2}
shards: {size: 16}
flush_every: 1
caption_scene: {batch_size: 2}
verify_labels: {batch_size: 4}
caption_regions: {batch_size: 4}
refine_regions: {batch_size: 4}
clip:
  defaults: {epochs: 2, batch_size: 8, warmup: 2}
  # Two baselines stand for all (each method's own tests train, resume and evaluate it):
  # FLAIR's text-conditioned scoring, and LLM2CLIP's second stage built on its first.
  runs:
    flair_hierarchical: {epochs: 2}
    llm2clip_llm_hierarchical: {epochs: 1}
    llm2clip_hierarchical: {epochs: 2}
    longclip_alt_text: null
    longclip_hierarchical: null
    flair_alt_text: null
    cosmos_alt_text: null
    cosmos_hierarchical: null
    flame_alt_text: null
    flame_hierarchical: null
    llm2clip_llm_alt_text: null
    llm2clip_alt_text: null
"""
)
# The tiny run's CLIP runs that are benchmarked (LLM2CLIP's first stage is not).
EVALUATED = ["alt_text", "hierarchical", "pipeline", "flair_hierarchical", "llm2clip_hierarchical"]


def test_lint_is_clean():
    proc = snakemake(REPO, "--lint")
    assert "Congratulations" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "override, named",
    [
        ("shards: {sise: 3}\n", "sise"),  # typo of a nested key
        ("url_lsit: x.parquet\n", "url_lsit"),  # typo of a top-level key
        ("download: {timeout: soon}\n", "timeout"),  # wrong type
        ("demo_world: {classify_per_class: 0}\n", "classify_per_class"),  # out of range
        ("download: {resize_mode: center_crop}\n", "resize_mode"),  # breaks box mapping
        ("download: {resize_mode: no}\n", "resize_mode"),  # YAML reads no as false
    ],
)
def test_config_mistakes_fail_naming_the_key(workflow, override, named):
    (workflow / "bad.yaml").write_text(override)
    proc = snakemake(workflow, "--dry-run", "--configfile", "bad.yaml", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Error validating config file" in out and named in out


def test_the_default_trains_its_demo_models_and_builds_no_random_ones(workflow):
    jobs = planned_jobs(workflow)
    assert jobs["train_demo_model"] == 3  # the VLM, the detector and SAM
    # The one random model left is FLAME's frozen LLM (tiny-mistral); LLM2CLIP's tiny-llama
    # is built in its own runs.
    assert jobs["build_tiny_model"] == 1


def test_an_unknown_demo_model_is_named(workflow):
    target = "resources/models/demo-yolo"
    proc = snakemake(workflow, "--dry-run", target, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "'yolo'" in out and "owlv2" in out


def test_missing_url_list_is_explained(workflow):
    proc = snakemake(workflow, "--dry-run", "--config", "url_list=nowhere.csv", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "nowhere.csv" in out and "shards.count" in out


def test_paper_config_builds_its_dag_without_reading_the_lists(workflow):
    # shards.count is fixed there; the list only has to exist for the dry run.
    (workflow / "data/laion").mkdir(parents=True)
    pq.write_table(
        pa.table({"URL": ["http://x/1.jpg"]}), workflow / "data/laion/part-00000.parquet"
    )
    jobs = planned_jobs(workflow, "--configfile", "configs/paper.yaml")
    assert jobs["download"] == 1200 and jobs["shard_urls"] == 1 and jobs["stats"] == 1
    # clip, then five baselines (LLM2CLIP in two stages), on alt-text and on hierarchical
    # captions; every run but LLM2CLIP's first stages on 5 benchmarks.
    assert jobs["train_clip"] == 2 + 6 * 2 and jobs["evaluate"] == (2 + 5 * 2) * 5
    assert jobs["tables"] == 1
    assert "demo_world" not in jobs


def test_shard_count_follows_a_real_url_list(workflow):
    urls = [f"http://img.example/{i}.jpg" for i in range(50)]
    pq.write_table(pa.table({"URL": urls, "TEXT": ["x"] * 50}), workflow / "mine.parquet")
    jobs = planned_jobs(workflow, "--config", "url_list=mine.parquet")
    assert jobs["download"] == 1 and "demo_world" not in jobs  # default size: 10k rows a shard
    (workflow / "small.yaml").write_text("shards: {size: 20}\n")
    jobs = planned_jobs(workflow, "--config", "url_list=mine.parquet", "--configfile", "small.yaml")
    assert jobs["download"] == 3


def test_a_real_url_list_may_not_name_local_files(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    urls = ["http://img.example/0.jpg", "file:///etc/passwd", "https://img.example/1.jpg"]
    pq.write_table(pa.table({"URL": urls, "TEXT": ["x"] * 3}), wf / "mine.parquet")
    snakemake(wf, "results/urls/summary.json", "--config", "url_list=mine.parquet", "--cores", "1")
    summary = json.loads((wf / "results/urls/summary.json").read_text())
    assert summary["sharded_rows"] == 2 and summary["rejected"] == {"unsupported_scheme": 1}
    rejected = pq.read_table(wf / "results/urls/rejected.parquet").to_pylist()
    assert [r["url"] for r in rejected] == ["file:///etc/passwd"]


def test_a_touched_url_list_recrawls_nothing_and_an_edited_one_recrawls(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    listing = wf / "mine.parquet"
    urls = [f"http://127.0.0.1:9/{i}.jpg" for i in range(3)]  # refused at once: quick failures
    pq.write_table(pa.table({"URL": urls, "TEXT": ["x"] * 3}), listing)
    args = ("--config", "url_list=mine.parquet")
    snakemake(wf, "results/images/00000.parquet", *args, "--cores", "1")
    later = time.time() + 5
    os.utime(listing, (later, later))  # copied again, or touched: same content
    assert "download" not in planned_jobs(wf, *args, "--until", "download")
    # A list over 1 MB is compared by time, not content: shard_urls re-runs, download not.
    jobs = planned_jobs(wf, *args, "--until", "download", "--forcerun", "shard_urls")
    assert jobs.get("shard_urls") == 1 and "download" not in jobs
    pq.write_table(pa.table({"URL": urls[:2], "TEXT": ["x"] * 2}), listing)  # edited
    jobs = planned_jobs(wf, *args, "--until", "download")
    assert jobs["download"] == 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The whole workflow, run once on a tiny demo world."""
    wf = copy_workflow(tmp_path_factory.mktemp("tiny"))
    (wf / "tiny.yaml").write_text(TINY)
    snakemake(wf, "--configfile", "tiny.yaml", "--cores", "2")
    return wf


def test_tiny_run_downloads_every_good_url_and_accounts_for_the_rest(tiny_run):
    summary = json.loads((tiny_run / "results/urls/summary.json").read_text())
    statuses = [pq.read_table(p) for p in sorted((tiny_run / "results/images").glob("*.parquet"))]
    assert len(statuses) == summary["n_shards"] == 3
    status = pa.concat_tables(statuses).to_pylist()
    keys = [r["key"] for r in status]
    assert len(keys) == len(set(keys)) == summary["sharded_rows"]
    assert summary["input_rows"] == summary["sharded_rows"] + sum(summary["rejected"].values())
    assert summary["rejected"] == {"duplicate_url": 1, "empty_url": 1, "unsupported_scheme": 1}
    by_status = {}
    for row in status:
        by_status.setdefault(row["status"], []).append(row["error_type"])
    assert len(by_status["success"]) == 36
    assert sorted(by_status["failed_to_download"]) == ["not_found", "not_found"]
    assert sorted(by_status["failed_to_resize"]) == ["decode_error"] * 4  # html, truncated
    reference = pq.read_table(tiny_run / "results/demo/reference.parquet")
    ok = {r["key"] for r in status if r["status"] == "success"}
    assert ok == set(reference.column("key").to_pylist())  # keys join images to annotations


def test_tiny_run_writes_stats_and_plots(tiny_run):
    stats = tiny_run / "results/stats"
    md = (stats / "summary.md").read_text()
    assert "Downloaded: 36 (85.7%)" in md
    assert (stats / "download_status.png").stat().st_size > 1000
    assert (stats / "distributions.png").stat().st_size > 1000
    errors = (stats / "download_errors.csv").read_text()
    assert "decode_error,4" in errors and "not_found,2" in errors


def test_second_run_has_nothing_to_do(tiny_run):
    assert planned_jobs(tiny_run, "--configfile", "tiny.yaml") == {}


def test_changing_a_stats_parameter_reruns_stats_only(tiny_run):
    (tiny_run / "stats.yaml").write_text("stats: {histogram_bins: 7}\n")
    jobs = planned_jobs(tiny_run, "--configfile", "tiny.yaml", "stats.yaml")
    assert jobs == {"stats": 1, "all": 1}


SPEED_SETTINGS = """
flush_every: 7
caption_scene: {batch_size: 3, chunk_size: 5, vllm: {gpu_memory_utilization: 0.8}}
verify_labels: {batch_size: 5}
caption_regions: {batch_size: 5}
refine_regions: {batch_size: 5}
propose_regions: {settings: {batch_size: 3}}
download: {thread_count: 3}
clip: {defaults: {checkpoint_every: 3}}
"""


def test_changing_speed_settings_reruns_nothing(tiny_run):
    (tiny_run / "speed.yaml").write_text(SPEED_SETTINGS)
    assert planned_jobs(tiny_run, "--configfile", "tiny.yaml", "speed.yaml") == {}


def workflow_files(wf: Path) -> list[Path]:
    return [
        p
        for p in wf.rglob("*")
        if p.is_file()
        # what a checkout writes: not results, nor models the workflow built under resources/
        and not {"results", ".snakemake", "resources"} & {part for part in p.relative_to(wf).parts}
    ]


def test_touching_every_workflow_file_reruns_nothing(tiny_run):
    """What a fresh checkout or `git pull` does to the files it writes."""
    later = time.time() + 5
    for path in workflow_files(tiny_run):
        os.utime(path, (later, later))
    assert planned_jobs(tiny_run, "--configfile", "tiny.yaml") == {}


def comment_and_document(source: str) -> str:
    """``source`` with a longer module docstring and comments added: the same behaviour."""
    if source.startswith('"""'):
        source = '"""Edited. ' + source[3:]
    return "# edited\n" + source.replace("\n\n\ndef ", "\n\n\n# why\ndef ") + "# end\n"


def test_comments_and_docstrings_in_every_module_rerun_nothing(tiny_run):
    code = sorted((tiny_run / "scripts").rglob("*.py"))
    before = {path: path.read_text() for path in code}
    for path, text in before.items():
        path.write_text(comment_and_document(text))
    try:
        assert planned_jobs(tiny_run, "--configfile", "tiny.yaml") == {}
    finally:
        for path, text in before.items():
            path.write_text(text)


def test_editing_logging_reruns_nothing(tiny_run):
    runlog = tiny_run / "scripts/hic/runlog.py"
    text = runlog.read_text()
    runlog.write_text(text + "\nLOG_EDITED = True\n")
    try:
        assert planned_jobs(tiny_run, "--configfile", "tiny.yaml") == {}
    finally:
        runlog.write_text(text)


PER_SHARD_AFTER_SCENE = [
    "propose_regions",
    "select_regions",
    "verify_labels",
    "caption_regions",
    "refine_regions",
    "assemble",
]
# The pipeline's dataset feeds one of the three CLIP runs (2 benchmarks each).
GLOBAL_AFTER_REGIONS = {
    "dataset_stats": 1,
    "dataset_card": 1,
    "train_clip": 1,
    "evaluate": 2,
    "tables": 1,
    "all": 1,
}


def test_editing_a_library_function_reruns_its_stages_and_downstream_only(tiny_run):
    select = tiny_run / "scripts/hic/select_regions.py"
    text = select.read_text()
    select.write_text(text + "\n\ndef unused():\n    return 1\n")
    try:
        jobs = planned_jobs(tiny_run, "--configfile", "tiny.yaml")
        assert jobs == {**dict.fromkeys(PER_SHARD_AFTER_SCENE[1:], 3), **GLOBAL_AFTER_REGIONS}
    finally:
        select.write_text(text)


def test_editing_shard_urls_code_reshards_without_recrawling(tiny_run):
    module = tiny_run / "scripts/hic/shard_urls.py"
    text = module.read_text()
    module.write_text(text + "\n\nRESHARDED = True\n")
    try:
        jobs = planned_jobs(tiny_run, "--configfile", "tiny.yaml")
        assert jobs["shard_urls"] == 1 and "download" not in jobs
        assert not {"caption_scene", "assemble", "train_clip"} & set(jobs)
    finally:
        module.write_text(text)


def test_changing_a_download_setting_reruns_download_and_downstream(tiny_run):
    (tiny_run / "dl.yaml").write_text("download: {timeout: 7}\n")
    jobs = planned_jobs(tiny_run, "--configfile", "tiny.yaml", "dl.yaml")
    per_shard = ["download", "caption_scene", *PER_SHARD_AFTER_SCENE]
    assert jobs == {
        **dict.fromkeys(per_shard, 3),
        "stats": 1,
        **GLOBAL_AFTER_REGIONS,
        "train_clip": 6,  # every run: each reads the download tars
        "evaluate": 2 * len(EVALUATED),
    }


def test_changing_a_training_parameter_reruns_training_evaluation_and_tables(tiny_run):
    (tiny_run / "lr.yaml").write_text("clip: {defaults: {lr: 0.001}}\n")
    jobs = planned_jobs(tiny_run, "--configfile", "tiny.yaml", "lr.yaml")
    # Not LLM2CLIP's first stage, which sets its own learning rate (and whose model, an input
    # of the second stage, is then not rewritten).
    assert jobs == {"train_clip": 5, "evaluate": 2 * len(EVALUATED), "tables": 1, "all": 1}


def test_changing_a_selection_setting_reruns_from_selection_on(tiny_run):
    (tiny_run / "sel.yaml").write_text("select_regions: {max_regions: 2}\n")
    jobs = planned_jobs(tiny_run, "--configfile", "tiny.yaml", "sel.yaml")
    assert jobs == {**dict.fromkeys(PER_SHARD_AFTER_SCENE[1:], 3), **GLOBAL_AFTER_REGIONS}


def test_tiny_run_captions_every_downloaded_image(tiny_run):
    for status_file in sorted((tiny_run / "results/images").glob("*.parquet")):
        status = pq.read_table(status_file).to_pylist()
        scene = pq.read_table(tiny_run / "results/scene" / status_file.name).to_pylist()
        assert [r["key"] for r in scene] == [r["key"] for r in status]
        for down, cap in zip(status, scene, strict=True):
            if down["status"] == "success":
                assert cap["status"] in ("ok", "unparsed", "truncated", "repetitive")
                assert cap["seconds"] > 0
                assert cap["model_id"] == "resources/models/tiny-qwen2_5_vl"
            else:
                assert cap["status"] == "failed" and cap["reason"].startswith("not downloaded")


def test_tiny_run_trains_evaluates_and_tables_every_run(tiny_run):
    for run in EVALUATED:
        steps = [
            json.loads(line)
            for line in (tiny_run / f"results/clip/{run}/metrics.jsonl").read_text().splitlines()
        ]
        assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
        assert {s["epoch"] for s in steps} == {0, 1}  # two epochs, equally long
        for name, task in [("demo", "retrieval"), ("demo_classify", "classification")]:
            result = json.loads((tiny_run / f"results/eval/{run}/{name}.json").read_text())
            assert result["task"] == task and result["model"]["epochs"] == 2
            assert result["protocol"]["method"] == result["model"]["method"]
    assert not (tiny_run / "results/eval/llm2clip_llm_hierarchical").exists()
    hierarchical = (tiny_run / "results/clip/hierarchical/metrics.jsonl").read_text()
    assert len(hierarchical.splitlines()) == 2 * (36 // 8)  # every reference image is used
    assert result["n"] == 18 * 2  # classification images: 18 classes x 2
    table = (tiny_run / "results/tables/retrieval.md").read_text()
    for method, data in [
        ("clip", "alt-text"),
        ("clip", "HIC captions (reference)"),
        ("clip", "HIC captions (this pipeline)"),
        ("flair", "HIC captions (reference)"),
        ("llm2clip", "HIC captions (reference)"),
        ("llm2clip", "(published)"),  # from data/reference_results.csv
    ]:
        assert any(f"| {method} " in line and data in line for line in table.splitlines()), data
    assert "urban1k I→T" in table  # the paper's benchmark, with published numbers only
    assert "I→T" in table and (tiny_run / "results/tables/retrieval.tex").exists()


def test_html_report(tiny_run):
    snakemake(tiny_run, "--configfile", "tiny.yaml", "--report", "report.html")
    html = (tiny_run / "report.html").read_text(errors="replace")
    for name in ["download_status.png", "summary.md", "dataset.png", "README.md", "retrieval.md"]:
        assert name in html


def test_tiny_run_writes_the_release_with_a_status_for_every_region(tiny_run):
    release = pa.concat_tables(
        [pq.read_table(p) for p in sorted((tiny_run / "results/dataset").glob("*.parquet"))]
    ).to_pylist()
    status = pa.concat_tables(
        [pq.read_table(p) for p in sorted((tiny_run / "results/images").glob("*.parquet"))]
    ).to_pylist()
    assert [r["key"] for r in release] == [r["key"] for r in status if r["status"] == "success"]
    regions = [g for r in release for g in r["regions"]]
    assert regions, "the tiny models should still yield some regions"
    for g in regions:
        assert g["label_source"] in ("accurate", "corrected", "unparsed")
        assert g["caption_source"] in ("llm", "fallback", "failed")
        assert (g["caption"] is None) == (g["caption_source"] == "failed")
        # no box phrase, in any Unicode spelling (contains_box_phrase normalises first)
        assert g["caption"] is None or contains_box_phrase(g["caption"]) is None, g["caption"]
    for r in release:  # an image without regions says why, and only such an image
        assert (r["regions_note"] is None) == bool(r["regions"])
        assert r["regions_note"] in (None, "no proposal", "none selected")
    card = (tiny_run / "results/dataset/README.md").read_text()
    assert "data_files" in card and f"Images: {len(release)}" in card
    summary = json.loads((tiny_run / "results/stats/dataset_summary.json").read_text())
    assert summary["images"] == len(release) and summary["regions"] == len(regions)
    figures = summary["against_reference"]
    assert set(figures["regions"]) == {"all", "foreground", "background"}
    assert figures["images"] > 0
    assert 0 <= figures["scene_captions"]["ok_share"] <= 1
    assert set(summary["stage_status"]) == {
        "caption_scene",
        "propose_select_regions",
        "verify_labels",
        "refine_regions",
    }
    assert summary["stage_status"]["caption_scene"]["rows"] == len(release)
    assert "## Measured against the reference annotations" in card


REGION_STEPS = ["proposals", "selected", "verified", "captioned", "refined"]
# Stages that flush parts, and where: the run is killed once in each after a part is written.
# Not refine_regions: the tiny random VLM's region captions almost never parse, so it has at
# most one LLM batch a shard and nothing to kill inside (tests/test_refine_regions.py kills it).
RESUMABLE = {
    "caption_scene": "scene",
    "propose_regions": "regions/proposals",
    "verify_labels": "regions/verified",
    "caption_regions": "regions/captioned",
}


def kill_midway(wf: Path, after: str, timeout: float = 900) -> None:
    """Start the tiny run in ``wf`` and SIGKILL snakemake and every job it started as soon as
    a file matching ``after`` exists."""
    with open(wf / "killed_run.log", "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "snakemake"), "--configfile", "tiny.yaml", "--cores", "2"],
            cwd=wf,
            stdout=log,
            stderr=subprocess.STDOUT,
            # A job waits 1 s after each flush, so the kill lands inside it (hic.parts).
            env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HIC_FLUSH_PAUSE": "1"},
            start_new_session=True,  # its own process group: the kill reaches every job
        )
        deadline = time.monotonic() + timeout
        while not list(wf.glob(after)):
            assert proc.poll() is None, (
                "the run ended before the kill:\n" + (wf / "killed_run.log").read_text()
            )
            assert time.monotonic() < deadline, f"no {after} after {timeout} s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def planned_outputs(wf: Path, *args: str) -> set[Path]:
    out = snakemake(wf, "--dry-run", "--configfile", "tiny.yaml", *args).stdout
    return {
        wf / path.strip()
        for line in out.splitlines()
        if line.strip().startswith("output:")
        for path in line.split(":", 1)[1].split(",")
    }


def mtimes(wf: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (wf / "results").rglob("*") if p.is_file()}


def release_rows(wf: Path) -> list[dict]:
    files = sorted((wf / "results/dataset").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in files]).to_pylist()


def test_a_killed_run_resumes_to_the_same_results_in_another_folder(tiny_run, tmp_path_factory):
    """SIGKILL inside the stages that flush parts, unlock, run again: finished jobs stay,
    restarted ones resume from their parts, and the dataset and every metric equal those of
    the uninterrupted run in another folder (CPU runs are deterministic)."""
    wf = copy_workflow(tmp_path_factory.mktemp("killed"))
    (wf / "tiny.yaml").write_text(TINY)
    # Killed inside each stage that flushes parts, once a shard has flushed a part there.
    for folder in RESUMABLE.values():
        kill_midway(wf, f"results/{folder}/*.parquet.parts/part-*.parquet")
        snakemake(wf, "--unlock")  # a killed run leaves its lock behind
    planned = planned_outputs(wf)
    assert planned and (wf / "results/urls/summary.json") not in planned
    before = mtimes(wf)
    snakemake(wf, "--configfile", "tiny.yaml", "--cores", "2")
    after = mtimes(wf)
    kept = (planned_outputs(wf, "--forceall") - planned) & set(before)
    assert kept, "some shard outputs were finished before the kill"
    assert {p for p in kept if after.get(p) != before[p]} == set()  # finished work not redone
    for stage in RESUMABLE:  # a restarted job of each took up its flushed rows
        logs = [p.read_text() for p in (wf / "results/logs" / stage).glob("*.log")]
        resumed = r"resuming from \d+ parts: [1-9]\d* units \([1-9]\d* rows\)"
        assert any(re.search(resumed, log) for log in logs), (stage, logs)

    assert release_rows(wf) == release_rows(tiny_run)
    stages = ["urls", "images", *(f"regions/{s}" for s in REGION_STEPS)]
    deterministic = [*stages, "dataset", "dataset_summary"]
    for name in deterministic:  # CPU stages: byte-identical files (tars, tables, provenance)
        for path in sorted(p for p in (tiny_run / "results" / name).iterdir() if p.is_file()):
            relative = path.relative_to(tiny_run)
            assert (wf / relative).read_bytes() == path.read_bytes(), relative
    for path in sorted((tiny_run / "results/scene").glob("*.parquet")):  # all but timings
        columns = [c for c in pq.read_schema(path).names if c != "seconds"]
        relative = path.relative_to(tiny_run)
        assert pq.read_table(wf / relative, columns=columns) == pq.read_table(path, columns=columns)
    for path in sorted((tiny_run / "results/eval").rglob("*.json")):
        assert json.loads((wf / path.relative_to(tiny_run)).read_text()) == json.loads(
            path.read_text()
        )
    for run in [*EVALUATED, "llm2clip_llm_hierarchical"]:
        metrics = f"results/clip/{run}/metrics.jsonl"
        assert training_curve(wf / metrics) == training_curve(tiny_run / metrics)


def training_curve(path: Path) -> list[tuple]:
    """(step, epoch, loss, lr) of every step; throughput and data wait are timings."""
    steps = [json.loads(line) for line in path.read_text().splitlines()]
    return [(s["step"], s["epoch"], s["loss"], s["lr"]) for s in steps]


def test_editing_the_refine_prompt_reruns_refinement_and_downstream_only(tiny_run):
    prompt = tiny_run / "prompts/region_refine.txt"
    original = prompt.read_text()
    prompt.write_text(original + "\nKeep British spelling.\n")
    jobs = planned_jobs(tiny_run, "--configfile", "tiny.yaml")
    assert jobs == {"refine_regions": 3, "assemble": 3, **GLOBAL_AFTER_REGIONS}


def test_editing_a_caption_prompt_reruns_captioning_and_downstream_only(tiny_run):
    # Last in this module: it leaves the prompts edited.
    prompt = tiny_run / "prompts/scene_long.txt"
    prompt.write_text(prompt.read_text() + "Mention the weather.\n")
    jobs = planned_jobs(tiny_run, "--configfile", "tiny.yaml")
    per_shard = ["caption_scene", *PER_SHARD_AFTER_SCENE]
    assert jobs == {**dict.fromkeys(per_shard, 3), **GLOBAL_AFTER_REGIONS}


def test_editing_caption_text_checks_reruns_no_download(tiny_run):
    text = tiny_run / "scripts/hic/text.py"  # imported by every caption stage, not by download
    text.write_text(text.read_text().replace("0.6 * visible", "0.5 * visible"))
    after = planned_jobs(tiny_run, "--configfile", "tiny.yaml")
    assert after["caption_scene"] == 3 and after["refine_regions"] == 3
    assert not {"shard_urls", "download", "demo_world", "stats"} & set(after)
