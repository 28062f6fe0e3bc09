"""Train the demo's tiny OWLv2 on the demo world, so region proposals find its objects and bands.

The demo world (``hic.demo_world``) draws objects of 18 classes on two background bands and
knows every box. A tiny OWLv2 of the real architecture (``Owlv2ForObjectDetection``, loaded by
``propose_regions`` through ``AutoModelForZeroShotObjectDetection`` like hub weights) learns,
from scratch and on scenes of its own seed (never the demo URL list's or the benchmark's):

- boxes: every patch token predicts one box (OWL's box head plus its grid bias); predictions
  and reference boxes (objects and bands) are paired one-to-one by transformers' DETR
  ``HungarianMatcher``; the paired boxes learn L1 + generalised IoU;
- classes: OWL's class head scores every patch against the text embeddings of the queries, as
  OWLv2 does; the queries are the whole proposal vocabulary (``data/vocabulary`` things and
  stuff) plus the other names ``caption_objects`` finds in demo captions ("wheel", "handle",
  "star"...), so a name the stage may query but the scene lacks learns a low score. A paired
  patch's target is its reference label, every other (patch, query) pair is 0: sigmoid focal
  loss (transformers' ``sigmoid_focal_loss``). The text tower trains with it.

Inference is propose_regions' own: the processor pads to a square and resizes to the model's
input, post-processing takes each patch's best query, ``top_k`` boxes per queried label above
``detector_threshold``. The architecture is larger than the random builder's (a 192 px input
in 16 px patches: 144 boxes, one patch per 16 px of the 192 x 144 scene), still tiny.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessor,
    Owlv2Processor,
    get_cosine_schedule_with_warmup,
)
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_for_object_detection import (
    HungarianMatcher,
    generalized_box_iou,
    sigmoid_focal_loss,
)

from hic import demo_world
from hic.tiny_models import clip_tokenizer
from hic.vocabulary import load_vocabulary

# Training and held-out scenes come from streams no demo run uses: write_world draws from
# SeedSequence(seed) and its children; these entropy words make different streams.
TRAIN_STREAM = 0x0DE7EC7
HELD_OUT_STREAM = 0x0DE7E57


@dataclass(frozen=True)
class DetectorRecipe:
    """Architecture and training numbers (the defaults are the embedded demo's)."""

    image_size: int = 192
    patch_size: int = 16
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_width: int = 32
    text_layers: int = 1
    projection_dim: int = 32
    scenes: int = 1500
    steps: int = 1500
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 1e-4
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    class_weight: float = 2.0
    max_seconds: float | None = None  # stop early (tests); None trains all steps


def owlv2_config(recipe: DetectorRecipe) -> Owlv2Config:
    return Owlv2Config(
        text_config={
            "hidden_size": recipe.text_width,
            "intermediate_size": 2 * recipe.text_width,
            "num_hidden_layers": recipe.text_layers,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": recipe.vision_width,
            "intermediate_size": 2 * recipe.vision_width,
            "num_hidden_layers": recipe.vision_layers,
            "num_attention_heads": recipe.vision_heads,
            "image_size": recipe.image_size,
            "patch_size": recipe.patch_size,
        },
        projection_dim=recipe.projection_dim,
    )


def owlv2_processor(recipe: DetectorRecipe) -> Owlv2Processor:
    size = {"height": recipe.image_size, "width": recipe.image_size}
    return Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size=size), tokenizer=clip_tokenizer()
    )


def demo_scenes(
    stream: int, seed: int, n: int, width: int = 192, height: int = 144
) -> list[demo_world.Scene]:
    """``n`` demo scenes of a stream no demo run draws from (see TRAIN_STREAM)."""
    rng = np.random.default_rng(np.random.SeedSequence([stream, seed]))
    return [demo_world.make_scene(rng, width, height) for _ in range(n)]


def query_names(vocabulary: Sequence[str], scenes: Sequence[demo_world.Scene]) -> list[str]:
    """The vocabulary, then every other name ``caption_objects`` finds in the scenes' long and
    short captions: what propose_regions may query on a demo image."""
    from hic.propose_regions import caption_objects

    names = list(dict.fromkeys(vocabulary))
    for scene in scenes:
        for text in (demo_world.long_caption(scene), demo_world.short_caption(scene)):
            for name in caption_objects(text, names):
                if name not in names:
                    names.append(name)
    return names


def _targets(scene: demo_world.Scene, index: dict[str, int], side: int) -> dict:
    """Reference boxes (objects and bands) as cxcywh fractions of the padded square."""
    regions = demo_world.regions(scene)
    boxes = torch.tensor([r["bbox"] for r in regions], dtype=torch.float) / side
    cxcywh = torch.cat([boxes[:, :2] + boxes[:, 2:] / 2, boxes[:, 2:]], dim=1)
    labels = torch.tensor([index[r["label"]] for r in regions], dtype=torch.long)
    return {"class_labels": labels, "boxes": cxcywh}


def detection_loss(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    targets: list[dict],
    matcher: HungarianMatcher,
    recipe: DetectorRecipe,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Hungarian-matched L1 + GIoU on boxes, sigmoid focal loss on (patch, query) scores."""
    indices = matcher({"logits": logits, "pred_boxes": pred_boxes}, targets)
    n_boxes = max(1, sum(len(t["boxes"]) for t in targets))
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src = torch.cat([src for src, _ in indices])
    matched = pred_boxes[batch, src]
    target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)])
    target_labels = torch.cat(
        [t["class_labels"][j] for t, (_, j) in zip(targets, indices, strict=True)]
    )
    l1 = torch.nn.functional.l1_loss(matched, target_boxes, reduction="sum") / n_boxes
    giou = (
        1
        - torch.diag(
            generalized_box_iou(
                center_to_corners_format(matched), center_to_corners_format(target_boxes)
            )
        )
    ).sum() / n_boxes
    onehot = torch.zeros_like(logits)
    onehot[batch, src, target_labels] = 1.0
    # sigmoid_focal_loss averages over its second dimension: pass (patches, queries) rows so
    # the sum runs over patches and the mean over queries, then undo the mean.
    focal = (
        sigmoid_focal_loss(logits.flatten(0, 1), onehot.flatten(0, 1), n_boxes) * logits.shape[-1]
    )
    loss = recipe.l1_weight * l1 + recipe.giou_weight * giou + recipe.class_weight * focal
    return loss, {"l1": l1.item(), "giou": giou.item(), "focal": focal.item()}


def _forward(
    model: Owlv2ForObjectDetection,
    pixel_values: torch.Tensor,
    text: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (batch, patches, queries) and boxes: OWL's own heads, with the queries' text
    embeddings computed once for the whole batch (every image has the same queries)."""
    feature_map, _ = model.image_embedder(pixel_values=pixel_values)
    b, h, w, d = feature_map.shape
    feats = feature_map.reshape(b, h * w, d)
    query = model.owlv2.get_text_features(**text)
    query = query.pooler_output if hasattr(query, "pooler_output") else query
    query = query.unsqueeze(0).expand(b, -1, -1)
    logits, _ = model.class_predictor(feats, query, None)
    boxes = model.box_predictor(feats, feature_map)
    return logits, boxes


def _init_heads(model: Owlv2ForObjectDetection) -> None:
    """Start the detection heads small, as DETR-style detectors do: the composite config's
    initialiser draws their linear layers with std 1, which saturates every box at init.
    Each patch then starts on its own grid cell (OWL's box bias) and every (patch, query)
    score near 1% (the focal-loss prior)."""
    for head in (model.box_head, model.class_head, model.objectness_head):
        for layer in head.modules():
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.normal_(layer.weight, std=0.02)
                torch.nn.init.zeros_(layer.bias)
    torch.nn.init.zeros_(model.box_head.dense2.weight)
    torch.nn.init.constant_(model.class_head.logit_shift.bias, -4.6)


def train_detector(
    out_dir: Path,
    vocabulary: Sequence[str],
    *,
    seed: int = 0,
    recipe: DetectorRecipe | None = None,
    log=print,
) -> dict:
    """Train a tiny OWLv2 on demo scenes of ``seed`` and save it, processor included, to
    ``out_dir``; returns the training summary (also in ``hic_model.json``)."""
    recipe = recipe or DetectorRecipe()
    start = time.perf_counter()
    scenes = demo_scenes(TRAIN_STREAM, seed, recipe.scenes)
    names = query_names(vocabulary, scenes)
    index = {name: i for i, name in enumerate(names)}
    missing = {r["label"] for s in scenes for r in demo_world.regions(s)} - set(index)
    if missing:
        raise ValueError(f"demo labels missing from the vocabulary: {sorted(missing)}")
    processor = owlv2_processor(recipe)
    pixels = processor.image_processor([demo_world.render(s) for s in scenes], return_tensors="pt")[
        "pixel_values"
    ]
    side = max(scenes[0].width, scenes[0].height)  # the processor pads to a square
    targets = [_targets(s, index, side) for s in scenes]
    text = dict(
        processor.tokenizer(names, padding="max_length", truncation=True, return_tensors="pt")
    )
    prepared = time.perf_counter() - start

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Owlv2ForObjectDetection(owlv2_config(recipe))
        _init_heads(model)
        order = torch.Generator().manual_seed(seed)
        model.train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
        )
        schedule = get_cosine_schedule_with_warmup(optimizer, recipe.warmup, recipe.steps)
        matcher = HungarianMatcher(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)
        perm, cursor, step, parts = torch.randperm(len(scenes), generator=order), 0, 0, {}
        for step in range(1, recipe.steps + 1):
            if cursor + recipe.batch_size > len(scenes):
                perm, cursor = torch.randperm(len(scenes), generator=order), 0
            batch = perm[cursor : cursor + recipe.batch_size].tolist()
            cursor += recipe.batch_size
            logits, boxes = _forward(model, pixels[batch], text)
            loss, parts = detection_loss(
                logits, boxes, [targets[i] for i in batch], matcher, recipe
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % 50 == 0 or step == 1:
                log(f"step {step}: loss {loss.item():.3f} {parts}")
            elapsed = time.perf_counter() - start
            if recipe.max_seconds is not None and elapsed > recipe.max_seconds:
                break
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    summary = {
        "architecture": type(model).__name__,
        "kind": "tiny trained on the demo world",
        "seed": seed,
        "recipe": asdict(recipe),
        "steps_done": step,
        "queries": len(names),
        "final_loss": {k: round(v, 4) for k, v in parts.items()},
        "prepare_seconds": round(prepared, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out_dir / "hic_model.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


# ---------------------------------------------------------------- measuring
def held_out_recall(
    model_dir: Path,
    vocabulary: dict[str, list[str]],
    *,
    n: int = 100,
    seed: int = 0,
    threshold: float = 0.1,
    top_k: int = 1,
    queries: str = "caption",
    sam_dir: Path | None = None,
    select: dict | None = None,
    iou_threshold: float = 0.5,
    propose: dict | None = None,
) -> dict:
    """Region recall and precision at IoU >= ``iou_threshold`` on ``n`` held-out scenes, through
    propose_regions' ``Detector`` (and, with ``sam_dir``, ``image_proposals`` with that SAM)
    and select_regions' ``select`` (``select`` settings; None skips selection). ``propose``
    overrides the ``ProposeSettings`` used with SAM (automatic masks: 8 points a side, quality
    thresholds at 0, which a random SAM needs).

    ``queries``: "caption" queries what propose_regions finds in the reference long caption
    (a VLM that captions right), "vocabulary" the whole vocabulary (its fallback)."""
    from hic.models import ModelRef
    from hic.propose_regions import Detector, ProposeSettings, image_proposals, query_source
    from hic.select_regions import SelectSettings, match_pairs
    from hic.select_regions import select as select_regions

    detector = Detector(ModelRef(str(model_dir)), device="cpu")
    names = vocabulary["things"] + vocabulary["stuff"]
    stuff = set(vocabulary["stuff"])
    scenes = demo_scenes(HELD_OUT_STREAM, seed, n)
    settings = ProposeSettings(
        **{
            "points_per_side": 8,
            "pred_iou_thresh": 0.0,
            "stability_score_thresh": 0.0,
            **(propose or {}),
            "detector_threshold": threshold,
            "top_k": top_k,
        }
    )
    sam = None
    if sam_dir is not None:
        from hic.segment import load_sam

        sam = load_sam(ModelRef(str(sam_dir)), device="cpu")
    counts = {s: {"matched": 0, "predicted": 0, "reference": 0} for s in ("all", "fg", "bg")}
    labels_correct = 0
    for k in range(0, n, 16):
        chunk = scenes[k : k + 16]
        images = [demo_world.render(s) for s in chunk]
        asked = [
            query_source(demo_world.long_caption(s), names, "vocabulary")[1]
            if queries == "caption"
            else names
            for s in chunk
        ]
        found = detector.detect(images, asked, threshold, top_k)
        for scene, image, dets in zip(chunk, images, found, strict=True):
            if sam is not None:
                props = image_proposals(image, dets, stuff, sam, settings)
            else:
                props = [
                    {**d, "kind": "background" if d["label"] in stuff else "foreground"}
                    for d in dets
                ]
            if select is not None:
                props = select_regions(props, scene.width, scene.height, SelectSettings(**select))
            ref = demo_world.regions(scene)
            for scope, kinds in (
                ("all", {"foreground", "background"}),
                ("fg", {"foreground"}),
                ("bg", {"background"}),
            ):
                p = [x for x in props if x["kind"] in kinds]
                r = [x for x in ref if x["kind"] in kinds]
                pairs = match_pairs([x["bbox"] for x in p], [x["bbox"] for x in r], iou_threshold)
                counts[scope]["matched"] += len(pairs)
                counts[scope]["predicted"] += len(p)
                counts[scope]["reference"] += len(r)
                if scope == "all":
                    labels_correct += sum(p[i]["label"] == r[j]["label"] for i, j in pairs)
    out = {}
    for scope, c in counts.items():
        out[scope] = {
            **c,
            "recall": round(c["matched"] / max(1, c["reference"]), 3),
            "precision": round(c["matched"] / max(1, c["predicted"]), 3),
        }
    out["all"]["label_accuracy"] = round(labels_correct / max(1, out["all"]["matched"]), 3)
    return out


def train_demo(
    out_dir: Path,
    inputs: dict[str, Path],
    *,
    seed: int = 0,
    log=print,
    recipe: DetectorRecipe | None = None,
) -> dict:
    """The workflow's entry (train_demo_model): ``inputs`` holds the proposal vocabulary's
    ``things`` and ``stuff`` files, whose names the detector learns to score."""
    vocabulary = [*load_vocabulary(inputs["things"]), *load_vocabulary(inputs["stuff"])]
    return train_detector(out_dir, vocabulary, seed=seed, recipe=recipe, log=log)
