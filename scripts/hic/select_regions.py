"""Choose the key regions of an image from its candidate proposals.

HIC-12M captions a handful of regions per image: the key foreground objects plus the background
region that sets the scene ("sea / man / surfboard"). Upstream stages propose candidates, dicts
with ``label``, ``bbox`` ([x, y, w, h] in pixels of the original image), ``score``, ``source``,
``mask_area`` and ``kind`` ("foreground" or "background"). ``select`` reduces them to the key
regions in six deterministic steps:

1. Validity. A proposal is dropped when its box is not four finite numbers with positive width
   and height, its score is not finite, or its label is blank. Boxes are clipped to the image;
   one left with no area inside it is dropped. The output carries the clipped box.
2. Filters. Keep ``score >= min_score`` (the default 0 keeps the tiny or zero scores of random
   test models) and a clipped box area between ``min_area_fraction`` and ``max_area_fraction``
   of the image, both inclusive: slivers are too small to caption and a box covering the whole
   frame says nothing the scene caption does not.
3. NMS. Greedy, class-agnostic non-maximum suppression at IoU > ``nms_iou``, run separately per
   kind because a background region legitimately contains the objects standing on it.
4. Label de-duplication. Per kind, only the best-ranked proposal (step 5's order) of each label
   survives; labels compare case-insensitively with whitespace runs collapsed, so two "Dog"
   boxes far apart yield one "dog" region rather than two near-identical captions.
5. Ranking. Foreground by score, then box area. Background by score * box area, then box area:
   a background region is chosen for how much of the scene it explains, so a confident sliver
   of sky must not beat a confident expanse of sea, and when all scores are equal (or all 0)
   the largest region wins. Remaining ties keep the input order.
6. Selection. Up to ``max_regions`` regions. With ``background_slot``, one slot is kept for the
   best background region when one survives; foreground fills the other slots, and background
   fills any slots the foreground leaves empty. Output order: foreground by rank, then
   background by rank; each region is a copy of its proposal with the clipped ``bbox`` and a
   0-based ``rank`` (its output position). Inputs are never modified.

``match_pairs``, ``match_regions`` and ``recall_precision`` score a selection against reference
boxes (the demo world's annotations) by one-to-one matching at an IoU threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hic.boxes import box_area, clip_box, iou
from hic.region_tables import SELECTED_SCHEMA, image_groups, image_sizes, write_groups
from hic.text import normalise_label

KINDS = ("foreground", "background")


@dataclass(frozen=True)
class SelectSettings:
    max_regions: int = 3
    min_area_fraction: float = 0.01
    max_area_fraction: float = 0.95
    min_score: float = 0.0
    nms_iou: float = 0.5
    background_slot: bool = True

    def __post_init__(self) -> None:
        if self.max_regions < 0:
            raise ValueError(f"max_regions must be >= 0, got {self.max_regions}")
        if not 0.0 <= self.min_area_fraction <= self.max_area_fraction <= 1.0:
            raise ValueError(
                "need 0 <= min_area_fraction <= max_area_fraction <= 1, got "
                f"{self.min_area_fraction}, {self.max_area_fraction}"
            )
        if not 0.0 <= self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in [0, 1], got {self.nms_iou}")


def _fg_key(p: dict) -> tuple[float, float]:
    return (-p["score"], -box_area(p["bbox"]))


def _bg_key(p: dict) -> tuple[float, float]:
    area = box_area(p["bbox"])
    return (-p["score"] * area, -area)


RANK_KEYS: dict[str, Callable[[dict], tuple[float, float]]] = {
    "foreground": _fg_key,
    "background": _bg_key,
}


def _check_kinds(proposals: list[dict]) -> None:
    unknown = {p["kind"] for p in proposals} - set(KINDS)
    if unknown:
        raise ValueError(f"unknown region kind(s) {sorted(unknown)}; expected one of {KINDS}")


def _greedy_nms(proposals: list[dict], indices: list[int], iou_threshold: float) -> list[int]:
    # sorted() is stable, so equal score and area fall back to input order.
    kept: list[int] = []
    for i in sorted(indices, key=lambda i: _fg_key(proposals[i])):
        box = proposals[i]["bbox"]
        if all(iou(box, proposals[k]["bbox"]) <= iou_threshold for k in kept):
            kept.append(i)
    return kept


def nms(proposals: list[dict], iou_threshold: float) -> list[dict]:
    """Greedy class-agnostic NMS by score (ties: larger box, then input order), per kind.

    A proposal is suppressed when its IoU with a better kept one of the same kind exceeds
    ``iou_threshold``. Survivors are returned in their input order, unchanged.
    """
    _check_kinds(proposals)
    kept: set[int] = set()
    for kind in KINDS:
        indices = [i for i, p in enumerate(proposals) if p["kind"] == kind]
        kept.update(_greedy_nms(proposals, indices, iou_threshold))
    return [p for i, p in enumerate(proposals) if i in kept]


def _clean(proposal: dict, width: int, height: int) -> dict | None:
    box = clip_box(proposal["bbox"], width, height)
    score = proposal["score"]
    if box is None or score is None or not math.isfinite(score) or not proposal["label"].strip():
        return None
    return {**proposal, "bbox": box}


def _passes_filters(proposal: dict, image_area: float, settings: SelectSettings) -> bool:
    fraction = box_area(proposal["bbox"]) / image_area
    return (
        proposal["score"] >= settings.min_score
        and settings.min_area_fraction <= fraction <= settings.max_area_fraction
    )


def _ranked_unique_labels(proposals: list[dict], kind: str) -> list[dict]:
    ranked = sorted((p for p in proposals if p["kind"] == kind), key=RANK_KEYS[kind])
    seen: set[str] = set()
    unique = []
    for p in ranked:
        label = normalise_label(p["label"])
        if label not in seen:
            seen.add(label)
            unique.append(p)
    return unique


def _slots(n_fg: int, n_bg: int, settings: SelectSettings) -> tuple[int, int]:
    """How many foreground and background regions to take."""
    reserved = 1 if settings.background_slot and n_bg > 0 and settings.max_regions > 0 else 0
    take_fg = min(n_fg, settings.max_regions - reserved)
    return take_fg, min(n_bg, settings.max_regions - take_fg)


def select(proposals: list[dict], width: int, height: int, settings: SelectSettings) -> list[dict]:
    """The key regions of a width x height image (see the module docstring for the rules)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    _check_kinds(proposals)
    image_area = float(width * height)
    cleaned = [c for p in proposals if (c := _clean(p, width, height)) is not None]
    filtered = [p for p in cleaned if _passes_filters(p, image_area, settings)]
    survivors = nms(filtered, settings.nms_iou)
    foreground = _ranked_unique_labels(survivors, "foreground")
    background = _ranked_unique_labels(survivors, "background")
    take_fg, take_bg = _slots(len(foreground), len(background), settings)
    chosen = foreground[:take_fg] + background[:take_bg]
    return [{**p, "rank": rank} for rank, p in enumerate(chosen)]


def select_shard(
    proposals: Path, status: Path, out: Path, settings: SelectSettings
) -> dict[str, int]:
    """Select every image's regions from a proposals table into ``out`` (SELECTED_SCHEMA),
    one image at a time: memory holds a batch of rows, not the shard's."""
    sizes = image_sizes(status)
    chosen = (
        select(rows, *_original_size(sizes[rows[0]["key"]]), settings)
        for rows in image_groups(proposals)
    )
    images, regions = write_groups(chosen, SELECTED_SCHEMA, out)
    return {"images": images, "regions": regions}


def _original_size(size: dict) -> tuple[int, int]:
    return size["original_width"], size["original_height"]


def match_pairs(
    predicted: list[list[float]], reference: list[list[float]], iou_threshold: float = 0.5
) -> list[tuple[int, int]]:
    """One-to-one (predicted index, reference index) matches at IoU >= iou_threshold.

    Pairs are taken greedily by IoU, highest first (ties: lower predicted, then reference
    index), each box matching at most once. The threshold must be in (0, 1] so that disjoint
    boxes never match. Returned in the order they were taken.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    pairs = [
        (overlap, i, j)
        for i, p in enumerate(predicted)
        for j, r in enumerate(reference)
        if (overlap := iou(p, r)) >= iou_threshold
    ]
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    used_pred: set[int] = set()
    used_ref: set[int] = set()
    matches = []
    for _, i, j in pairs:
        if i not in used_pred and j not in used_ref:
            used_pred.add(i)
            used_ref.add(j)
            matches.append((i, j))
    return matches


def match_regions(
    predicted: list[list[float]], reference: list[list[float]], iou_threshold: float = 0.5
) -> int:
    """How many one-to-one matches ``match_pairs`` finds."""
    return len(match_pairs(predicted, reference, iou_threshold))


def recall_precision(
    matches: int, n_predicted: int, n_reference: int
) -> tuple[float | None, float | None]:
    """(recall, precision) of a matching; each is None when its denominator is 0."""
    if min(matches, n_predicted, n_reference) < 0 or matches > min(n_predicted, n_reference):
        raise ValueError(
            f"inconsistent counts: {matches} matches, {n_predicted} predicted, "
            f"{n_reference} reference"
        )
    recall = matches / n_reference if n_reference else None
    precision = matches / n_predicted if n_predicted else None
    return recall, precision
