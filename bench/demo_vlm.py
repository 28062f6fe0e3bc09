"""The demo VLM trained on the demo world against the tiny random one, on every VLM stage.

Trains ``hic.demo_training_vlm`` with the given settings (one CPU thread), then runs both
models on ``--scenes`` held-out scenes (a stream no training scene comes from) through each
stage's own code with config.yaml's settings (``hic.demo_vlm_eval``): scene captions
(caption_scene, scored as dataset_stats scores a release), label verification and correction
(verify_labels: every reference region asked with its true and with a wrong label), region
captions (caption_regions) and their refinement (refine_regions). The baseline is
``build_tiny_vlm``'s random model. ``--model`` measures a model trained before instead.

    OMP_NUM_THREADS=1 .venv/bin/python bench/demo_vlm.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/demo_vlm.py --settings '{"steps": 400}' --scenes 50
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
    PROMPT_FILES,
    VlmTrainSettings,
    held_out_scenes,
    train_vlm,
)
from hic.demo_vlm_eval import evaluate_model, random_share  # noqa: E402
from hic.tiny_models import build_tiny_vlm  # noqa: E402

STAGES = ("caption_scene", "verify_labels", "caption_regions", "refine_regions")
#: (label, where in evaluate_model's result, target or None).
FIGURES = (
    ("scene captions ok", ("captions", "ok_share"), None),
    ("scene: objects named", ("captions", "name_share"), 0.8),
    ("scene: colours named", ("captions", "colour_share"), None),
    ("verify: true labels accepted", ("verify", "accept_true", "all"), 0.8),
    ("  objects", ("verify", "accept_true", "foreground"), None),
    ("  bands", ("verify", "accept_true", "background"), None),
    ("verify: wrong labels rejected", ("verify", "reject_wrong", "all"), 0.8),
    ("  objects", ("verify", "reject_wrong", "foreground"), None),
    ("  bands", ("verify", "reject_wrong", "background"), None),
    ("verify: shown-elsewhere labels rejected", ("verify", "reject_shown_elsewhere", "all"), None),
    ("  objects", ("verify", "reject_shown_elsewhere", "foreground"), None),
    ("  bands", ("verify", "reject_shown_elsewhere", "background"), None),
    ("verify: answered (P(yes)+P(no) >= 0.5)", ("verify", "answered"), None),
    ("correct: wrong labels corrected right", ("verify", "corrected_right", "all"), None),
    ("  objects", ("verify", "corrected_right", "foreground"), None),
    ("  bands", ("verify", "corrected_right", "background"), None),
    ("region captions ok", ("regions", "ok", "all"), None),
    ("region: names the class", ("regions", "names_class", "all"), None),
    (
        "region: objects' colour and class",
        ("regions", "names_colour_and_class", "foreground"),
        None,
    ),
    ("refine: LLM path", ("refine", "llm_path"), 0.8),
    ("refine: LLM path and equal to reference", ("refine", "exact"), None),
)


def figure(scores: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        scores = scores.get(key) if isinstance(scores, dict) else None
    return scores


def cell(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="{}", help="VlmTrainSettings overrides (JSON)")
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--out", type=Path, help="keep the trained model here")
    parser.add_argument("--model", type=Path, help="measure this trained model, train none")
    parser.add_argument("--no-random", action="store_true", help="skip the random baseline")
    args = parser.parse_args()
    torch.set_num_threads(1)
    over = json.loads(args.settings)
    settings = VlmTrainSettings(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in over.items()}
    )
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config = {stage: config.get(stage) or {} for stage in STAGES}
    prompts = {k: (ROOT / "prompts" / f).read_text() for k, f in PROMPT_FILES.items()}
    scenes = held_out_scenes(args.scenes, settings)
    with tempfile.TemporaryDirectory() as tmp:
        trained = args.model or args.out or Path(tmp) / "trained"
        if args.model is None:
            record = train_vlm(
                trained, prompts, settings, log=lambda line: print(line, file=sys.stderr)
            )
            print(
                f"training: {record['seconds']:.0f} s wall, {record['cpu_seconds']:.0f} s CPU "
                f"on one thread; settings {json.dumps(settings.record())}"
            )
        models = {"trained": trained}
        if not args.no_random:
            build_tiny_vlm(Path(tmp) / "random")
            models["random"] = Path(tmp) / "random"
        started = time.perf_counter()
        scores = {
            name: evaluate_model(path, prompts, scenes, config) for name, path in models.items()
        }
    print(f"evaluation: {time.perf_counter() - started:.0f} s")
    print(
        f"held-out scenes: {len(scenes)}; naming the 3 commonest classes: "
        f"{random_share(scenes):.3f} of objects"
    )
    print("| figure | " + " | ".join(models) + " | target |")
    print("| --- |" + " --- |" * (len(models) + 1))
    for label, path, target in FIGURES:
        values = " | ".join(cell(figure(scores[m], path)) for m in models)
        print(f"| {label} | {values} | {cell(target)} |")
    trained_scores = scores["trained"]
    for key in ("captions", "verify", "regions", "refine"):
        for name in ("examples", "status", "reasons"):
            if name in trained_scores[key]:
                print(f"{key} {name}: {json.dumps(trained_scores[key][name])}")


if __name__ == "__main__":
    main()
