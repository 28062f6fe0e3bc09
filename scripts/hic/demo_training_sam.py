"""Train the demo's tiny SAM on the demo world, so its masks tighten the detector's boxes
instead of destroying them (issue 14).

The demo world (``hic.demo_world``) draws objects of 18 classes on two background bands and
knows every pixel: ``object_masks`` gives each object's visible pixels, ``band_masks`` each
band's. A tiny SAM of the real architecture (``hic.segment.sam_from_config``, loaded by
``load_sam`` like the random one) learns from scratch, on scenes of its own seed (never the
demo URL list's or the benchmark's), rendered on the fly and stored as the demo's JPEG, what
``propose_regions`` asks of it:

- box prompts: the reference box of each object, each edge shifted by noise of 10% of the
  box's side as SAM's training does (the detector's boxes are imperfect), and SAM's single
  mask output (``multimask_output=False``: the first mask token) learns the object's visible
  mask;
- point prompts: a random visible pixel of one object and of each band, as the automatic
  mask generator's point grid lands on them. The three multimask outputs answer it, and the
  one closest to the region's mask learns (SAM's minimum over its outputs).

Inputs go through segment-anything's own path (``ResizeLongestSide``, ``Sam.preprocess``, the
prompt encoder, the mask decoder); the decoder's low-resolution logits are compared with the
masks brought to that grid (``low_res_targets``). The loss is SAM's: focal and dice on the
masks (1:1 here, see ``SamRecipe``), and the mean squared error of the IoU head's prediction
against each mask's actual IoU, which the generator filters and ranks by. Everything is
seeded: on one CPU thread a run is deterministic.

Measured (bench/demo_sam.py, 100 held-out scenes; 64 s of training on one thread): box
prompts give masks of IoU 0.48 with the objects' visible pixels (random SAM: 0.02), and 78%
of the masks' tight boxes keep IoU >= 0.5 with the reference box (random: 0). Behind the demo
OWLv2, foreground recall rises from 0.23 without SAM (0 with the random one) to 0.32. Points
on objects still mostly answer with band-like masks (IoU 0.02): the budget buys box prompts
and bands, not point-prompted objects.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from transformers import get_cosine_schedule_with_warmup

from hic import demo_world as dw
from hic.segment import CONFIG_NAME, TINY_SAM_CONFIG, WEIGHTS_NAME, sam_from_config

# Training and held-out scenes come from streams no demo run uses: write_world draws from
# SeedSequence(seed) and its children; these entropy words make different streams.
TRAIN_STREAM = 0x5A37EC7
HELD_OUT_STREAM = 0x5A37E57


@dataclass(frozen=True)
class SamRecipe:
    """Architecture and training numbers (the defaults are the embedded demo's)."""

    # A 128 px input: the 192 x 144 scene shrinks to 128 x 96 and the encoder sees an 8 x 8
    # grid. In the same 90 s on one thread it learns more than the 256 px random builder's
    # 16 x 16 grid (measured, 2 layers each: held-out box-prompt mask IoU 0.49 vs 0.14).
    img_size: int = 128
    encoder_embed_dim: int = TINY_SAM_CONFIG["encoder_embed_dim"]
    encoder_depth: int = TINY_SAM_CONFIG["encoder_depth"]
    encoder_num_heads: int = TINY_SAM_CONFIG["encoder_num_heads"]
    encoder_global_attn_indexes: tuple[int, ...] = tuple(
        TINY_SAM_CONFIG["encoder_global_attn_indexes"]
    )
    steps: int = 600
    batch_size: int = 4  # scenes per step; more, smaller steps learn faster per second here
    lr: float = 1.5e-3
    warmup: int = 10
    weight_decay: float = 0.01
    box_noise: float = 0.1  # std of each box edge's shift, as a fraction of the box's side
    # Focal to dice 1:1, not SAM's 20:1: from scratch, 20:1 predicts empty masks for the
    # first ~100 steps and ends behind (held-out mask IoU 0.38 vs 0.49, same budget).
    focal_weight: float = 1.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    width: int = 192  # config.yaml demo_world
    height: int = 144
    objects_per_image: tuple[int, int] = (2, 5)
    max_seconds: float | None = None  # stop early; None trains all steps


def sam_config(recipe: SamRecipe) -> dict:
    """``TINY_SAM_CONFIG`` with the recipe's input size and encoder: what ``load_sam`` builds."""
    return {
        **TINY_SAM_CONFIG,
        "img_size": recipe.img_size,
        "encoder_embed_dim": recipe.encoder_embed_dim,
        "encoder_depth": recipe.encoder_depth,
        "encoder_num_heads": recipe.encoder_num_heads,
        "encoder_global_attn_indexes": list(recipe.encoder_global_attn_indexes),
    }


# ---------------------------------------------------------------- data
@dataclass(frozen=True)
class Example:
    """One scene as SAM sees it, with its prompts and the masks they ask for."""

    pixels: np.ndarray  # H x W x 3 uint8, the downloaded JPEG
    bboxes: np.ndarray  # B x 4 xywh: the objects' reference boxes
    boxes: np.ndarray  # B x 4 xyxy: the box prompts, in image pixels
    box_targets: np.ndarray  # B x H x W bool
    points: np.ndarray  # P x 2 xy in image pixels
    point_targets: np.ndarray  # P x H x W bool


def _noisy_box(bbox: dw.XYWH, noise: float, rng: np.random.Generator, w: int, h: int):
    x, y, bw, bh = bbox
    shift = rng.normal(0.0, noise, 4) * np.array([bw, bh, bw, bh])
    x0, y0, x1, y1 = np.array([x, y, x + bw, y + bh], dtype=float) + shift
    x0, x1 = sorted((float(np.clip(x0, 0, w)), float(np.clip(x1, 0, w))))
    y0, y1 = sorted((float(np.clip(y0, 0, h)), float(np.clip(y1, 0, h))))
    return [x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)]


def _random_pixel(mask: np.ndarray, rng: np.random.Generator) -> list[float]:
    ys, xs = np.nonzero(mask)
    k = int(rng.integers(len(xs)))
    return [float(xs[k]), float(ys[k])]


def example(scene: dw.Scene, box_noise: float, rng: np.random.Generator) -> Example:
    """Box prompts for every visible object; points on one of them and on each band."""
    # The last object drawn always shows, so every scene has a box prompt.
    shown = [(o, m) for o, m in zip(scene.objects, dw.object_masks(scene), strict=True) if m.any()]
    objects = [m for _, m in shown]
    # Points: one on a random shown object, one on each band (a grid's points mostly land on
    # the bands, and every point costs a decoder pass).
    regions = [objects[int(rng.integers(len(objects)))]] + [
        m for m in dw.band_masks(scene) if m.any()
    ]
    w, h = scene.width, scene.height
    return Example(
        pixels=np.asarray(dw.as_downloaded(scene)),
        bboxes=np.array([o.bbox for o, _ in shown], dtype=float),
        boxes=np.array([_noisy_box(o.bbox, box_noise, rng, w, h) for o, _ in shown]),
        box_targets=np.stack(objects),
        points=np.array([_random_pixel(m, rng) for m in regions]),
        point_targets=np.stack(regions),
    )


def examples(stream: int, seed: int, recipe: SamRecipe) -> Iterator[Example]:
    """Endless examples of a stream no demo run draws from (see TRAIN_STREAM)."""
    scene_rng, prompt_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([stream, seed]).spawn(2)
    )
    while True:
        scene = dw.make_scene(scene_rng, recipe.width, recipe.height, recipe.objects_per_image)
        yield example(scene, recipe.box_noise, prompt_rng)


# ---------------------------------------------------------------- model pass
def encode(sam: Sam, transform: ResizeLongestSide, images: list[np.ndarray]) -> torch.Tensor:
    """Image embeddings through segment-anything's own resize, normalisation and padding."""
    batch = [
        sam.preprocess(torch.as_tensor(transform.apply_image(im)).permute(2, 0, 1).float())
        for im in images
    ]
    return sam.image_encoder(torch.stack(batch))


def decode(
    sam: Sam,
    transform: ResizeLongestSide,
    embedding: torch.Tensor,
    ex: Example,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder's low-resolution mask logits and IoU predictions: (box prompts' B x 1 x L x L,
    B x 1; point prompts' P x 3 x L x L, P x 3), L a quarter of the model's input side.

    Box and point prompts both give two sparse tokens (box corners; the point and SAM's pad
    point), so one decoder pass serves both; the slices are ``multimask_output``'s.
    """
    size = ex.pixels.shape[:2]
    boxes = torch.as_tensor(transform.apply_boxes(ex.boxes, size), dtype=torch.float)
    points = torch.as_tensor(transform.apply_coords(ex.points, size), dtype=torch.float)
    labels = torch.ones(len(points), 1)
    box_sparse, box_dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    point_sparse, point_dense = sam.prompt_encoder(
        points=(points[:, None], labels), boxes=None, masks=None
    )
    logits, iou = sam.mask_decoder.predict_masks(
        image_embeddings=embedding[None],
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=torch.cat([box_sparse, point_sparse]),
        dense_prompt_embeddings=torch.cat([box_dense, point_dense]),
    )
    n = len(boxes)
    return logits[:n, :1], iou[:n, :1], logits[n:, 1:], iou[n:, 1:]


def low_res_targets(
    masks: np.ndarray, transform: ResizeLongestSide, img_size: int, side: int
) -> torch.Tensor:
    """Image-pixel masks (N x H x W) as the decoder's ``side`` x ``side`` logits see them: resized
    and padded as the image is (``ResizeLongestSide``, ``Sam.preprocess``), then each cell's
    covered fraction. Comparing there skips upsampling every mask to the image's pixels, most
    of a training step's cost, while ``postprocess_masks`` only interpolates these logits."""
    t = torch.as_tensor(masks, dtype=torch.float)[:, None]
    h, w = transform.get_preprocess_shape(*masks.shape[1:], transform.target_length)
    t = F.interpolate(t, (h, w), mode="bilinear", align_corners=False)
    t = F.pad(t, (0, img_size - w, 0, img_size - h))
    return F.interpolate(t, (side, side), mode="area")[:, 0]


# ---------------------------------------------------------------- loss
def mask_losses(
    logits: torch.Tensor, target: torch.Tensor, recipe: SamRecipe
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per mask (N x K x L x L logits, N x L x L target fractions): SAM's focal + dice loss,
    and the mask's actual IoU (logits thresholded at 0, SAM's mask threshold)."""
    t = target[:, None].expand_as(logits)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = prob * t + (1 - prob) * (1 - t)
    alpha_t = 0.25 * t + 0.75 * (1 - t)
    focal = (alpha_t * ce * (1 - p_t) ** 2).mean(dim=(-2, -1))
    dice = 1 - (2 * (prob * t).sum(dim=(-2, -1)) + 1) / (
        prob.sum(dim=(-2, -1)) + t.sum(dim=(-2, -1)) + 1
    )
    hard, truth = logits > 0, t > 0.5
    actual = (hard & truth).sum(dim=(-2, -1)) / (hard | truth).sum(dim=(-2, -1)).clamp(min=1)
    return recipe.focal_weight * focal + recipe.dice_weight * dice, actual.detach()


def example_loss(
    sam: Sam, transform: ResizeLongestSide, embedding: torch.Tensor, ex: Example, recipe: SamRecipe
) -> tuple[torch.Tensor, dict[str, float]]:
    """Box prompts learn their single mask; point prompts the best of their three (SAM's
    minimum over outputs); the IoU head learns every output's actual IoU."""
    box_logits, box_iou, point_logits, point_iou = decode(sam, transform, embedding, ex)
    img_size, side = sam.image_encoder.img_size, box_logits.shape[-1]
    box_t = low_res_targets(ex.box_targets, transform, img_size, side)
    point_t = low_res_targets(ex.point_targets, transform, img_size, side)
    box_mask, box_actual = mask_losses(box_logits, box_t, recipe)
    point_mask, point_actual = mask_losses(point_logits, point_t, recipe)
    iou = F.mse_loss(
        torch.cat([box_iou.flatten(), point_iou.flatten()]),
        torch.cat([box_actual.flatten(), point_actual.flatten()]),
    )
    boxes, points = box_mask.mean(), point_mask.min(dim=1).values.mean()
    loss = boxes + points + recipe.iou_weight * iou
    parts = {"box": boxes.item(), "point": points.item(), "iou": iou.item()}
    return loss, parts | {"box_iou": box_actual.mean().item()}


# ---------------------------------------------------------------- training
def train_sam(out_dir: Path, recipe: SamRecipe | None = None, *, seed: int = 0, log=print) -> dict:
    """Train a tiny SAM on demo scenes of ``seed`` and save it in ``load_sam``'s layout
    (``sam.pth`` + ``sam_config.json``) to ``out_dir``; returns the training summary (also in
    ``hic_model.json``)."""
    recipe = recipe or SamRecipe()
    start = time.perf_counter()
    config = sam_config(recipe)
    data = examples(TRAIN_STREAM, seed, recipe)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = sam_from_config(config)
        transform = ResizeLongestSide(sam.image_encoder.img_size)
        sam.train()
        optimizer = torch.optim.AdamW(
            sam.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
        )
        schedule = get_cosine_schedule_with_warmup(optimizer, recipe.warmup, recipe.steps)
        step, parts = 0, {}
        for step in range(1, recipe.steps + 1):
            batch = [next(data) for _ in range(recipe.batch_size)]
            embeddings = encode(sam, transform, [ex.pixels for ex in batch])
            losses, logged = [], []
            for embedding, ex in zip(embeddings, batch, strict=True):
                loss, parts = example_loss(sam, transform, embedding, ex, recipe)
                losses.append(loss)
                logged.append(parts)
            loss = torch.stack(losses).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            parts = {k: float(np.mean([p[k] for p in logged])) for k in logged[0]}
            if step % 25 == 0 or step == 1:
                log(f"step {step}: loss {loss.item():.3f} " + _fmt(parts))
            if recipe.max_seconds is not None and time.perf_counter() - start > recipe.max_seconds:
                break
    sam.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), out_dir / WEIGHTS_NAME)
    card = {**config, "architecture": "Sam", "kind": "tiny trained on the demo world", "seed": seed}
    (out_dir / CONFIG_NAME).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    summary = {
        "architecture": "Sam",
        "kind": card["kind"],
        "seed": seed,
        "recipe": asdict(recipe),
        "steps_done": step,
        "final_step": {k: round(v, 4) for k, v in parts.items()},  # losses, box masks' IoU
        "seconds": round(time.perf_counter() - start, 1),
        "parameters": sum(p.numel() for p in sam.parameters()),
    }
    (out_dir / "hic_model.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def train_demo(
    out_dir: Path,
    inputs: dict[str, Path],
    *,
    seed: int = 0,
    log=print,
    recipe: SamRecipe | None = None,
) -> dict:
    """The workflow's entry (train_demo_model): SAM reads no inputs, the demo world is all it
    learns from (``inputs`` is empty)."""
    if inputs:
        raise ValueError(f"the demo SAM reads no inputs, got {sorted(inputs)}")
    return train_sam(out_dir, recipe, seed=seed, log=log)


def _fmt(parts: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in parts.items())


# ---------------------------------------------------------------- measuring
def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def held_out_masks(
    sam_dir: Path,
    *,
    n: int = 100,
    seed: int = 0,
    box_noise: float = 0.0,
    iou_threshold: float = 0.5,
) -> dict:
    """SAM on ``n`` held-out scenes (the demo's JPEGs), through propose_regions' calls.

    Box prompts (each object's reference box, edges shifted by ``box_noise`` of its side):
    ``box_mask_iou``, the mean IoU of the mask with the object's visible pixels, and
    ``box_kept``, the share of objects whose mask's tight box (``box_masks``, what
    propose_regions keeps) has IoU >= ``iou_threshold`` with the reference box. Point prompts
    (a random visible pixel of one object and of each band): the mean IoU with the region's visible
    pixels of the output the IoU head ranks first (``object_point_iou``, ``band_point_iou``).
    Objects hidden entirely by others are left out (they have no pixels to prompt).
    """
    from hic.boxes import iou
    from hic.models import ModelRef
    from hic.segment import EncodeOnce, box_masks, box_prompt_masks, load_sam

    sam = load_sam(ModelRef(str(sam_dir)), device="cpu")
    predictor = EncodeOnce(sam)
    recipe = SamRecipe(box_noise=box_noise)
    scores = {"box_mask_iou": [], "box_kept": [], "object_point_iou": [], "band_point_iou": []}
    with torch.inference_mode():
        for _, ex in zip(range(n), examples(HELD_OUT_STREAM, seed, recipe), strict=False):
            boxes = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in ex.boxes.tolist()]
            masks = box_prompt_masks(predictor, ex.pixels, boxes)
            tight = [box for box, _ in box_masks(predictor, ex.pixels, boxes)]
            for mask, target, box, ref in zip(masks, ex.box_targets, tight, ex.bboxes, strict=True):
                scores["box_mask_iou"].append(_mask_iou(mask, target))
                scores["box_kept"].append(float(iou(box, ref) >= iou_threshold))
            for k, (point, target) in enumerate(zip(ex.points, ex.point_targets, strict=True)):
                outputs, ranks, _ = predictor.predict(point[None], np.array([1]))
                best = outputs[int(np.argmax(ranks))]
                key = "object_point_iou" if k == 0 else "band_point_iou"
                scores[key].append(_mask_iou(best, target))
    out = {k: round(float(np.mean(v)), 3) for k, v in scores.items()}
    return out | {"objects": len(scores["box_kept"]), "scenes": n}
