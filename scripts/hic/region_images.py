"""Regions shown to the VLM: the image with the region's box drawn on it, streamed per shard,
and the resumable loop of the stages that show them."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator
from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageDraw

from hic.images import read_images
from hic.parts import Mapped, PartStore, resumable_map
from hic.region_tables import check_complete, image_sizes, read_rows, write_rows

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
    tar: Path,
    regions: list[dict],
    sizes: dict[str, dict],
    colour: str,
    width: int,
    skip: Container[int] = frozenset(),
) -> Iterator[tuple[int, dict, Image.Image]]:
    """(index in ``regions``, region, image with its box) for every region not in ``skip``, in
    tar order, each image decoded once and only when it has a region to show.

    Regions of an image that no longer decodes are skipped; callers account for them."""
    by_key: dict[str, list[tuple[int, dict]]] = {}
    for i, region in enumerate(regions):
        if i not in skip:
            by_key.setdefault(region["key"], []).append((i, region))
    for key, image, _ in read_images(tar, only=by_key):
        if image is None:
            continue
        size = sizes[key]
        scale = (
            (size["original_width"] or image.width) / image.width,
            (size["original_height"] or image.height) / image.height,
        )
        for i, region in by_key[key]:
            yield i, region, draw_box(image, region["bbox"], scale, colour, width)


def map_region_views(
    stage: str,
    regions_path: Path,
    tar: Path,
    status: Path,
    out: Path,
    schema: pa.Schema,
    job: str,
    process: Callable[[list[tuple[dict, Image.Image]]], list[dict]],
    settings,
    flush_every: int,
) -> Mapped:
    """A region stage that shows the VLM each region's box: ``process`` turns a batch of
    (region, drawn image) into one row each; the rows go to ``out`` in tar order.

    Resumable (``hic.parts``): a unit is a region, by its row index in ``regions_path``;
    ``job`` is the fingerprint of everything that decides the rows; ``settings`` gives
    ``box_colour``, ``box_width`` and ``batch_size``."""
    regions = read_rows(regions_path)
    sizes = image_sizes(status)
    store = PartStore.beside(out, job, schema)
    mapped = resumable_map(
        store,
        lambda done: region_views(
            tar, regions, sizes, settings.box_colour, settings.box_width, skip=done
        ),
        lambda view: view[0],
        lambda batch: [[row] for row in process([(region, image) for _, region, image in batch])],
        settings.batch_size,
        flush_every,
    )
    check_complete(regions, mapped.rows, stage)
    write_rows(mapped.rows, schema, out)
    store.remove()
    return mapped


def fill(template: str, **values: str) -> str:
    """Fill ``{name}`` fields by replacement, so other braces in a prompt survive."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template
