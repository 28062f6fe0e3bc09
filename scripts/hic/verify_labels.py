"""Label verification: is the label right for the object in the drawn box? If not, what is it?

The verdict is read from the model's likelihoods, not parsed from free text: one forward pass
gives P(yes) and P(no) for the answer's first token (``choice_probabilities``). When together
they hold less than ``min_answer_mass`` of the distribution the model is not answering the
question (a random or broken model, a prompt it misreads): the region is ``unparsed``. Else the
label is accurate when P(yes) / (P(yes) + P(no)) ≥ ``accept``. Only rejected labels get a
second, generated question for the corrected name, which must parse as a short name other than
the label; otherwise the region is ``unparsed`` and keeps its label. A corrected label replaces
the label; ``original_label`` keeps the detector's; ``verify_reason`` says why a region is
``unparsed``, starting ``truncated:`` or ``repetitive:`` when the correction was cut off at
its token limit or looped (its decoding is recorded in ``correct_generation``).

To measure all this, about a share ``plant_wrong`` of the regions can be shown to the model
with a deliberately wrong label in place of their own (``planted_wrong_label``); the row's
``planted_label`` records it, and it stays the label unless the model corrects it. The demo
world scores how many planted labels are rejected and corrected back (``hic.dataset_stats``).
The default plants none.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from hic.parts import file_identity, fingerprint, settings_identity
from hic.region_images import fill, map_region_views
from hic.region_tables import VERIFIED_SCHEMA
from hic.text import normalise_label, output_problem


@dataclass(frozen=True)
class VerifySettings:
    """The config's ``verify_labels`` section."""

    box_colour: str = "red"
    box_width: int = 3
    accept: float = 0.5
    min_answer_mass: float = 0.5
    batch_size: int = 8
    max_new_tokens: int = 8
    max_label_words: int = 4
    plant_wrong: float = 0.0
    plant_seed: int = 0


#: Region kind -> the vocabulary list a wrong label for it is drawn from.
PLANT_LISTS = {"foreground": "things", "background": "stuff"}


def parse_label(text: str, max_words: int) -> str | None:
    """A short lowercase noun phrase from a generated answer, or None."""
    text = re.sub(r"^(it is|this is|that is|the object is)\s+", "", text.strip(), flags=re.I)
    text = re.sub(r"^(an?|the)\s+", "", text.strip(" .!\"'\n"), flags=re.I)
    words = text.lower().split()
    if (
        not words
        or len(words) > max_words
        or not all(re.fullmatch(r"[a-z][a-z-]*", w) for w in words)
    ):
        return None
    return " ".join(words)


def _draws(seed: int, region: dict) -> tuple[float, int]:
    """Two numbers fixed by the seed and the region alone (image key, kind, box, label), so a
    region draws the same whatever its batch, shard or resumed run: a uniform one in [0, 1)
    and a large integer."""
    identity = [seed, region["key"], region["kind"], region["bbox"], region["label"]]
    digest = hashlib.sha256(json.dumps(identity).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64, int.from_bytes(digest[8:16], "big")


def planted_wrong_label(
    region: dict, share: float, seed: int, vocabulary: Mapping[str, Sequence[str]] | None
) -> str | None:
    """The wrong label shown in place of ``region``'s own, for about ``share`` of regions, else
    None: a name of the region's kind (``PLANT_LISTS``) other than its label."""
    if share <= 0:
        return None
    draw, pick = _draws(seed, region)
    if draw >= share:
        return None
    if region["kind"] not in PLANT_LISTS:
        raise ValueError(f"cannot plant a label on a region of kind {region['kind']!r}")
    if vocabulary is None:
        raise ValueError(f"verify_labels.plant_wrong is {share}, but no vocabulary was given")
    own = normalise_label(region["label"])
    names = sorted({normalise_label(n) for n in vocabulary[PLANT_LISTS[region["kind"]]]} - {own})
    if not names:
        raise ValueError(f"no {PLANT_LISTS[region['kind']]} name other than {own!r} to plant")
    return names[pick % len(names)]


def verify_batch(
    views: list[tuple[dict, Image.Image]],
    backend,
    prompts: dict[str, str],
    settings: VerifySettings,
    vocabulary: Mapping[str, Sequence[str]] | None = None,
) -> list[dict]:
    """``views``: (region, drawn image) pairs; returns the regions with a verdict each.

    ``vocabulary`` (things and stuff) is where planted wrong labels come from, when
    ``settings.plant_wrong`` asks for some."""
    generation = json.dumps(
        backend.decoding.effective() | {"max_new_tokens": settings.max_new_tokens}, sort_keys=True
    )
    regions, images = [r for r, _ in views], [im for _, im in views]
    planted = [
        planted_wrong_label(r, settings.plant_wrong, settings.plant_seed, vocabulary)
        for r in regions
    ]
    # The label the model is asked about: the planted one where there is one.
    labels = [p or r["label"] for p, r in zip(planted, regions, strict=True)]
    questions = [fill(prompts["verify"], label=x, colour=settings.box_colour) for x in labels]
    probs = backend.choice_probabilities(images, questions, ("yes", "no"))
    mass = [p["yes"] + p["no"] for p in probs]
    answered = [m >= settings.min_answer_mass and m > 0 for m in mass]
    p_yes = [p["yes"] / m if m > 0 else None for p, m in zip(probs, mass, strict=True)]
    rejected = [i for i, p in enumerate(p_yes) if answered[i] and p < settings.accept]
    answers = {}
    if rejected:
        outputs = backend.generate(
            [images[i] for i in rejected],
            [
                fill(prompts["correct"], label=labels[i], colour=settings.box_colour)
                for i in rejected
            ],
            settings.max_new_tokens,
        )
        answers = dict(zip(rejected, outputs, strict=True))
    rows = []
    for i, region in enumerate(regions):
        row = {**region, "label": labels[i], "original_label": region["label"]}
        row.update(planted_label=planted[i], p_accurate=p_yes[i])
        row["verify_reason"] = None
        row["correct_generation"] = generation if i in answers else None
        if not answered[i]:
            row.update(
                verdict="unparsed",
                verify_reason=f"no yes/no answer (P(yes) + P(no) = {mass[i]:.3g})",
            )
        elif i not in answers:
            row["verdict"] = "accurate"
        elif problem := output_problem(answers[i].text, answers[i].truncated):
            status, reason = problem
            row.update(verdict="unparsed", verify_reason=f"{status}: correction {reason}")
        elif (corrected := parse_label(answers[i].text, settings.max_label_words)) is None:
            row.update(
                verdict="unparsed", verify_reason=f"correction {answers[i].text!r} is no label"
            )
        elif corrected == labels[i].strip().lower():
            row.update(verdict="unparsed", verify_reason="rejected, then named the same label")
        else:
            row.update(verdict="corrected", label=corrected)
        rows.append(row)
    return rows


def verify_shard(
    regions: Path,
    tar: Path,
    status: Path,
    out: Path,
    prompts: dict[str, str],
    settings: VerifySettings,
    backend,
    identity: dict,
    flush_every: int = 8,
    vocabulary: Mapping[str, Sequence[str]] | None = None,
) -> dict:
    """Verify every selected region of a shard into ``out`` (VERIFIED_SCHEMA), resumably.

    ``identity`` names what else decides the rows (model reference, backend and its options);
    with the prompts' text, the settings, the vocabulary planted labels come from and the
    inputs it fingerprints the flushed parts."""
    job = fingerprint(
        identity,
        prompts,
        settings_identity(settings),
        vocabulary,
        file_identity([regions, tar, status]),
    )
    mapped = map_region_views(
        "verify_labels",
        regions,
        tar,
        status,
        out,
        VERIFIED_SCHEMA,
        job,
        lambda views: verify_batch(views, backend, prompts, settings, vocabulary),
        settings,
        flush_every,
    )
    verdicts = ("accurate", "corrected", "unparsed")
    return {
        "regions": len(mapped.rows),
        "verdict": {v: sum(r["verdict"] == v for r in mapped.rows) for v in verdicts},
        "planted": sum(r["planted_label"] is not None for r in mapped.rows),
        "resumed_regions": mapped.resumed_units,
    }
