"""Region caption refinement: strip talk of the drawn box and split off the leading label.

The region VLM saw its region outlined on the image and answers ``<label>. <description>.``,
often mentioning the outline. An LLM rewrites that into ``{"label", "caption"}``; its answer is
only taken when a deterministic validator accepts it, otherwise a rule-based rewrite of the raw
caption is used, and a row whose rewrite fails the same validator is marked ``failed``. Each
row records which of the three paths produced it.

Matching rules (the contract: none of ``BOX_PHRASES`` survives in an accepted caption):

- Text is compared after :func:`normalise_text` (Unicode NFKC, invisible characters dropped,
  every hyphen and dash variant made "-"), so a phrase spelled with look-alike characters is
  still found. Phrases match case-insensitively on whole words, their words joined by spaces,
  hyphens or nothing ("bounding box", "bounding-box", "boundingbox", "bounding‑box" with a
  non-breaking hyphen); "bounding box" also matches the plural "bounding boxes", a term with
  no meaning outside annotation. "border" does
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
import unicodedata
from pathlib import Path

from hic.decoding import Generation
from hic.parts import PartStore, file_identity, fingerprint, resumable_map
from hic.region_tables import REFINED_SCHEMA, read_rows, write_rows
from hic.text import normalise_label, output_problem, text_problem

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


# Soft hyphen, zero-width space/joiners, word joiner, BOM: invisible, and they split a word.
_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u200b\u200c\u200d\u2060\ufeff"))
# Hyphens, dashes and minus signs that NFKC leaves as they are.
_DASHES = re.compile("[\u2010-\u2015\u2212\u2e3a\u2e3b\ufe58\ufe63\uff0d]")


def normalise_text(text: str) -> str:
    """``text`` as the phrase matching sees it: NFKC, invisible characters dropped, every
    hyphen or dash as "-". The release checks use it too, so they read text the same way."""
    text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE)
    return _DASHES.sub("-", text)


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    words = phrase.split()
    last = words[-1] + ("(?:es)?" if words[-1] == "box" else "")
    return re.compile(r"\b" + r"[\s-]*".join([*words[:-1], last]) + r"\b", re.IGNORECASE)


_PHRASE_PATTERNS = [(p, _phrase_pattern(p)) for p in BOX_PHRASES]

# Every listed phrase contains one of these two cores, so removing every core occurrence
# is what guarantees the contract; the words around it are removed only to keep grammar.
_CORE = r"(?:bounding[\s-]*box(?:es)?|border)"
# The listed colours may be glued on ("redborder"), as a phrase's words may be.
_ANY_CORE = re.compile(rf"\b(?:(?:red|green)-?)?{_CORE}\b", re.IGNORECASE)
_MODIFIER = (
    r"(?:red|green|blue|yellow|orange|purple|pink|white|black|gr[ae]y"
    r"|thin|thick|bold|bright|dashed|dotted|solid|rectangular|square)"
)
_DETERMINER = r"(?:the|a|an|this|that|these|those|its|two|both)"
_BOX = rf"(?:{_DETERMINER}\s+)?(?:{_MODIFIER}[\s-]*){{0,3}}{_CORE}\b(?:['’]s)?"
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
    """The most specific listed phrase found in ``text`` (whole words, any case, after
    :func:`normalise_text`), else None."""
    text = normalise_text(text)
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
    """``text`` without any outline phrase, sentence by sentence; emptied sentences vanish.

    The text is normalised (:func:`normalise_text`) first, so what is removed is what
    :func:`contains_box_phrase` finds."""
    sentences = (_clean_sentence(s) for s in _SENTENCE_END.split(normalise_text(text).strip()))
    return " ".join(s for s in sentences if s)


def split_label(raw: str, label: str) -> tuple[str, str]:
    """(normalised label, description) when ``raw`` opens with the label and a separator.

    Separators: ".", ":", "-" or a dash, as in "Dog. A brown dog", "Dog: a brown dog",
    "dog - a brown dog"; a plural "Dogs." counts. Without such an opening the raw caption is
    returned whole, stripped: "Dog lying on grass" is a description, not a label.
    """
    name = normalise_label(label)
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


# Function words carry no content a rewrite must keep: the LLM may rephrase around them.
_FUNCTION_WORDS = frozenset(
    """a an the this that these those it its it's they them their there here is are was were be
    been being has have had does do did and or but nor so as of in on at to by for from with
    within into onto inside outside over under above below near next beside behind between
    among around along across through which who whom whose what where when while than then
    also very quite some any each other another one s""".split()
)
#: Content words of the raw caption an accepted rewrite may lose, per ten (rewording a verb,
#: a synonym); "Nice." for a three-sentence caption loses them all.
MAX_DROPPED_PER_TEN = 1


def _stem(word: str) -> str:
    """A crude stem: "sits", "sitting" and "sit" meet; irregular forms ("sat") do not."""
    word = re.sub(r"['’]s$", "", word)
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            word = word[: -len(suffix)]
            break
    return word[:-1] if len(word) > 3 and word[-1] == word[-2] else word


def _content_stems(text: str) -> set[str]:
    words = re.findall(r"[^\W_]+(?:['’]s)?", normalise_text(text).lower())
    return {_stem(w) for w in words if w not in _FUNCTION_WORDS and not w.isdigit()}


def dropped_content(caption: str, raw: str, label: str) -> list[str]:
    """Content words of ``raw`` (after the label opening and the box phrases are removed, as
    the fallback removes them; the label's own words aside) that ``caption`` does not keep."""
    kept = _content_stems(caption) | _content_stems(label)
    source = remove_box_phrases(split_label(raw, label)[1])
    return sorted(_content_stems(source) - kept)


def _problem(refined: dict, label: str, raw: str) -> str | None:
    """Why ``refined`` breaks the output contract for ``raw``, or None when it holds."""
    for key in ("label", "caption"):
        value = refined.get(key)
        if not isinstance(value, str) or not value.strip():
            return f"{key} missing or not a non-empty string"
    caption = refined["caption"]
    if phrase := contains_box_phrase(caption):
        return f"caption still contains {phrase!r}"
    if problem := text_problem(caption):
        return f"caption is {problem}"
    if normalise_label(refined["label"]) != normalise_label(label):
        return f"label {refined['label'].strip()!r} is not {label!r}"
    if split_label(caption, label)[1] != caption.strip():
        return "caption still opens with its label"
    dropped = dropped_content(caption, raw, label)
    allowed = len(_content_stems(remove_box_phrases(split_label(raw, label)[1])))
    if len(dropped) > allowed * MAX_DROPPED_PER_TEN // 10:
        return f"caption drops {len(dropped)} content words of the raw caption: {dropped[:5]}"
    return None


def parse_refined(output: str, label: str, raw: str) -> tuple[dict | None, str | None]:
    """({"label", "caption"}, None) when ``output`` holds a valid answer for the raw caption
    ``raw``, else (None, reason).

    The JSON object is the text from the first "{" to the last "}", which drops code fences
    and chatter around it; it must then be strict JSON (no single quotes or trailing commas):
    a model that cannot write JSON is not trusted with the caption either. The answer's label
    must be the region's label (case and spacing aside): the release says that label was
    verified, so "hot dog stand" for "dog" is rejected. Its caption must keep the raw
    caption's content words (:func:`dropped_content`, :data:`MAX_DROPPED_PER_TEN`).
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
    if problem := _problem(parsed, label, raw):
        return None, problem
    return {"label": normalise_label(label), "caption": parsed["caption"].strip()}, None


def refine(
    raw_caption: str | None, label: str, llm_output: str | None, llm_problem: str | None = None
) -> dict:
    """The refined row: the LLM's answer if valid, else the rule-based rewrite, else failed.

    ``llm_problem`` says why the output is unusable whatever it reads (cut off, looping)."""
    if llm_problem is not None:
        llm_reason = llm_problem
    elif llm_output is None:
        llm_reason = "no LLM output"
    else:
        refined, llm_reason = parse_refined(llm_output, label, raw_caption or "")
        if refined is not None:
            return {**refined, "refine_path": "llm", "refine_reason": None}
    name, description = split_label(raw_caption or "", label)
    caption = remove_box_phrases(description)
    fallback_reason = (
        "no raw caption"
        if raw_caption is None
        else _problem({"label": name, "caption": caption}, label, raw_caption)
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


def refine_batch(
    regions: list[dict], backend, template: str, max_new_tokens: int, generation: str
) -> list[dict]:
    """The refined rows of regions that have a raw caption: one text-only LLM call. An
    answer cut off at the token limit or looping is not used (``refine_reason`` says which)."""
    prompts = [build_prompt(template, r["label"], r["raw_caption"]) for r in regions]
    outputs: list[Generation] = backend.generate(None, prompts, max_new_tokens)
    rows = []
    for r, output in zip(regions, outputs, strict=True):
        problem = output_problem(output.text, output.truncated)
        reason = f"{problem[0]}: {problem[1]}" if problem else None
        rows.append(
            {
                **r,
                **refine(r["raw_caption"], r["label"], output.text, reason),
                "refine_generation": generation,
            }
        )
    return rows


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
    generation = json.dumps(
        backend.decoding.effective() | {"max_new_tokens": max_new_tokens}, sort_keys=True
    )
    job = fingerprint(identity, template, max_new_tokens, file_identity([regions]))
    store = PartStore.beside(out, job, REFINED_SCHEMA)
    mapped = resumable_map(
        store,
        lambda done: (i for i, r in enumerate(rows) if r.get("raw_caption") and i not in done),
        lambda i: i,
        lambda batch: [
            [row]
            for row in refine_batch(
                [rows[i] for i in batch], backend, template, max_new_tokens, generation
            )
        ],
        batch_size,
        flush_every,
    )
    refined = dict(zip(mapped.units, mapped.rows, strict=True))
    rows = [
        refined[i]
        if i in refined
        else {**r, **refine(r.get("raw_caption"), r["label"], None), "refine_generation": None}
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
