"""Region-specific dense captions, shaped ``<label>. <description>.``, with the box drawn.

The answer is cleaned like a scene caption and must read as text of a sensible length; one
that does not start with its label gets the label prefixed (the raw text is kept), so every
``ok`` caption has the shape the refinement stage expects. An answer cut off at the token
limit is ``truncated`` and a looping one ``repetitive``: neither gets a full stop appended.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from hic.caption_scene import batches, parse_caption
from hic.refine_regions import split_label
from hic.region_images import fill
from hic.text import output_problem


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


def caption_regions(views, backend, prompt: str, settings: RegionCaptionSettings) -> list[dict]:
    generation = json.dumps(
        backend.decoding.effective() | {"max_new_tokens": settings.max_new_tokens}, sort_keys=True
    )
    rows = []
    for batch in batches(iter(views), settings.batch_size):
        regions, images = [r for r, _ in batch], [im for _, im in batch]
        outputs = backend.generate(
            images,
            [fill(prompt, label=r["label"], colour=settings.box_colour) for r in regions],
            settings.max_new_tokens,
        )
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
