"""The demo VLM measured on held-out scenes through each VLM stage's own code.

Every figure comes from the stage's function on the stage's settings: ``caption_batch`` of
``caption_scene`` scored as ``dataset_stats`` scores a release; ``verify_batch`` (verdicts from
``choice_probabilities``, corrections generated and parsed); ``caption_batch`` of
``caption_regions`` (judged by its word range and output checks); ``refine_batch`` (its
validator decides between the LLM path and the fallback). Regions are the scenes' reference
regions (every object and both bands) with their boxes drawn by the stage's own code; the
region stages are fed in batches of their ``batch_size``, as ``map_region_views`` feeds them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hic import demo_vlm_examples as ex
from hic import demo_world as dw
from hic.caption_regions import RegionCaptionSettings
from hic.caption_regions import caption_batch as caption_region_batch
from hic.caption_scene import CaptionSettings, caption_batch
from hic.dataset_stats import scene_caption_scores
from hic.demo_training_vlm import EVAL_STREAM, answer_loss
from hic.models import ModelRef
from hic.refine_regions import refine_batch, split_label
from hic.verify_labels import VerifySettings, verify_batch
from hic.vlm import make_backend

#: The refinement stage's schema default; config.yaml sets only its token budget.
REFINE_BATCH = 16


def stage_backend(model_dir: Path, caption: CaptionSettings):
    """The transformers backend as the VLM stages load it: caption_scene's pixel limits and
    decoding (``vlm_options``), one ``generate`` call per stage batch."""
    return make_backend(
        "transformers",
        ModelRef(str(model_dir)),
        min_pixels=caption.min_pixels,
        max_pixels=caption.max_pixels,
        decoding=caption.decoding(),
    )


def in_batches(items: list, size: int, process: Callable[[list], list]) -> list:
    return [row for k in range(0, len(items), size) for row in process(items[k : k + size])]


def share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else math.nan


@dataclass(frozen=True)
class HeldOut:
    """A reference region of held-out scene ``scene`` (its ``index`` in ``dw.regions``), with
    a wrong label: any other thing class (objects) or band name (bands), drawn uniformly; and
    one that the image shows outside the box, when there is one (None otherwise)."""

    scene: int
    index: int
    region: dict
    wrong: str
    elsewhere: str | None


def held_out_regions(scenes: Sequence[dw.Scene], seed: int = 0) -> list[HeldOut]:
    rng = np.random.default_rng([EVAL_STREAM, seed, 2])
    held = []
    for i, scene in enumerate(scenes):
        for j, region in enumerate(dw.regions(scene)):
            wrong = ex.wrong_label(region, scene, rng, hard=0.0)
            elsewhere = ex.shown_elsewhere(region, scene)
            hard = elsewhere[int(rng.integers(len(elsewhere)))] if elsewhere else None
            held.append(HeldOut(i, j, {**region, "key": f"{i:04d}"}, wrong, hard))
    return held


def drawn_views(scenes, held: list[HeldOut], box: ex.Box) -> list:
    images = {i: dw.as_downloaded(scene) for i, scene in enumerate(scenes)}
    return [ex.drawn_view(images[h.scene], h.region, box) for h in held]


def by_kind(held: list[HeldOut], flags: list[bool]) -> dict[str, float]:
    """The share of ``flags`` overall and per region kind."""
    kinds = [h.region["kind"] for h in held]
    return {"all": share(flags)} | {
        k: share([f for f, kk in zip(flags, kinds, strict=True) if kk == k])
        for k in ("foreground", "background")
    }


def evaluate_verification(backend, prompts: dict[str, str], scenes, settings: VerifySettings):
    """Each region asked with its true label and with a wrong one through ``verify_batch``:
    true labels accepted, wrong ones rejected, verdicts answered (P(yes) + P(no) at least
    ``min_answer_mass``), and wrong labels corrected to the true name. Regions whose image
    shows another thing (or band) are also asked with that one's name: rejecting it needs
    what is inside the box, not what the image holds."""
    held = held_out_regions(scenes)
    views = drawn_views(scenes, held, ex.Box(settings.box_colour, settings.box_width))
    asked = [
        ({**h.region, "label": label}, view)
        for h, view in zip(held, views, strict=True)
        for label in (h.region["label"], h.wrong)
    ]
    hard = [(h, view) for h, view in zip(held, views, strict=True) if h.elsewhere]
    asked += [({**h.region, "label": h.elsewhere}, view) for h, view in hard]
    rows = in_batches(
        asked, settings.batch_size, lambda b: verify_batch(b, backend, prompts, settings)
    )
    pairs, hard_rows = rows[: 2 * len(held)], rows[2 * len(held) :]
    true_rows, wrong_rows = pairs[0::2], pairs[1::2]

    def answered(row: dict) -> bool:
        return not (row["verify_reason"] or "").startswith("no yes/no answer")

    truth = [h.region["label"] for h in held]
    return {
        "accept_true": by_kind(held, [r["verdict"] == "accurate" for r in true_rows]),
        "reject_wrong": by_kind(
            held, [answered(r) and r["verdict"] != "accurate" for r in wrong_rows]
        ),
        "reject_shown_elsewhere": by_kind(
            [h for h, _ in hard], [answered(r) and r["verdict"] != "accurate" for r in hard_rows]
        ),
        "answered": share([answered(r) for r in pairs]),
        "corrected_right": by_kind(
            held,
            [
                r["verdict"] == "corrected" and r["label"] == t
                for r, t in zip(wrong_rows, truth, strict=True)
            ],
        ),
        "examples": [
            (r["original_label"], r["verdict"], r["label"], t)
            for r, t in zip(wrong_rows[:6], truth, strict=False)
        ],
    }


def names_region(description: str, h: HeldOut, scene: dw.Scene) -> tuple[bool, bool]:
    """(names the class, names colour and class) in a region caption's description: an
    object's class and its "<colour> <class>"; a band's reference description (which names
    the band, and its colour where it has one) for both."""
    text = description.lower()
    if h.region["kind"] == "background":
        named = dw.BANDS[h.region["label"]].description.lower() in text
        return named, named
    o = scene.objects[h.index]
    return bool(re.search(rf"\b{o.label}\b", text)), f"{o.colour} {o.label}" in text


def evaluate_region_captions(backend, prompt: str, scenes, settings: RegionCaptionSettings):
    """Region captions of every region (its true label in the prompt) through the stage's
    ``caption_batch``: ``ok`` by its judging, and whether the description names the region."""
    held = held_out_regions(scenes)
    views = drawn_views(scenes, held, ex.Box(settings.box_colour, settings.box_width))
    pairs = [(h.region, view) for h, view in zip(held, views, strict=True)]
    rows = in_batches(
        pairs, settings.batch_size, lambda b: caption_region_batch(b, backend, prompt, settings)
    )
    named = [
        names_region(split_label(row["raw_caption"], row["label"])[1], h, scenes[h.scene])
        if row["raw_caption"]
        else (False, False)
        for row, h in zip(rows, held, strict=True)
    ]
    return {
        "ok": by_kind(held, [r["caption_status"] == "ok" for r in rows]),
        "names_class": by_kind(held, [n[0] for n in named]),
        "names_colour_and_class": by_kind(held, [n[1] for n in named]),
        "examples": [(r["raw_caption"] or r["caption_model_output"]) for r in rows[:4]],
    }


def evaluate_refinement(backend, template: str, scenes, max_new_tokens: int, seed: int = 0):
    """Raw region captions as a VLM writes them (the reference caption, "<Label>." opening,
    the drawn box mentioned: ``raw_region_caption``) refined through ``refine_batch``: the
    share its validator takes from the LLM path, and the share equal to the reference."""
    rng = np.random.default_rng([EVAL_STREAM, seed, 3])
    box = ex.Box()
    regions = [
        {**h.region, "raw_caption": ex.raw_region_caption(h.region, rng, box)}
        for h in held_out_regions(scenes)
    ]
    rows = in_batches(
        regions, REFINE_BATCH, lambda b: refine_batch(b, backend, template, max_new_tokens, "")
    )
    llm = [r["refine_path"] == "llm" for r in rows]
    return {
        "llm_path": share(llm),
        "exact": share(
            [
                ok and r["caption"] == g["caption"]
                for ok, r, g in zip(llm, rows, regions, strict=True)
            ]
        ),
        "reasons": [r["refine_reason"] for r in rows if r["refine_path"] != "llm"][:4],
    }


def evaluate_captions(backend, prompts: dict[str, str], scenes, settings: CaptionSettings):
    """Scene captions of held-out scenes through the stage's own code (its backend, prompts,
    budgets, judging) scored as ``dataset_stats`` scores a release against the reference."""
    images = [(f"{i:04d}", dw.as_downloaded(s)) for i, s in enumerate(scenes)]
    rows = in_batches(images, 32, lambda b: caption_batch(backend, b, prompts, settings, {}))
    pairs = [
        (
            {"short_caption": r["short_caption"], "scene_status": r["status"]},
            {"short_caption": dw.short_caption(s), "regions": dw.regions(s)},
        )
        for r, s in zip(rows, scenes, strict=True)
    ]
    scores = scene_caption_scores(pairs, list(dw.COLOURS)).iloc[0].to_dict()
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return scores | {
        "status": statuses,
        "examples": [
            (r["short_caption"], dw.short_caption(s))
            for r, s in zip(rows[:3], scenes[:3], strict=True)
        ],
    }


def evaluate_model(model_dir: Path, prompts: dict[str, str], scenes, config: dict) -> dict:
    """Every stage's figures for one model; ``config`` holds config.yaml's sections of the
    VLM stages (a missing one takes the schema's defaults)."""
    caption = CaptionSettings(**config.get("caption_scene", {}))
    backend = stage_backend(model_dir, caption)
    backend.batch_size = caption.batch_size  # caption_scene's batching; region stages batch
    captions = evaluate_captions(backend, prompts, scenes, caption)
    backend.batch_size = None
    refine = config.get("refine_regions", {})
    return {
        "captions": captions,
        "verify": evaluate_verification(
            backend, prompts, scenes, VerifySettings(**config.get("verify_labels", {}))
        ),
        "regions": evaluate_region_captions(
            backend,
            prompts["region"],
            scenes,
            RegionCaptionSettings(**config.get("caption_regions", {})),
        ),
        "refine": evaluate_refinement(
            backend, prompts["refine"], scenes, refine.get("max_new_tokens", 256)
        ),
    }


def held_out_losses(model, batches) -> dict[str, float]:
    """The model's loss on one held-out batch of each task (``Batches`` on ``EVAL_STREAM``)."""
    with torch.inference_mode():
        return {
            task: float(answer_loss(model, b.inputs)) for task, b in batches.tasks(0)[1].items()
        }


def random_share(scenes: Sequence[dw.Scene]) -> float:
    """Objects named by always naming the three commonest classes of ``scenes``: guessing."""
    counts: dict[str, int] = {}
    for s in scenes:
        for o in s.objects:
            counts[o.label] = counts.get(o.label, 0) + 1
    top = sorted(counts, key=counts.get, reverse=True)[:3]
    total = sum(counts.values())
    return sum(counts[c] for c in top) / total if total else math.nan
