"""Peak memory of each per-shard stage at two shard sizes: flat, not growing with the shard.

    .venv/bin/python bench/memory.py [--images 1000 10000] [--stages download ... assemble]

For each shard size, writes that many demo-world images (256x192 JPEGs, 500 distinct scenes
under new names) as files with a URL list in shard_urls' format, then runs the per-shard
stages in a chain, each stage's outputs the next one's inputs: download (img2dataset on
file:// URLs), caption_scene, propose_regions, select_regions, verify_labels,
caption_regions, refine_regions, assemble. Each stage is its own script,
``scripts/<stage>.py``, run in a fresh process as its rule runs it (a stand-in for the
``snakemake`` object gives it inputs, outputs and params); that process reads its own peak
RSS and its children's when the script returns (``peak_kib``).

The models are the tiny random ones, built here; generation is cut to 2 new tokens, the
detector gets a 3-name vocabulary (up to 4 boxes each), SAM a 2x2 point grid, and
select_regions keeps one region per image, so 10,000 images fit on 2 CPU cores (about 10
minutes on an idle machine, 27 at load 3-5; ``--images 500 5000`` halves it).
What this measures is how a stage holds a shard (streaming, part files, whole tables), not
the model. Prints stage x (peak MiB per shard size, growth per 1,000 images, ratio largest /
smallest) and the worst ratio last.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from snakemake.iocontainers import Namedlist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from hic import demo_world  # noqa: E402
from hic.codebase import imports  # noqa: E402
from hic.url_keys import url_key  # noqa: E402

STAGES = (
    "download",
    "caption_scene",
    "propose_regions",
    "select_regions",
    "verify_labels",
    "caption_regions",
    "refine_regions",
    "assemble",
)
MODELS = ("qwen2_5_vl", "owlv2", "sam")
# Stored images big enough that a stage holding a shard's decoded images would show (147 KiB
# each); the models shrink them to their own inputs, so model time does not depend on it.
WIDTH, HEIGHT = 256, 192
PIXELS = {"min_pixels": 3136, "max_pixels": 3136}  # the tiny VLM's minimum: 4 patches
TOKENS = 2


def Named(*items, **named) -> Namedlist:  # noqa: N802 - stands for Snakemake's classes
    """A Snakemake named list (input, output, params, ...): items by position and by name."""
    return Namedlist(toclone=items, fromdict=named)


def write_urls(folder: Path, n: int, scenes: int = 500) -> Path:
    """``n`` demo images under ``folder/images`` and their URL list (shard_urls' format).

    ``scenes`` distinct scenes are drawn and repeated under new names (new URLs, new keys):
    drawing 10,000 would take longer than most stages."""
    rng = np.random.default_rng(0)
    drawn = []
    for _ in range(min(n, scenes)):
        scene = demo_world.make_scene(rng, WIDTH, HEIGHT, (1, 2))
        buf = io.BytesIO()
        demo_world.render(scene).save(buf, "JPEG", quality=90)
        drawn.append((buf.getvalue(), demo_world.alt_text(scene, rng)))
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        jpeg, alt = drawn[i % len(drawn)]
        path = folder / "images" / f"{i:06d}.jpg"
        path.write_bytes(jpeg)
        url = demo_world.file_url(path)
        rows.append({"key": url_key(url), "url": url, "caption": alt})
    pq.write_table(pa.Table.from_pylist(rows), folder / "urls.parquet")
    return folder / "urls.parquet"


def model_dirs(folder: Path) -> dict[str, str]:
    """The tiny random models, built here (seconds each): a workflow run rebuilding
    resources/models while this runs cannot pull them from under a stage."""
    from hic.segment import build_tiny_sam
    from hic.tiny_models import TINY_BUILDERS

    builders = {**TINY_BUILDERS, "sam": build_tiny_sam}
    for arch in MODELS:
        builders[arch](folder / f"tiny-{arch}", seed=0)
    return {arch: str(folder / f"tiny-{arch}") for arch in MODELS}


def job(stage: str, d: Path, models: dict[str, str]) -> SimpleNamespace:
    """The ``snakemake`` object of ``stage``'s job on the shard in ``d``, as its rule builds it."""
    image = {"tar": str(d / "images.tar"), "status": str(d / "images.parquet")}
    vlm = {"id": models["qwen2_5_vl"], "revision": None}
    region_vlm = {"model": vlm, "backend": "transformers", "pixels": PIXELS}
    stages = {
        "download": (
            Named(urls=str(d / "urls.parquet")),
            Named(**image, stats=str(d / "images_stats.json")),
            Named(settings={"image_size": WIDTH, "timeout": 5, "retries": 0, "thread_count": 16}),
        ),
        "caption_scene": (
            Named(
                **image,
                short_prompt=str(REPO / "prompts/scene_short.txt"),
                long_prompt=str(REPO / "prompts/scene_long.txt"),
            ),
            Named(str(d / "scene.parquet")),
            Named(
                model=vlm,
                settings={
                    "batch_size": 16,
                    "max_new_tokens": {"short": TOKENS, "long": TOKENS},
                    **PIXELS,
                },
            ),
        ),
        "propose_regions": (
            Named(
                **image,
                scene=str(d / "scene.parquet"),
                things=str(d / "things.txt"),
                stuff=str(d / "stuff.txt"),
            ),
            Named(str(d / "proposals.parquet")),
            Named(
                detector={"id": models["owlv2"], "revision": None},
                sam={"id": models["sam"], "revision": None},
                settings={
                    "detector_threshold": 0.0,
                    "top_k": 4,
                    "batch_size": 16,
                    "points_per_side": 2,
                    "pred_iou_thresh": 0.0,
                    "stability_score_thresh": 0.0,
                },
            ),
        ),
        "select_regions": (
            Named(proposals=str(d / "proposals.parquet"), status=image["status"]),
            Named(str(d / "selected.parquet")),
            Named(settings={"max_regions": 1}),
        ),
        "verify_labels": (
            Named(
                regions=str(d / "selected.parquet"),
                **image,
                verify_prompt=str(REPO / "prompts/verify_label.txt"),
                correct_prompt=str(REPO / "prompts/correct_label.txt"),
            ),
            Named(str(d / "verified.parquet")),
            Named(**region_vlm, settings={"batch_size": 16, "max_new_tokens": TOKENS}),
        ),
        "caption_regions": (
            Named(
                regions=str(d / "verified.parquet"),
                **image,
                prompt=str(REPO / "prompts/region_caption.txt"),
            ),
            Named(str(d / "captioned.parquet")),
            Named(**region_vlm, settings={"batch_size": 16, "max_new_tokens": TOKENS}),
        ),
        "refine_regions": (
            Named(
                regions=str(d / "captioned.parquet"), prompt=str(REPO / "prompts/region_refine.txt")
            ),
            Named(str(d / "refined.parquet")),
            Named(**region_vlm, settings={"batch_size": 16, "max_new_tokens": TOKENS}),
        ),
        "assemble": (
            Named(
                status=image["status"],
                scene=str(d / "scene.parquet"),
                regions=str(d / "refined.parquet"),
            ),
            Named(release=str(d / "dataset.parquet"), summary=str(d / "summary.parquet")),
            Named(provenance={}),
        ),
    }
    inputs, outputs, params = stages[stage]
    code = [str(m) for m in imports(REPO / f"scripts/{stage}.py")[0]]  # as rules' library()
    return SimpleNamespace(
        rule=stage,
        input=Named(*inputs, **dict(inputs.items()), code=code),
        output=outputs,
        params=params,
        log=Named(str(d / f"{stage}.log")),
        wildcards=Named(shard="00000"),
        scriptdir=str(REPO / "scripts"),
    )


def run_stage(stage: str, d: Path, models: dict[str, str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of ``scripts/<stage>.py`` in a fresh process."""
    started = time.perf_counter()
    command = [sys.executable, __file__, "--job", stage, str(d), json.dumps(models)]
    proc = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    if proc.returncode:
        log = d / f"{stage}.log"  # the script sends its output there
        tail = log.read_text()[-3000:] if log.exists() else ""
        raise RuntimeError(f"{stage} failed ({proc.returncode}):\n{tail}")
    peak = json.loads((d / f"{stage}.peak.json").read_text())["kib"]
    return peak / 1024, time.perf_counter() - started


def peak_kib() -> int:
    """Peak RSS of this process since its exec, or of a child it waited for if larger.

    Not the parent's ``wait4``: Linux carries the forking process's peak into the child's
    ``ru_maxrss`` at exec, so every stage would read at least the benchmark's own size."""
    status = Path("/proc/self/status").read_text()
    own = int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)[1])
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def run_chain(d: Path, n: int, stages: list[str], models: dict[str, str]) -> dict[str, float]:
    """Peak MiB of every stage on a fresh shard of ``n`` images in ``d``."""
    write_urls(d, n)
    for kind, names in (("things", ["ball", "cube"]), ("stuff", ["sky"])):
        (d / f"{kind}.txt").write_text("\n".join(names) + "\n")
    peaks = {}
    for stage in stages:
        peak, seconds = run_stage(stage, d, models)
        peaks[stage] = peak
        print(f"{n:6d} images  {stage:16s} {peak:8.1f} MiB  {seconds:7.1f} s", flush=True)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    args = parser.parse_args()
    # A chain starts at its first stage: the stages before it must run too.
    stages = list(STAGES[: max(STAGES.index(s) for s in args.stages) + 1])
    sizes = sorted(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = model_dirs(tmp)
        peaks = {n: run_chain(tmp / str(n), n, stages, models) for n in sizes}
    print()
    print("\n".join(report(peaks, args.stages)))


def report(peaks: dict[int, dict[str, float]], stages: list[str]) -> list[str]:
    """Markdown table of peak MiB per shard size, growth per 1,000 images and the ratio of the
    largest shard's peak to the smallest's; the worst ratio last."""
    sizes = sorted(peaks)
    small, large = sizes[0], sizes[-1]
    lines = [
        f"| stage | {' | '.join(f'{n:,} images' for n in sizes)} | MiB per 1,000 images "
        f"| ratio {large:,}/{small:,} |",
        f"| --- | {' | '.join('---' for _ in sizes)} | --- | --- |",
    ]
    ratios = {stage: peaks[large][stage] / peaks[small][stage] for stage in stages}
    for stage in stages:
        growth = 1000 * (peaks[large][stage] - peaks[small][stage]) / (large - small)
        cells = " | ".join(f"{peaks[n][stage]:.0f} MiB" for n in sizes)
        lines.append(f"| {stage} | {cells} | {growth:+.1f} | {ratios[stage]:.2f} |")
    worst = max(ratios, key=ratios.get)
    lines.append(f"worst ratio {large:,}/{small:,} images: {ratios[worst]:.2f} ({worst})")
    return lines


def run_job(stage: str, d: str, models: str) -> None:
    """Child process: run ``scripts/<stage>.py`` with its ``snakemake`` object."""
    snakemake = job(stage, Path(d), json.loads(models))
    runpy.run_path(
        str(REPO / f"scripts/{stage}.py"),
        init_globals={"snakemake": snakemake},
        run_name="__main__",
    )
    Path(d, f"{stage}.peak.json").write_text(json.dumps({"kib": peak_kib()}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--job"]:
        run_job(*sys.argv[2:5])
    else:
        main()
