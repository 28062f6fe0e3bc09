"""CLIP training throughput: the project's ``train`` vs open_clip's own training loop.

    .venv/bin/python bench/train_clip.py [--images 256] [--shards 4] [--batch-size 32]
                                         [--epochs 4] [--workers 1] [--repeats 3]

Writes download-style webdataset shards of demo-world images (``<key>.jpg`` and, as the alt
text, ``<key>.txt`` = the image's long caption) and their annotations in the HIC format, then
trains the tiny long-text CLIP (``data/clip/HIC-Tiny-CLIP.json`` through ``hic.clip_model``)
twice on them, with the same batch size, steps, AdamW and cosine schedule:

- baseline: open_clip_train's ``train_one_epoch`` fed by open_clip_train's own webdataset
  loader (``get_wds_dataset``, ``--workers`` DataLoader processes). One substitution: its
  ``tarfile_to_samples_nothrow`` fails with KeyError 'fname' on webdataset >= 0.2.96, whose
  tar expander ends each shard with an empty marker dict, so it is replaced by
  ``wds.tarfile_to_samples(handler=log_and_continue)``, the reader open_clip's own source
  names beside it;
- project: ``hic.train_clip.train`` as the train_clip rule calls it, policy ``long`` (the same
  caption, joined from the annotations by key), with as many DataLoader workers.

Both are timed end to end (model creation, data, every step), alternately, ``--repeats``
times; the best run of each side counts. Prints samples/s of each, the share of step time
spent waiting for data (the project's ``data_wait`` metric; open_clip's ``data_time``), and
the ratio project / baseline last.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import webdataset as wds
from open_clip import ClipLoss
from open_clip_train import data as oc_data
from open_clip_train.scheduler import cosine_lr
from open_clip_train.train import train_one_epoch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from hic import demo_world  # noqa: E402
from hic.clip_model import create_long_clip  # noqa: E402
from hic.train_clip import TrainSettings, pair_shards, train  # noqa: E402


def write_data(folder: Path, n_images: int, n_shards: int) -> tuple[list[Path], Path, dict]:
    """(tars, reference parquet, key -> original size) of ``n_images`` demo scenes, with the
    download stage's status table beside each tar."""
    rng = np.random.default_rng(0)
    tars = [folder / f"{s:05d}.tar" for s in range(n_shards)]
    reference, sizes = [], {}
    handles = [tarfile.open(t, "w") for t in tars]
    for i in range(n_images):
        scene = demo_world.make_scene(rng, 192, 144)
        key, long = f"{i:016x}", demo_world.long_caption(scene)
        buf = io.BytesIO()
        demo_world.render(scene).save(buf, "JPEG", quality=90)
        for ext, payload in (("jpg", buf.getvalue()), ("txt", long.encode())):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            handles[i % n_shards].addfile(info, io.BytesIO(payload))
        reference.append(
            {
                "key": key,
                "url": f"bench:{i}",
                "width": 192,
                "height": 144,
                "short_caption": demo_world.short_caption(scene),
                "long_caption": long,
                "regions": demo_world.regions(scene),
                "source": "bench",
                "seed": 0,
            }
        )
        sizes[key] = (192, 144)
    for handle in handles:
        handle.close()
    for s, tar in enumerate(tars):
        mine = reference[s::n_shards]
        status = {
            "key": [r["key"] for r in mine],
            "status": ["success"] * len(mine),
            "caption": [r["long_caption"] for r in mine],
            "original_width": [192] * len(mine),
            "original_height": [144] * len(mine),
        }
        pq.write_table(pa.table(status), tar.with_suffix(".parquet"))
    ref = folder / "reference.parquet"
    pq.write_table(pa.Table.from_pylist(reference, schema=demo_world.REFERENCE_SCHEMA), ref)
    return tars, ref, sizes


@dataclass(frozen=True)
class Run:
    """One timed training run: wall seconds, steps, and the steps' data and total seconds."""

    seconds: float
    steps: int
    data_seconds: float
    step_seconds: float

    def line(self, batch_size: int) -> str:
        return (
            f"{self.steps * batch_size / self.seconds:6.1f} samples/s; waiting for data "
            f"{self.data_seconds / self.step_seconds:5.1%} of step time, "
            f"{1000 * self.data_seconds / self.steps:5.0f} ms per step"
        )


class Scalars:
    """A tb_writer stand-in: keeps the per-step scalars train_one_epoch reports."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.values.setdefault(name, []).append(value)


def run_open_clip(tars: list[Path], n_images: int, settings: TrainSettings, workers: int) -> Run:
    """open_clip_train's loop and loader; its data and batch times per step."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, train_tf, _, tokenizer = create_long_clip(
        settings.arch, pretrained=None, keep=settings.keep_positions, factor=settings.stretch,
        device=device,
    )  # fmt: skip
    args = SimpleNamespace(
        train_data="::".join(str(t) for t in tars),  # open_clip's --train-data syntax
        train_num_samples=n_images,
        train_data_upsampling_factors=None,
        dataset_resampled=False,
        seed=settings.seed,
        batch_size=settings.batch_size,
        workers=workers,
        world_size=1,
        rank=0,
        local_rank=0,
        device=device,
        precision="amp_bf16" if device == "cuda" else "fp32",
        distill=False,
        accum_freq=1,
        skip_scheduler=False,
        grad_clip_norm=None,
        horovod=False,
        log_every_n_steps=1,  # every step reaches the scalar writer
        wandb=False,
    )
    data = {"train": oc_data.get_wds_dataset(args, train_tf, True, floor=True, tokenizer=tokenizer)}
    per_epoch = data["train"].dataloader.num_batches
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    schedule = cosine_lr(optimizer, settings.lr, settings.warmup, per_epoch * settings.epochs)
    scalars = Scalars()
    for epoch in range(settings.epochs):
        train_one_epoch(
            model, data, ClipLoss(), epoch, optimizer, None, schedule, None, args, scalars
        )
    seconds = time.perf_counter() - started
    batch_times = scalars.values["train/batch_time"]
    return Run(seconds, len(batch_times), sum(scalars.values["train/data_time"]), sum(batch_times))


def run_project(tars: list[Path], ref: Path, settings: TrainSettings, out: Path, workers) -> Run:
    """hic.train_clip.train; its per-step data wait from metrics.jsonl."""
    started = time.perf_counter()
    summary = train(pair_shards(tars, [ref], aligned=False), out, settings, workers=workers)
    seconds = time.perf_counter() - started
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [settings.batch_size / m["samples_per_s"] for m in steps]
    waited = sum(m["data_wait"] * s for m, s in zip(steps, step_s, strict=True))
    return Run(seconds, summary["steps"], waited, sum(step_s))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers, each side")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each side")
    args = parser.parse_args()
    # open_clip's reader as its source suggests; the default one fails on webdataset >= 0.2.96.
    oc_data.tarfile_to_samples_nothrow = wds.tarfile_to_samples(handler=oc_data.log_and_continue)
    settings = TrainSettings(
        policy="long",
        arch="HIC-Tiny-CLIP",
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=5e-4,
        warmup=10,
    )
    runs: dict[str, list[Run]] = {"open_clip": [], "project": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tars, ref, _ = write_data(tmp, args.images, args.shards)
        for r in range(args.repeats):
            runs["open_clip"].append(run_open_clip(tars, args.images, settings, args.workers))
            project = run_project(tars, ref, settings, tmp / f"run{r}", args.workers)
            runs["project"].append(project)
            for name in runs:
                print(f"{name:9s} run {r}: {runs[name][-1].line(args.batch_size)}", flush=True)
    # Best of the repeats: on a shared machine other work only ever slows a run down.
    best = {name: min(done, key=lambda run: run.seconds / run.steps) for name, done in runs.items()}
    for name, run in best.items():
        print(f"{name:9s} best : {run.line(args.batch_size)}")
    rate = {name: run.steps / run.seconds for name, run in best.items()}
    print(f"ratio project/open_clip: {rate['project'] / rate['open_clip']:.2f}")


if __name__ == "__main__":
    main()
