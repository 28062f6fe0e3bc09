"""Region-specific dense captions, shaped ``<label>. <description>.``, with the box drawn.

The answer is cleaned like a scene caption and must read as text of a sensible length; one
that does not start with its label gets the label prefixed (the raw text is kept), so every
``ok`` caption has the shape the refinement stage expects. An answer cut off at the token
limit is ``truncated`` and a looping one ``repetitive``: neither gets a full stop appended.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from hic.parts import file_identity, fingerprint, settings_identity
from hic.refine_regions import split_label
from hic.region_images import fill, map_region_views
from hic.region_tables import CAPTIONED_SCHEMA
from hic.text import output_problem, parse_caption


@dataclass(frozen=True)
class RegionCaptionSettings:
    """The config's ``caption_regions`` section."""

    box_colour: str = "red"
    box_width: int = 3
    batch_size: int = 8
    # The paper's region captions: 2-5 sentences, 50-90 words; accepted a little wider.
    max_new_tokens: int = 192
    words: list[int] = field(default_factory=lambda: [25, 130])


def shape_caption(caption: str, label: str) -> str:
    """``<Label>. <description>`` with a final full stop.

    The label counts as present only as an opening that ``split_label`` separates ("Dog. A
    brown dog", "Dog: ..."); "Doghouse in the garden" or "Dog lying on grass" get it prefixed.
    """
    if split_label(caption, label)[1] == caption.strip():
        caption = f"{label.strip().capitalize()}. {caption}"
    return caption if caption.endswith((".", "!", "?")) else caption + "."


def judge_caption(text: str, truncated: bool, words) -> tuple[str | None, str, str | None]:
    """(caption, status, reason) of one generated region caption."""
    if problem := output_problem(text, truncated):
        return None, *problem
    caption, reason = parse_caption(text, "region", words)
    return caption, "ok" if caption else "unparsed", reason


def caption_batch(
    views: list[tuple[dict, Image.Image]],
    backend,
    prompt: str,
    settings: RegionCaptionSettings,
) -> list[dict]:
    """``views``: (region, drawn image) pairs; returns the regions with a caption each."""
    generation = json.dumps(
        backend.decoding.effective() | {"max_new_tokens": settings.max_new_tokens}, sort_keys=True
    )
    regions, images = [r for r, _ in views], [im for _, im in views]
    outputs = backend.generate(
        images,
        [fill(prompt, label=r["label"], colour=settings.box_colour) for r in regions],
        settings.max_new_tokens,
    )
    rows = []
    for region, output in zip(regions, outputs, strict=True):
        caption, status, reason = judge_caption(output.text, output.truncated, settings.words)
        rows.append(
            {
                **region,
                "raw_caption": shape_caption(caption, region["label"]) if caption else None,
                "caption_status": status,
                "caption_reason": reason,
                "caption_model_output": None if caption else output.text,
                "caption_generation": generation,
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
