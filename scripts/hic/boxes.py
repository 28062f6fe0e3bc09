"""Box geometry in [x, y, w, h] pixels, shared by the stages that compare boxes (proposals,
selection, scoring against the demo world's reference)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def _valid_box(box: Sequence[float]) -> bool:
    return len(box) == 4 and all(math.isfinite(v) for v in box) and box[2] > 0 and box[3] > 0


def box_area(box: Sequence[float]) -> float:
    """Area of an [x, y, w, h] box; 0 when it is degenerate."""
    return float(box[2] * box[3]) if _valid_box(box) else 0.0


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x, y, w, h] boxes; 0 when either is degenerate."""
    if not (_valid_box(a) and _valid_box(b)):
        return 0.0
    inter_w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    inter_h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if inter_w <= 0 or inter_h <= 0:
        return 0.0
    inter = inter_w * inter_h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def clip_box(box: Sequence[float], width: int, height: int) -> list[float] | None:
    """The part of a box inside a width x height image, or None when nothing valid is left."""
    if not _valid_box(box):
        return None
    x0, y0 = max(0.0, float(box[0])), max(0.0, float(box[1]))
    x1, y1 = min(float(width), float(box[0] + box[2])), min(float(height), float(box[1] + box[3]))
    if x1 <= x0 or y1 <= y0:
        return None
    return [x0, y0, x1 - x0, y1 - y0]
