"""The demo SAM trained on the demo world against the tiny random one, on held-out scenes.

Trains ``hic.demo_training_sam`` with the given recipe overrides (one CPU thread; or reuses
``--sam`` when it holds a trained model), then scores both SAMs on ``--scenes`` held-out scenes
with ``held_out_masks`` (box prompts from the reference boxes, exact and with the training's
box noise). With ``--detector`` (a folder ``train_detector`` wrote), it also runs the detector
end to end through propose_regions and select_regions (``held_out_recall``, at most 7 regions)
without SAM, with the random SAM and with the trained SAM, the latter also at each of the
``--thresholds`` (pred_iou_thresh, stability_score_thresh) pairs for the automatic masks.

    OMP_NUM_THREADS=1 .venv/bin/python bench/demo_sam.py --sam /tmp/demo-sam --detector /tmp/owl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from hic.demo_training_owlv2 import held_out_recall  # noqa: E402
from hic.demo_training_sam import SamRecipe, held_out_masks, train_sam  # noqa: E402
from hic.propose_regions import load_vocabulary  # noqa: E402
from hic.segment import build_tiny_sam  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="{}", help="SamRecipe overrides (JSON)")
    parser.add_argument("--sam", type=Path, help="train here, or reuse the model found here")
    parser.add_argument("--detector", type=Path, help="a trained demo OWLv2 for the end to end")
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--thresholds", default="[[0.5, 0.8], [0.88, 0.95]]")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="demo_sam_"))
    trained = args.sam or work / "trained"
    if not (trained / "hic_model.json").exists():
        recipe = replace(SamRecipe(), **json.loads(args.recipe))
        train_sam(trained, recipe, log=lambda line: print(line, file=sys.stderr))
    print("training", (trained / "hic_model.json").read_text())
    random = work / "random"
    build_tiny_sam(random)
    for name, folder in (("trained", trained), ("random", random)):
        for noise in (0.0, 0.1):
            scores = held_out_masks(folder, n=args.scenes, box_noise=noise)
            print(f"masks {name} box_noise={noise}: {json.dumps(scores)}")
    if args.detector is None:
        return
    vocabulary = {
        kind: load_vocabulary(ROOT / "data" / "vocabulary" / f"{kind}.txt")
        for kind in ("things", "stuff")
    }
    runs = [("no SAM", None, {}), ("random SAM", random, {}), ("trained SAM", trained, {})]
    for iou, stability in json.loads(args.thresholds):
        quality = {"pred_iou_thresh": iou, "stability_score_thresh": stability}
        runs.append((f"trained SAM {iou}/{stability}", trained, quality))
    for name, sam_dir, propose in runs:
        recall = held_out_recall(
            args.detector,
            vocabulary,
            n=args.scenes,
            threshold=0.05,
            select={"max_regions": 7},
            sam_dir=sam_dir,
            propose=propose,
        )
        print(f"end to end, {name}: {json.dumps(recall)}")


if __name__ == "__main__":
    main()
