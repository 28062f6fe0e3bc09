"""What each training method costs beyond the plain CLIP, and what its paper model weighs.

    .venv/bin/python bench/methods.py [--images 256] [--steps 24] [--repeats 2]
                                      [--methods longclip flair ...]

1. Throughput: every method trains on the same demo-world shards (``bench/train_clip.py``'s
   ``write_data``: 256 scenes, hierarchical captions from the reference annotations) with the
   settings of its demo runs in ``config.yaml`` (tiny models), through ``hic.train_clip.train``
   with no DataLoader worker, one torch thread. Baseline: method ``clip``, plain open_clip CLIP
   on the same data, steps and batch size. Runs alternate, ``--repeats`` times, the best of
   each counts. Prints samples/s, the ratio to ``clip`` (a method's extra cost), and the tiny
   model's trainable and frozen parameters.
2. The paper configuration (``configs/paper.yaml``'s runs of each method) built on the meta
   device: trainable and frozen parameters beside the published figure (``PUBLISHED``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))

from train_clip import write_data  # noqa: E402  (bench/train_clip.py)

from hic.methods import METHODS, method_for  # noqa: E402
from hic.methods.base import parameter_counts  # noqa: E402
from hic.train_clip import TrainSettings, pair_shards, train  # noqa: E402

# Published parameter counts (millions) of each method's paper model, with their sources.
PUBLISHED: dict[str, tuple[str, str]] = {}


def run_settings(config: dict, method: str) -> dict | None:
    """The first run of ``method`` in a config: clip.defaults overlaid with the run's keys."""
    defaults = config["clip"].get("defaults") or {}
    for run in (config["clip"].get("runs") or {}).values():
        if run and run.get("method", defaults.get("method", "clip")) == method:
            merged = {**defaults, **run}
            return {k: v for k, v in merged.items() if k not in ("annotations", "label")}
    return None


def throughput(method: str, settings: dict, data, steps: int, work: Path) -> float:
    tars, ref = data
    settings = TrainSettings(**{**settings, "policy": "hierarchical", "epochs": 100})
    started = time.perf_counter()
    train(pair_shards(tars, [ref], aligned=False), work, settings, max_steps=steps)
    return steps * settings.batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=[m for m in METHODS if m != "clip"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    demo = yaml.safe_load((REPO / "config.yaml").read_text())
    paper = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    clip = run_settings(demo, "clip")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tars, ref, _ = write_data(tmp, args.images, 4)
        print(f"{args.images} demo images, {args.steps} steps a run, best of {args.repeats}")
        print(f"{'method':10} {'samples/s':>10} {'clip':>8} {'ratio':>6}  tiny params")
        for method in args.methods:
            settings = run_settings(demo, method)
            if settings is None:
                print(f"{method:10} no run in config.yaml")
                continue
            # The baseline at the method's batch size: samples/s depend on it.
            base = {**clip, "batch_size": settings.get("batch_size", clip["batch_size"])}
            best = {"clip": 0.0, method: 0.0}
            for repeat in range(args.repeats):
                for name, s in (("clip", base), (method, settings)):
                    rate = throughput(name, s, (tars, ref), args.steps, tmp / f"{name}{repeat}")
                    best[name] = max(best[name], rate)
            counts = parameter_counts(method_for(TrainSettings(**settings)).build("cpu"))
            print(
                f"{method:10} {best[method]:10.1f} {best['clip']:8.1f} "
                f"{best[method] / best['clip']:6.2f}  "
                f"{counts['trainable'] / 1e6:.2f}M trainable, {counts['frozen'] / 1e6:.2f}M frozen"
            )
    print("\npaper configuration, built on the meta device (millions of parameters)")
    for method in args.methods:
        settings = run_settings(paper, method)
        if settings is None:
            print(f"{method:10} no run in configs/paper.yaml")
            continue
        model = method_for(TrainSettings(**settings)).build("meta", pretrained=False)
        counts = parameter_counts(model)
        published, source = PUBLISHED.get(method, ("?", "no published figure found"))
        print(
            f"{method:10} {counts['trainable'] / 1e6:9.1f} trainable {counts['frozen'] / 1e6:9.1f}"
            f" frozen; published {published} ({source})"
        )


if __name__ == "__main__":
    main()
