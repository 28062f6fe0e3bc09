"""Region caption refinement: strip talk of the drawn box and split off the leading label.

The region VLM saw its region outlined on the image and answers ``<label>. <description>.``,
often mentioning the outline. An LLM rewrites that into ``{"label", "caption"}``; its answer is
only taken when a deterministic validator accepts it, otherwise a rule-based rewrite of the raw
caption is used, and a row whose rewrite fails the same validator is marked ``failed``. Each
row records which of the three paths produced it.

Matching rules (the contract: none of ``BOX_PHRASES`` survives in an accepted caption):

- Phrases match case-insensitively on whole words; "bounding box" also matches "bounding-box"
  and the plural "bounding boxes", a term with no meaning outside annotation. "border" does
  not match "borderline", "bordering", "bordered" or the plural "borders": the drawn outline is
  one border, while "flower borders" or "the borders of a rug" are picture content.
- Removal takes the outline phrase together with the words that only attach it: a determiner
  ("the", "a", ...), colour or style adjectives ("thick red"), a preposition ("within", "in",
  "inside", "by", "with", ...) with an optional "which/that is" and participle ("outlined by
  a", "highlighted by the"), and a trailing "of the image".
- Unlisted shapes ("red box", "red rectangle") are kept: they also name real objects, and
  deleting a real object is worse than leaving a stray mention for the LLM path to handle.
- A sentence whose subject is the outline is rewritten when the outline only frames
  something ("A red border surrounds the lamp, which is tall." -> "The lamp, which is tall."),
  and dropped otherwise ("The red border is thin."); a clause joined by "and"/"but"/"while"
  or ";" with the outline as subject is dropped up to the end of its sentence.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from hic.parts import PartStore, file_identity, fingerprint, resumable_map
from hic.region_tables import REFINED_SCHEMA, read_rows, write_rows
from hic.text import text_problem

#: The paper's phrases, most specific first so a match names the longest one.
BOX_PHRASES: tuple[str, ...] = (
    "within the green bounding box",
    "within the red bounding box",
    "green bounding box",
    "red bounding box",
    "bounding box",
    "green border",
    "red border",
    "border",
)


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    words = phrase.split()
    last = words[-1] + ("(?:es)?" if words[-1] == "box" else "")
    return re.compile(r"\b" + r"[\s-]+".join([*words[:-1], last]) + r"\b", re.IGNORECASE)


_PHRASE_PATTERNS = [(p, _phrase_pattern(p)) for p in BOX_PHRASES]

# Every listed phrase contains one of these two cores, so removing every core occurrence
# is what guarantees the contract; the words around it are removed only to keep grammar.
_CORE = r"(?:bounding[\s-]+box(?:es)?|border)"
_ANY_CORE = re.compile(rf"\b{_CORE}\b", re.IGNORECASE)
_MODIFIER = (
    r"(?:red|green|blue|yellow|orange|purple|pink|white|black|gr[ae]y"
    r"|thin|thick|bold|bright|dashed|dotted|solid|rectangular|square)"
)
_DETERMINER = r"(?:the|a|an|this|that|these|those|its|two|both)"
_BOX = rf"(?:{_DETERMINER}\s+)?(?:{_MODIFIER}[\s-]+){{0,3}}{_CORE}\b(?:['’]s)?"
_PREP = (
    r"(?:within|inside(?:\s+of)?|outside(?:\s+of)?|in|by|with|on|at|along|around|near"
    r"|next\s+to|close\s+to)"
)
_PARTICIPLE = (
    r"(?:located|situated|positioned|placed|shown|seen|visible|depicted|highlighted|marked"
    r"|outlined|enclosed|framed|surrounded|indicated|contained|captured|bounded|delineated"
    r"|encircled|drawn|pictured)"
)
_LEAD = rf"(?:(?:(?:which|that)\s+)?(?:(?:is|are)\s+)?(?:{_PARTICIPLE}\s+)?{_PREP}\s+)"
_INLINE = re.compile(
    rf"\b{_LEAD}?{_BOX}(?:\s+of\s+(?:the|this)\s+(?:image|picture|photo(?:graph)?|frame))?",
    re.IGNORECASE,
)
_FRAMING = (
    r"(?:(?:surround|enclose|encircle|highlight|mark|outline|frame|contain|show|cover|include"
    r"|indicate|capture|depict|delineate)s?|around|over|(?:is|are)\s+(?:drawn\s+|placed\s+)?"
    r"(?:around|over|on))"
)
# "A red border surrounds the lamp." -> keep what is framed.
_BOX_FRAMES = re.compile(rf"^\s*{_BOX}\s+{_FRAMING}\s+(?P<rest>.+)$", re.IGNORECASE | re.DOTALL)
# Framing nothing but a pronoun leaves no content: "A red border surrounds it."
_PRONOUN = re.compile(r"^(?:it|them|this|that|the\s+(?:object|region|area|item))\W*$", re.I)
# "The red border is thin." -> a sentence about the drawing only.
_BOX_SUBJECT = re.compile(rf"^\s*{_BOX}\s+\w", re.IGNORECASE)
# "Inside the red bounding box is a lamp." -> "A lamp."
_BOX_OPENER = re.compile(
    rf"^\s*{_PREP}\s+{_BOX}\s*,?\s+(?:there\s+(?:is|are)|is|are|lies|sits|stands"
    r"|we\s+(?:can\s+)?see|(?:you|one)\s+can\s+see)\s+",
    re.IGNORECASE,
)
# "..., and the red border frames it." -> a trailing clause about the drawing only.
_BOX_CLAUSE = re.compile(
    rf"(?:\s*;\s*|,?\s+(?:and|but|while|whereas)\s+){_BOX}\s+\w[^.!?]*", re.IGNORECASE
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def contains_box_phrase(text: str) -> str | None:
    """The most specific listed phrase found in ``text`` (whole words, any case), else None."""
    return next((p for p, pattern in _PHRASE_PATTERNS if pattern.search(text)), None)


def _tidy(text: str) -> str:
    """Repair the punctuation and spacing a removal leaves behind."""
    text = re.sub(r"\(\s*\)|\[\s*\]", " ", text)
    text = re.sub(r"\s*,\s*,\s*", " ", text)  # "a dog, <removed>, lies" -> "a dog lies"
    text = re.sub(r"\s+(?:and|or|but|with)(?=\s*(?:[.,;:!?)]|$))", "", text, flags=re.I)
    text = re.sub(r"\s*[,;:]+\s*(?=[.!?]|$)", "", text)
    text = re.sub(r"\s+([,.;:!?)\]])", r"\1", text)
    text = re.sub(r"([(\[])\s+", r"\1", text)
    return re.sub(r"\s{2,}", " ", text).strip().lstrip(",;: ")


def _clean_sentence(sentence: str) -> str:
    if not _ANY_CORE.search(sentence):
        return sentence  # nothing to remove: the sentence is kept exactly as written
    if framed := _BOX_FRAMES.match(sentence):
        rest = framed["rest"]
        sentence = "" if _PRONOUN.match(rest) else rest
    elif _BOX_SUBJECT.match(sentence):
        return ""
    sentence = _BOX_CLAUSE.sub("", _BOX_OPENER.sub("", sentence))
    while _ANY_CORE.search(sentence):  # tidying can join words into a new phrase; repeat
        sentence = _tidy(_INLINE.sub(" ", sentence))
    sentence = _tidy(sentence)
    return sentence[:1].upper() + sentence[1:] if any(c.isalnum() for c in sentence) else ""


def remove_box_phrases(text: str) -> str:
    """``text`` without any outline phrase, sentence by sentence; emptied sentences vanish."""
    sentences = (_clean_sentence(s) for s in _SENTENCE_END.split(text.strip()))
    return " ".join(s for s in sentences if s)


def _normalise_label(label: str) -> str:
    return " ".join(label.split()).lower()


def split_label(raw: str, label: str) -> tuple[str, str]:
    """(normalised label, description) when ``raw`` opens with the label and a separator.

    Separators: ".", ":", "-" or a dash, as in "Dog. A brown dog", "Dog: a brown dog",
    "dog - a brown dog"; a plural "Dogs." counts. Without such an opening the raw caption is
    returned whole, stripped: "Dog lying on grass" is a description, not a label.
    """
    name = _normalise_label(label)
    if name:
        words = r"\s+".join(re.escape(w) for w in name.split())
        opening = re.match(rf"\s*{words}(?:e?s)?\s*(?:[.:]|\s[-–—]|[–—])\s*", raw, re.I)
        if opening:
            rest = raw[opening.end() :].strip()
            return name, rest[:1].upper() + rest[1:]
    return name, raw.strip()


def build_prompt(template: str, label: str, caption: str) -> str:
    """Fill ``{label}`` and ``{caption}`` in one pass.

    Not ``str.format``: the template's JSON example has braces of its own. One pass, not two
    ``str.replace`` calls, so a caption that happens to contain "{label}" stays as written.
    """
    values = {"label": label, "caption": caption}
    return re.sub(r"\{(label|caption)\}", lambda m: values[m[1]], template)


def _names_label(candidate: str, label: str) -> bool:
    """Every word of ``label`` is a word of ``candidate``, a plural ending allowed."""
    words = set(re.findall(r"\w+", candidate.lower()))
    return all({g, g + "s", g + "es"} & words for g in re.findall(r"\w+", _normalise_label(label)))


def _problem(refined: dict, label: str) -> str | None:
    """Why ``refined`` breaks the output contract, or None when it holds."""
    for key in ("label", "caption"):
        value = refined.get(key)
        if not isinstance(value, str) or not value.strip():
            return f"{key} missing or not a non-empty string"
    caption = refined["caption"]
    if phrase := contains_box_phrase(caption):
        return f"caption still contains {phrase!r}"
    if problem := text_problem(caption):
        return f"caption is {problem}"
    if not _names_label(refined["label"], label):
        return f"label {refined['label'].strip()!r} does not name {label!r}"
    if split_label(caption, label)[1] != caption.strip():
        return "caption still opens with its label"
    return None


def parse_refined(output: str, label: str) -> tuple[dict | None, str | None]:
    """({"label", "caption"}, None) when ``output`` holds a valid answer, else (None, reason).

    The JSON object is the text from the first "{" to the last "}", which drops code fences
    and chatter around it; it must then be strict JSON (no single quotes or trailing commas):
    a model that cannot write JSON is not trusted with the caption either. The answer's label
    must name the given one (its words, plurals allowed), so "brown dog" passes for "dog".
    """
    if not output.strip():
        return None, "empty output"
    start, end = output.find("{"), output.rfind("}")
    if start < 0 or end < start:
        return None, "no JSON object in output"
    try:
        parsed = json.loads(output[start : end + 1])
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg})"
    if problem := _problem(parsed, label):
        return None, problem
    return {"label": parsed["label"].strip(), "caption": parsed["caption"].strip()}, None


def refine(raw_caption: str | None, label: str, llm_output: str | None) -> dict:
    """The refined row: the LLM's answer if valid, else the rule-based rewrite, else failed."""
    if llm_output is None:
        llm_reason = "no LLM output"
    else:
        refined, llm_reason = parse_refined(llm_output, label)
        if refined is not None:
            return {**refined, "refine_path": "llm", "refine_reason": None}
    name, description = split_label(raw_caption or "", label)
    caption = remove_box_phrases(description)
    fallback_reason = (
        "no raw caption"
        if raw_caption is None
        else _problem({"label": name, "caption": caption}, label)
    )
    if fallback_reason is None:
        return {
            "label": name,
            "caption": caption,
            "refine_path": "fallback",
            "refine_reason": llm_reason,
        }
    return {
        "label": name,
        "caption": None,
        "refine_path": "failed",
        "refine_reason": f"llm: {llm_reason}; fallback: {fallback_reason}",
    }


def refine_batch(regions: list[dict], backend, template: str, max_new_tokens: int) -> list[dict]:
    """The refined rows of regions that have a raw caption: one text-only LLM call."""
    prompts = [build_prompt(template, r["label"], r["raw_caption"]) for r in regions]
    outputs = backend.generate(None, prompts, max_new_tokens)
    return [
        {**r, **refine(r["raw_caption"], r["label"], output)}
        for r, output in zip(regions, outputs, strict=True)
    ]


def refine_shard(
    regions: Path,
    out: Path,
    backend,
    template: str,
    identity: dict,
    *,
    batch_size: int,
    max_new_tokens: int,
    flush_every: int = 8,
) -> dict:
    """Refine every region's raw caption into ``out`` (REFINED_SCHEMA): the LLM in batches,
    then :func:`refine`; regions without a raw caption skip the LLM and end ``failed``.

    Resumable (``hic.parts``): a unit is a region with a raw caption, by its row index;
    ``identity`` (model reference, backend and its options), the template, the generation
    budget and the input fingerprint the flushed parts."""
    rows = read_rows(regions)
    job = fingerprint(identity, template, max_new_tokens, file_identity([regions]))
    store = PartStore.beside(out, job, REFINED_SCHEMA)
    mapped = resumable_map(
        store,
        lambda done: (i for i, r in enumerate(rows) if r.get("raw_caption") and i not in done),
        lambda i: i,
        lambda batch: [
            [row]
            for row in refine_batch([rows[i] for i in batch], backend, template, max_new_tokens)
        ],
        batch_size,
        flush_every,
    )
    refined = dict(zip(mapped.units, mapped.rows, strict=True))
    rows = [
        refined[i] if i in refined else {**r, **refine(r.get("raw_caption"), r["label"], None)}
        for i, r in enumerate(rows)
    ]
    write_rows(rows, REFINED_SCHEMA, out)
    store.remove()
    paths = ("llm", "fallback", "failed")
    return {
        "regions": len(rows),
        "refine_path": {p: sum(r["refine_path"] == p for r in rows) for p in paths},
        "resumed_regions": mapped.resumed_units,
    }
