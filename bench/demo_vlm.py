"""The demo VLM trained on the demo world against the tiny random one, on held-out scenes.

Trains ``hic.demo_training_vlm`` with the given settings (one CPU thread), then captions
``--scenes`` held-out scenes (a stream no training scene comes from) with both models through
the stage's own code (``caption_batch`` on the transformers backend, config.yaml's
``caption_scene`` budgets and word ranges) and scores them as ``dataset_stats`` scores a release
against the reference. The baseline is ``build_tiny_vlm``'s random model; the ratio printed
last is the trained model's ok-caption share over the baseline's (``inf`` when it has none).

    OMP_NUM_THREADS=1 .venv/bin/python bench/demo_vlm.py --settings '{"steps": 260}'
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from hic.demo_training_vlm import (  # noqa: E402
    VlmTrainSettings,
    evaluate_captions,
    held_out_scenes,
    random_share,
    train_vlm,
)
from hic.tiny_models import build_tiny_vlm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="{}", help="VlmTrainSettings overrides (JSON)")
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--out", type=Path, help="keep the trained model here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    over = json.loads(args.settings)
    settings = VlmTrainSettings(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in over.items()}
    )
    config = yaml.safe_load((ROOT / "config.yaml").read_text())["caption_scene"]
    prompts = {k: (ROOT / "prompts" / f"scene_{k}.txt").read_text() for k in ("short", "long")}
    scenes = held_out_scenes(args.scenes, settings)
    with tempfile.TemporaryDirectory() as tmp:
        trained = args.out or Path(tmp) / "trained"
        started = time.perf_counter()
        train_vlm(trained, prompts, settings, log=lambda line: print(line, file=sys.stderr))
        seconds = time.perf_counter() - started
        random = Path(tmp) / "random"
        build_tiny_vlm(random)
        scores = {
            name: evaluate_captions(path, prompts, scenes, config)
            for name, path in (("trained", trained), ("random", random))
        }
    print(f"training: {seconds:.0f} s on one thread; settings {json.dumps(settings.record())}")
    print(
        f"held-out scenes: {len(scenes)}; naming the 3 commonest classes: "
        f"{random_share(scenes):.3f} of objects"
    )
    keys = ("ok_share", "name_share", "colour_share", "name_share_reference")
    print("| model | " + " | ".join(keys) + " |")
    for name, s in scores.items():
        print(
            f"| {name} | "
            + " | ".join(f"{s[k]:.3f}" if s[k] is not None else "-" for k in keys)
            + " |"
        )
    for got, want in scores["trained"]["examples"]:
        print(f"  {got!r}  <- reference {want!r}")
    base, ours = scores["random"]["ok_share"], scores["trained"]["ok_share"]
    print(f"ok-caption share, trained / random: {ours / base if base else float('inf'):.2f}")


if __name__ == "__main__":
    main()
