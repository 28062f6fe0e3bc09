"""Segment Anything (SAM): box-prompted object masks and automatic background masks.

Real runs load an original segment-anything checkpoint from a Hugging Face repo at a pinned
revision. Offline, the workflow builds a tiny randomly initialised SAM of the same architecture
(small image size, narrow and shallow encoder) whose weights load through the same state-dict
path, so prompting, batching and mask post-processing run the code real weights use.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import partial
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HFValidationError
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from hic.models import ModelRef, ModelUnavailableError, default_device

CONFIG_NAME = "sam_config.json"
WEIGHTS_NAME = "sam.pth"
# The original release's ViT-B checkpoint (as hosted by hub mirrors of segment-anything).
DEFAULT_CHECKPOINT = "sam_vit_b_01ec64.pth"
DEFAULT_VARIANT = "vit_b"

# SAM's layout at toy scale: a 256 px input (16x16 patch grid) makes one image encoding cost
# milliseconds on CPU; windowed blocks with one global block, as in every real variant.
TINY_SAM_CONFIG = {
    "img_size": 256,
    "patch_size": 16,
    "encoder_embed_dim": 64,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_window_size": 8,
    "encoder_global_attn_indexes": [1],
    "prompt_embed_dim": 64,
    "mask_in_chans": 16,
    "decoder_depth": 2,
    "decoder_mlp_dim": 128,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 64,
}

Box = list[float]


def sam_from_config(config: dict) -> Sam:
    """An untrained SAM with the given architecture numbers (keys of ``TINY_SAM_CONFIG``)."""
    img_size, dim = config["img_size"], config["prompt_embed_dim"]
    grid = img_size // config["patch_size"]
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size,
            patch_size=config["patch_size"],
            embed_dim=config["encoder_embed_dim"],
            depth=config["encoder_depth"],
            num_heads=config["encoder_num_heads"],
            mlp_ratio=4,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=config["encoder_window_size"],
            global_attn_indexes=tuple(config["encoder_global_attn_indexes"]),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=config["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=config["decoder_depth"],
                embedding_dim=dim,
                mlp_dim=config["decoder_mlp_dim"],
                num_heads=config["decoder_num_heads"],
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=config["iou_head_hidden_dim"],
        ),
        # ImageNet statistics in 0-255 units, as the released models use.
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def build_tiny_sam(out_dir: Path, *, seed: int = 0) -> None:
    """Save a tiny random SAM (weights + architecture) to ``out_dir``, byte-identical per seed."""
    out_dir = Path(out_dir)
    # A private RNG stream: building a model must not reseed the caller's torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = sam_from_config(TINY_SAM_CONFIG)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), out_dir / WEIGHTS_NAME)
    card = {**TINY_SAM_CONFIG, "architecture": "Sam", "kind": "tiny random", "seed": seed}
    (out_dir / CONFIG_NAME).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")


def _unavailable(ref: ModelRef, checkpoint: str, why: Exception) -> ModelUnavailableError:
    revision = ref.revision or "main"
    return ModelUnavailableError(
        f"cannot load SAM {ref.id!r} (revision {revision}, checkpoint {checkpoint}): it is "
        f"neither a local folder with {CONFIG_NAME} nor a checkpoint in the Hugging Face cache "
        f"({why}). To fix: for a tiny model under resources/models/tiny-<arch>, build it with the "
        f"workflow's build_tiny_model rule (snakemake {ref.id}); for the real weights, run "
        f"`hf download {ref.id} {checkpoint} --revision {revision}` on a machine with network "
        "and make that Hugging Face cache visible here (HF_HOME)."
    )


def check_checkpoint(path: Path, name: str) -> None:
    """Meta names each SAM checkpoint after the start of its MD5 (``sam_vit_b_01ec64.pth``):
    a file from a hub mirror must match it, whatever revision the mirror is at."""
    expected = re.search(r"_([0-9a-f]{6})\.pth$", name)
    if expected is None:
        return
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
    if not md5.hexdigest().startswith(expected[1]):
        raise ModelUnavailableError(
            f"{path} is not Meta's {name}: its MD5 starts {md5.hexdigest()[:6]}, the name says "
            f"{expected[1]}. The mirror holds another file under that name; use one that "
            "holds the original checkpoint, or a local folder."
        )


def load_sam(
    ref: ModelRef,
    *,
    checkpoint: str = DEFAULT_CHECKPOINT,
    variant: str = DEFAULT_VARIANT,
    device: str | None = None,
) -> Sam:
    """Load SAM in eval mode; the same state-dict path for tiny folders and hub checkpoints.

    ``ref.id`` is either a folder written by ``build_tiny_sam`` (``checkpoint`` and ``variant``
    are then unused) or a Hugging Face repo holding an original segment-anything checkpoint:
    ``checkpoint`` is the file's path in the repo, ``variant`` its key in segment-anything's
    ``sam_model_registry`` (``vit_b``, ``vit_l``, ``vit_h``).
    """
    folder = Path(ref.id)
    config_file = folder / CONFIG_NAME
    try:
        if folder.exists():
            sam = sam_from_config(json.loads(config_file.read_text()))
            weights = folder / WEIGHTS_NAME
        else:
            weights = Path(hf_hub_download(ref.id, checkpoint, revision=ref.revision))
            check_checkpoint(weights, checkpoint)
            sam = sam_model_registry[variant]()
        # The released checkpoints are plain state dicts, so the safe loader suffices.
        state = torch.load(weights, map_location="cpu", weights_only=True)
    # A path-like id that does not exist is not a valid repo id either (HFValidationError).
    except (OSError, HFValidationError) as err:
        raise _unavailable(ref, checkpoint, err) from err
    sam.load_state_dict(state)
    return sam.to(device or default_device()).eval()


def _mask_box(mask: np.ndarray) -> Box | None:
    """The tight [x, y, w, h] pixel box of a boolean mask, or None when it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    x0, y0 = int(cols[0]), int(rows[0])
    return [float(x0), float(y0), float(cols[-1] + 1 - x0), float(rows[-1] + 1 - y0)]


class EncodeOnce(SamPredictor):
    """A ``SamPredictor`` that encodes each distinct image once.

    ``SamAutomaticMaskGenerator`` sets, and afterwards resets, the image it is given. With this
    predictor, an image already encoded for the box prompts is not encoded a second time for
    the automatic masks: the image encoder is nearly all of SAM's cost per image.
    """

    def __init__(self, sam: Sam) -> None:
        self._pixels: np.ndarray | None = None
        super().__init__(sam)

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        same = self._pixels is not None and self._pixels.shape == image.shape
        if same and np.array_equal(self._pixels, image):
            return
        super().set_image(image, image_format)
        self._pixels = image.copy()  # a copy: the caller may reuse its buffer

    def reset_image(self) -> None:
        # Keep the encoding until another image is set (only __init__ resets for real).
        if self._pixels is None:
            super().reset_image()


def box_prompt_masks(predictor: EncodeOnce, image: np.ndarray, boxes: list[Box]) -> np.ndarray:
    """SAM's single mask per [x, y, w, h] box prompt: boolean N x H x W in ``image``'s pixels.

    ``image`` is H x W x 3 uint8 RGB. The image is encoded once (or not at all, when
    ``predictor`` holds it already) and all boxes are decoded in one batch.
    """
    predictor.set_image(image)
    xywh = torch.as_tensor(boxes, dtype=torch.float, device=predictor.device)
    xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    prompts = predictor.transform.apply_boxes_torch(xyxy, image.shape[:2])
    masks, _, _ = predictor.predict_torch(None, None, boxes=prompts, multimask_output=False)
    return masks[:, 0].cpu().numpy()


def box_masks(predictor: EncodeOnce, image: np.ndarray, boxes: list[Box]) -> list[tuple[Box, int]]:
    """Per [x, y, w, h] box prompt: the tight box of SAM's mask and the mask's pixel area, in
    ``image``'s pixels (see ``box_prompt_masks``)."""
    if not boxes:
        return []
    results = []
    for box, mask in zip(boxes, box_prompt_masks(predictor, image, boxes), strict=True):
        # An empty mask has no box of its own: keep the prompt's, so each object keeps a region
        # (its zero area tells the caller SAM found nothing there).
        tight = _mask_box(mask)
        results.append((list(map(float, box)) if tight is None else tight, int(mask.sum())))
    return results


def _boxes_mask(boxes: list[Box], height: int, width: int) -> np.ndarray:
    """Boolean H x W union of the pixels that the [x, y, w, h] boxes touch."""
    union = np.zeros((height, width), dtype=bool)
    for x, y, w, h in boxes:
        x0, y0 = max(int(np.floor(x)), 0), max(int(np.floor(y)), 0)
        union[y0 : int(np.ceil(y + h)), x0 : int(np.ceil(x + w))] = True
    return union


def background_masks(
    predictor: EncodeOnce,
    image: np.ndarray,
    *,
    points_per_side: int,
    pred_iou_thresh: float,
    stability_score_thresh: float,
    min_area_fraction: float,
    covered: list[Box],
    max_covered_fraction: float = 0.5,
) -> list[tuple[Box, int]]:
    """Large automatic SAM masks mostly outside the ``covered`` object boxes, largest first.

    A mask is kept when its area is at least ``min_area_fraction`` of the image and at most
    ``max_covered_fraction`` of its pixels fall inside the union of ``covered``. Returns the
    tight [x, y, w, h] box and pixel area of each. The quality thresholds are SAM's own
    (0.88 / 0.95 suit the real model; a random tiny model only yields masks at 0).
    """
    height, width = image.shape[:2]
    generator = SamAutomaticMaskGenerator(
        predictor.model,
        points_per_side=points_per_side,
        pred_iou_thresh=pred_iou_thresh,
        stability_score_thresh=stability_score_thresh,
        output_mode="binary_mask",
    )
    generator.predictor = predictor  # reuse the box prompts' encoding of this image
    objects = _boxes_mask(covered, height, width)
    kept = []
    for record in generator.generate(image):
        mask = record["segmentation"]
        area = int(mask.sum())
        # At least one pixel: with the thresholds at 0, SAM may return empty masks.
        if area < max(min_area_fraction * height * width, 1):
            continue
        if (mask & objects).sum() > max_covered_fraction * area:
            continue
        kept.append((_mask_box(mask), area))
    return sorted(kept, key=lambda item: item[1], reverse=True)
