"""VLM request shape and batching: what the backends are handed, against the previous stage.

    .venv/bin/python bench/vlm_requests.py vllm [--images 10000]
    .venv/bin/python bench/vlm_requests.py sort [--images 48] [--batch-size 8] [--max-pixels N]

``vllm``: the real stage (``caption_shard`` + ``VllmBackend``) on a download shard of
``--images`` small images, with a stand-in ``vllm`` module (vLLM needs a GPU and its own
environment) that answers at once and counts the requests of every engine call. Baseline: the
same run through the stage as it was at commit 627eb03 (batches of ``batch_size: 16``, one
call per prompt), extracted from git into a temporary folder. Prints calls and requests per
call of each, then the ratio of requests per call last.

``sort``: the transformers backend on the tiny Qwen2.5-VL on CPU, over the requests of one
chunk (both prompts of ``--images`` demo images of mixed sizes, config.yaml's token limits):
length-sorted batches (``generate_texts``) against the baseline of batches in arrival order,
one prompt kind at a time (the previous stage's shape), same batch size. Prints seconds of
each and the padded work of their ``generate`` calls (prompt positions and decoding slots,
deterministic where seconds on a shared machine are not), then the ratio of seconds last.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BASELINE_COMMIT = "627eb03"

# Run in a subprocess per stage version: puts a stand-in vllm module in front of the stage.
DRIVER = r"""
import json, sys, types
from pathlib import Path

calls = []

class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

class LLM:
    def __init__(self, **kwargs):
        pass

    def generate(self, requests, params, use_tqdm=True):
        calls.append(len(requests))
        text = "A small picture of a test pattern with plain colours and no objects in it."
        out = types.SimpleNamespace(text=text, finish_reason="stop", logprobs=None)
        return [types.SimpleNamespace(outputs=[out]) for _ in requests]

vllm = types.ModuleType("vllm")
vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
sys.modules["vllm"] = vllm
import importlib.util
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: object() if name == "vllm" else real(name, *a)

from hic.caption_scene import CaptionSettings, caption_shard
from hic.models import ModelRef
from hic.vlm import make_backend

tar, status, out, model, settings = sys.argv[1:6]
settings = CaptionSettings(**json.loads(settings))
backend = make_backend("vllm", ModelRef(model), min_pixels=3136, max_pixels=802816)
prompts = {"short": "Describe briefly.", "long": "Describe in detail."}
paths = Path(tar), Path(status), Path(out)
summary = caption_shard(*paths, prompts, settings, backend, {"id": model})
print(json.dumps({"calls": calls, "status": summary["status"]}))
"""


def small_shard(folder: Path, n: int) -> tuple[Path, Path]:
    """n small JPEGs in a download tar, with their status table."""
    sys.path.insert(0, str(REPO / "scripts"))
    from hic.download import STATUS_SCHEMA

    keys = [f"{i:016x}" for i in range(n)]
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 140, 200)).save(buf, "JPEG")
    data = buf.getvalue()
    with tarfile.open(folder / "shard.tar", "w") as tar:
        for key in keys:
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows = [{"key": k, "status": "success"} for k in keys]
    pq.write_table(pa.Table.from_pylist(rows, schema=STATUS_SCHEMA), folder / "shard.parquet")
    return folder / "shard.tar", folder / "shard.parquet"


def run_stage(scripts: Path, tmp: Path, name: str, shard, model: Path, settings: dict) -> dict:
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    out = tmp / f"{name}.parquet"
    args = [sys.executable, str(driver), *map(str, shard), str(out), str(model)]
    started = time.perf_counter()
    result = subprocess.run(
        [*args, json.dumps(settings)],
        env={"PYTHONPATH": str(scripts), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["seconds"] = time.perf_counter() - started
    return report


def bench_vllm(args) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from hic.tiny_models import build_tiny_vlm

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "tiny-qwen2_5_vl"  # its chat template renders the prompts
        build_tiny_vlm(model, seed=0)
        shard = small_shard(tmp, args.images)
        old = tmp / "old"
        old.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", BASELINE_COMMIT, "scripts/hic"],
            capture_output=True,
            check=True,
        ).stdout
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(old, filter="data")
        paper = yaml.safe_load((REPO / "configs/paper.yaml").read_text())["caption_scene"]
        runs = {
            f"previous stage ({BASELINE_COMMIT}, batch_size 16)": run_stage(
                old / "scripts", tmp, "old", shard, model, {"batch_size": 16, "flush_every": 8}
            ),
            f"this stage (chunk_size {paper['chunk_size']})": run_stage(
                REPO / "scripts", tmp, "new", shard, model, {"chunk_size": paper["chunk_size"]}
            ),
        }
    per_call = {}
    for name, report in runs.items():
        calls = report["calls"]
        per_call[name] = sum(calls) / len(calls)
        print(
            f"{name}: {len(calls)} engine calls for {args.images} images, "
            f"{per_call[name]:.0f} requests per call (largest {max(calls)}), "
            f"statuses {report['status']}, {report['seconds']:.1f} s with the stand-in engine"
        )
    old, new = per_call.values()
    print(f"ratio requests per call, this/previous: {new / old:.0f}")


def bench_sort(args) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    sys.path.insert(0, str(REPO / "bench"))
    from caption_scene import PROMPTS

    from hic import demo_world
    from hic.models import ModelRef, generate_texts
    from hic.tiny_models import build_tiny_vlm
    from hic.vlm import make_backend

    scene = yaml.safe_load((REPO / "config.yaml").read_text())["caption_scene"]
    limits = {"short": 24, "long": 96} | scene.get("max_new_tokens", {})
    rng = np.random.default_rng(0)
    # LAION-like mixed sizes: 64 to 448 px a side, so visual tokens range from 4 to 64.
    images = [
        demo_world.render(demo_world.make_scene(rng, int(w), int(h)))
        for w, h in rng.integers(64, 449, size=(args.images, 2))
    ]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny-qwen2_5_vl"
        build_tiny_vlm(model, seed=0)
        backend = make_backend(
            "transformers",
            ModelRef(str(model)),
            min_pixels=3136,
            max_pixels=args.max_pixels,
            batch_size=args.batch_size,
        )
        m, p = backend.model, backend.processor
        reqs = [(im, kind) for im in images for kind in ("short", "long")]
        # The work each generate call pads to: rows x (longest prompt) to prefill, rows x
        # (steps until its last row ends) to decode. Deterministic, unlike seconds here.
        shapes: list[tuple[int, int, int]] = []
        generate = m.generate

        def counted(**inputs):
            output = generate(**inputs)
            rows, prompt = inputs["input_ids"].shape
            shapes.append((rows, prompt, output.shape[1] - prompt))
            return output

        m.generate = counted

        def arrival_order():
            for kind in ("short", "long"):
                mine = [im for im, k in reqs if k == kind]
                for start in range(0, len(mine), args.batch_size):
                    part = mine[start : start + args.batch_size]
                    generate_texts(
                        m, p, part, [PROMPTS[kind]] * len(part), max_new_tokens=limits[kind]
                    )

        def sorted_batches():
            generate_texts(
                m,
                p,
                [im for im, _ in reqs],
                [PROMPTS[k] for _, k in reqs],
                max_new_tokens=[limits[k] for _, k in reqs],
                batch_size=args.batch_size,
            )

        runs = {"arrival order": arrival_order, "sorted by length": sorted_batches}
        seconds, work = dict.fromkeys(runs, math.inf), {}
        for _ in range(args.repeats):  # alternated, best of each: the machine is shared
            for name, run in runs.items():
                shapes.clear()
                started = time.perf_counter()
                run()
                seconds[name] = min(seconds[name], time.perf_counter() - started)
                work[name] = (sum(r * n for r, n, _ in shapes), sum(r * n for r, _, n in shapes))
        for name in runs:
            print(
                f"{name}: {len(reqs)} requests in batches of {args.batch_size}, best of "
                f"{args.repeats}: {seconds[name]:.2f} s ({len(reqs) / seconds[name]:.1f} "
                f"requests/s); padded work: {work[name][0]} prompt positions, "
                f"{work[name][1]} decoding slots"
            )
    ratio = seconds["arrival order"] / seconds["sorted by length"]
    print(f"ratio arrival-order/sorted seconds: {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["vllm", "sort"])
    parser.add_argument("--images", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    # 448 x 448 px: up to 256 visual tokens, so image size sets much of a prompt's length.
    parser.add_argument("--max-pixels", type=int, default=448 * 448)
    args = parser.parse_args()
    if args.what == "vllm":
        args.images = args.images or 10000
        bench_vllm(args)
    else:
        args.images = args.images or 48
        bench_sort(args)


if __name__ == "__main__":
    main()
