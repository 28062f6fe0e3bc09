"""Captioning throughput: batched vs per-image generation, on the tiny Qwen2.5-VL, on CPU.

    .venv/bin/python bench/caption_scene.py [--images 48] [--batch-size 8]

Builds the tiny model (or reuses resources/models/tiny-qwen2_5_vl), writes a download-style
shard of demo-world images, and runs the real stage (caption_shard + transformers backend)
twice: batch size 1 (the baseline) and the configured batch size, with config.yaml's other
caption_scene settings. Prints images/s, the share of stage time spent outside the model's
``generate`` (tar decoding, chat template, image processing, parsing, writing; timed by the
backend's stopwatch), and the speed-up ratio last.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from hic import demo_world  # noqa: E402
from hic.caption_scene import CaptionSettings, caption_shard  # noqa: E402
from hic.download import STATUS_SCHEMA  # noqa: E402
from hic.models import ModelRef  # noqa: E402
from hic.tiny_models import build_tiny_vlm  # noqa: E402
from hic.vlm import make_backend  # noqa: E402

PROMPTS = {kind: (REPO / f"prompts/scene_{kind}.txt").read_text() for kind in ("short", "long")}


def demo_shard(folder: Path, n: int, size: tuple[int, int] = (192, 144)) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    keys = [f"{i:016x}" for i in range(n)]
    with tarfile.open(folder / "bench.tar", "w") as tar:
        for key in keys:
            buf = io.BytesIO()
            demo_world.render(demo_world.make_scene(rng, *size)).save(buf, "JPEG")
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = buf.tell()
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    rows = [{"key": k, "status": "success"} for k in keys]
    pq.write_table(pa.Table.from_pylist(rows, schema=STATUS_SCHEMA), folder / "bench.parquet")
    return folder / "bench.tar", folder / "bench.parquet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = REPO / "resources/models/tiny-qwen2_5_vl"
        if not model_dir.exists():
            model_dir = tmp / "tiny-qwen2_5_vl"
            build_tiny_vlm(model_dir, seed=0)
        tar, status = demo_shard(tmp, args.images)
        # The embedded default's settings (config.yaml), batch size aside.
        scene = yaml.safe_load((REPO / "config.yaml").read_text())["caption_scene"]
        base = CaptionSettings(**scene)
        backend = make_backend(
            "transformers",
            ModelRef(str(model_dir)),
            min_pixels=base.min_pixels,
            max_pixels=base.max_pixels,
        )
        results = {}
        for batch_size in (1, args.batch_size):
            settings = CaptionSettings(**{**base.__dict__, "batch_size": batch_size})
            backend.batch_size = batch_size  # requests per generate call, sorted by length
            out = tmp / f"scene_b{batch_size}.parquet"
            summary = caption_shard(
                tar, status, out, PROMPTS, settings, backend, {"id": str(model_dir)}
            )
            rate = args.images / summary["seconds_total"]
            results[batch_size] = rate
            print(
                f"batch size {batch_size:3d}: {rate:6.2f} images/s, "
                f"{summary['fraction_outside_model']:.1%} of stage time outside "
                f"model.generate ({summary['seconds_model']:.2f} of "
                f"{summary['seconds_total']:.2f} s; batch calls incl. prompts, image "
                f"processing and parsing {summary['seconds_batches']:.2f} s)"
            )
    print(f"ratio batched/per-image: {results[args.batch_size] / results[1]:.2f}")


if __name__ == "__main__":
    main()
