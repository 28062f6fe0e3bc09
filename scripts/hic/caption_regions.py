"""Region-specific dense captions, shaped ``<label>. <description>.``, with the box drawn.

The answer is cleaned like a scene caption and must read as text of a sensible length; one
that does not start with its label gets the label prefixed (the raw text is kept), so every
``ok`` caption has the shape the refinement stage expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from hic.caption_scene import parse_caption
from hic.parts import file_identity, fingerprint, settings_identity
from hic.refine_regions import split_label
from hic.region_images import fill, map_region_views
from hic.region_tables import CAPTIONED_SCHEMA


@dataclass(frozen=True)
class RegionCaptionSettings:
    """The config's ``caption_regions`` section."""

    box_colour: str = "red"
    box_width: int = 3
    batch_size: int = 8
    max_new_tokens: int = 96
    words: list[int] = field(default_factory=lambda: [4, 120])


def shape_caption(caption: str, label: str) -> str:
    """``<Label>. <description>`` with a final full stop.

    The label counts as present only as an opening that ``split_label`` separates ("Dog. A
    brown dog", "Dog: ..."); "Doghouse in the garden" or "Dog lying on grass" get it prefixed.
    """
    if split_label(caption, label)[1] == caption.strip():
        caption = f"{label.strip().capitalize()}. {caption}"
    return caption if caption.endswith((".", "!", "?")) else caption + "."


def caption_batch(
    views: list[tuple[dict, Image.Image]],
    backend,
    prompt: str,
    settings: RegionCaptionSettings,
) -> list[dict]:
    """``views``: (region, drawn image) pairs; returns the regions with a caption each."""
    regions, images = [r for r, _ in views], [im for _, im in views]
    texts = backend.generate(
        images,
        [fill(prompt, label=r["label"], colour=settings.box_colour) for r in regions],
        settings.max_new_tokens,
    )
    rows = []
    for region, text in zip(regions, texts, strict=True):
        caption, reason = parse_caption(text, "region", settings.words)
        rows.append(
            {
                **region,
                "raw_caption": shape_caption(caption, region["label"]) if caption else None,
                "caption_status": "ok" if caption else "unparsed",
                "caption_reason": reason,
                "caption_model_output": None if caption else text,
            }
        )
    return rows


def caption_regions_shard(
    regions: Path,
    tar: Path,
    status: Path,
    out: Path,
    prompt: str,
    settings: RegionCaptionSettings,
    backend,
    identity: dict,
    flush_every: int = 8,
) -> dict:
    """Caption every verified region of a shard into ``out`` (CAPTIONED_SCHEMA), resumably.

    ``identity`` names what else decides the rows (model reference, backend and its options);
    with the prompt's text, the settings and the inputs it fingerprints the flushed parts."""
    job = fingerprint(
        identity, prompt, settings_identity(settings), file_identity([regions, tar, status])
    )
    mapped = map_region_views(
        "caption_regions",
        regions,
        tar,
        status,
        out,
        CAPTIONED_SCHEMA,
        job,
        lambda views: caption_batch(views, backend, prompt, settings),
        settings,
        flush_every,
    )
    return {
        "regions": len(mapped.rows),
        "ok": sum(r["caption_status"] == "ok" for r in mapped.rows),
        "resumed_regions": mapped.resumed_units,
    }
