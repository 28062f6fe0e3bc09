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
from hic.methods.flame_tiny import build_tiny_mistral  # noqa: E402
from hic.train_clip import TrainSettings, pair_shards, train  # noqa: E402

# Published parameter counts (millions) of each method's paper model, with their sources.
PUBLISHED = {
    "longclip": ("~150 (ViT-B/16 149.6 + 171 positions)", "open_clip's ViT-B-16 profile"),
    "flair": ("150", 'FLAIR README: "150M vs 149M", +1M attention pooling'),
    "cosmos": ("?", "no figure found in the COSMOS README or scripts"),
    "flame": ("12,000 frozen (Mistral-Nemo 12B) + ViT-B/16", "Mistral-Nemo model card"),
    "llm2clip": ("8,030 frozen (Llama-3-8B) + ViT-L/14 304", "Meta Llama 3 card; open_clip"),
}


def method_runs(config: dict, method: str) -> dict[str, dict]:
    """The first run of each stage of ``method`` in a config (LLM2CLIP has two), by label:
    clip.defaults overlaid with the run's keys. A stage-2 run's stage-1 checkpoint is dropped
    (its LLM is used as built: the same cost)."""
    defaults = config["clip"].get("defaults") or {}
    found: dict[str, dict] = {}
    for run in (config["clip"].get("runs") or {}).values():
        if not run or run.get("method", defaults.get("method", "clip")) != method:
            continue
        merged = {k: v for k, v in {**defaults, **run}.items() if k not in ("annotations", "label")}
        options = {k: v for k, v in (merged.get("options") or {}).items() if k != "llm_checkpoint"}
        label = method + (f" ({options['stage']})" if "stage" in options else "")
        found.setdefault(label, {**merged, "options": options})
    return found


def local_models(settings: dict, folder: Path) -> dict:
    """``settings`` with the workflow-built tiny models its options name built in ``folder``
    (the workflow's build_tiny_model makes them under resources/models/)."""
    options = dict(settings.get("options") or {})
    for key, value in options.items():
        if value == "resources/models/tiny-mistral":
            options[key] = str(folder / "tiny-mistral")
            if not Path(options[key]).exists():
                build_tiny_mistral(Path(options[key]))
    return {**settings, "options": options}


def throughput(settings: dict, data, steps: int, work: Path) -> float:
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
    clip = method_runs(demo, "clip")["clip"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tars, ref, _ = write_data(tmp, args.images, 4)
        print(f"{args.images} demo images, {args.steps} steps a run, best of {args.repeats}")
        print(f"{'method':32} {'samples/s':>10} {'clip':>8} {'ratio':>6}  tiny params")
        for method in args.methods:
            runs = method_runs(demo, method)
            if not runs:
                print(f"{method:10} no run in config.yaml")
            for label, settings in runs.items():
                settings = local_models(settings, tmp)
                # The baseline at the method's batch size: samples/s depend on it.
                base = {**clip, "batch_size": settings.get("batch_size", clip["batch_size"])}
                best = {"clip": 0.0, label: 0.0}
                for repeat in range(args.repeats):
                    for name, s in (("clip", base), (label, settings)):
                        out = tmp / f"{name}{repeat}".replace(" ", "_")
                        best[name] = max(best[name], throughput(s, (tars, ref), args.steps, out))
                counts = parameter_counts(method_for(TrainSettings(**settings)).build("cpu"))
                print(
                    f"{label:32} {best[label]:10.1f} {best['clip']:8.1f} "
                    f"{best[label] / best['clip']:6.2f}  {counts['trainable'] / 1e6:.2f}M "
                    f"trainable, {counts['frozen'] / 1e6:.2f}M frozen"
                )
    print("\npaper configuration, built on the meta device (millions of parameters)")
    for method in args.methods:
        for label, settings in method_runs(paper, method).items():
            model = method_for(TrainSettings(**settings)).build("meta", pretrained=False)
            counts = parameter_counts(model)
            published, source = PUBLISHED.get(method, ("?", "no published figure found"))
            print(
                f"{label:32} {counts['trainable'] / 1e6:9.1f} trainable "
                f"{counts['frozen'] / 1e6:9.1f} frozen; published {published} ({source})"
            )


if __name__ == "__main__":
    main()
