"""Regions shown to the VLM: the image with the region's box drawn on it, streamed per shard."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw

from hic.caption_scene import read_images

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 60), "blue": (40, 90, 240)}


def draw_box(
    image: Image.Image, bbox: list[float], scale: tuple[float, float], colour: str, width: int
) -> Image.Image:
    """A copy of ``image`` with ``bbox`` ([x, y, w, h] in ORIGINAL pixels) outlined.

    ``scale`` is original / stored pixels per axis: the box is drawn on the stored image."""
    x, y, w, h = bbox
    sx, sy = scale
    drawn = image.copy()
    ImageDraw.Draw(drawn).rectangle(
        [x / sx, y / sy, (x + w) / sx, (y + h) / sy], outline=COLOURS[colour], width=width
    )
    return drawn


def region_views(
    tar: Path, regions: list[dict], sizes: dict[str, dict], colour: str, width: int
) -> Iterator[tuple[dict, Image.Image]]:
    """(region, image with its box) for every region, in tar order, each image decoded once.

    Regions of an image that no longer decodes are skipped; callers account for them."""
    by_key: dict[str, list[dict]] = {}
    for region in regions:
        by_key.setdefault(region["key"], []).append(region)
    for key, image, _ in read_images(tar, set()):
        if image is None or key not in by_key:
            continue
        size = sizes[key]
        scale = (
            (size["original_width"] or image.width) / image.width,
            (size["original_height"] or image.height) / image.height,
        )
        for region in by_key[key]:
            yield region, draw_box(image, region["bbox"], scale, colour, width)


def fill(template: str, **values: str) -> str:
    """Fill ``{name}`` fields by replacement, so other braces in a prompt survive."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template
