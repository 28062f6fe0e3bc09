"""Text checks shared by the caption stages, and the cleaning and parsing of a generated caption."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence


def text_problem(text: str) -> str | None:
    """Why ``text`` does not read as prose, or None: invalid UTF-8 bytes (U+FFFD), control
    characters (a random model emits them; a release caption must not hold them), or fewer
    than 60% letters among the visible characters."""
    if "\ufffd" in text:  # bytes that decode to no character: a broken token stream
        return "not text (invalid UTF-8 bytes)"
    controls = sum(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in text)
    if controls:
        return f"not text ({controls} control characters)"
    letters = sum(c.isalpha() for c in text)
    visible = sum(not c.isspace() for c in text)
    if letters < 0.6 * visible:
        return f"not text ({letters}/{visible} letters)"
    return None


def repetition(text: str, n: int = 4) -> float:
    """The share of the text's word n-grams that repeat an earlier one: about 0 for prose (a
    170-word caption repeats a few 4-grams at most), towards 1 for an answer caught in a loop
    (a sentence said 40 times: 0.97). 0 for texts shorter than 2n words, too short to loop."""
    words = text.lower().split()
    if len(words) < 2 * n:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams)


#: Above this share of repeated word 4-grams an answer is ``repetitive`` rather than prose.
MAX_REPETITION = 0.5


def output_problem(text: str, truncated: bool) -> tuple[str, str] | None:
    """(status, reason) when a generated answer is unusable whatever it says: cut off at the
    token limit (the backend's own signal), or looping; else None."""
    if truncated:
        return "truncated", "cut off at the token limit"
    if (share := repetition(text)) > MAX_REPETITION:
        return "repetitive", f"repetitive ({share:.0%} of word 4-grams repeat)"
    return None


# Prefaces chatty models put before the caption, and markdown they wrap it in. "Here is/'s"
# counts only with a short run-up to a colon: "Here's a cosy room..." is the caption itself.
_PREFACE = re.compile(
    r"^(?:(?:sure|certainly|of course)\s*[!.,]\s*|(?:here is|here's)[^\n:]{0,60}:\s*"
    r"|(?:short |long |dense )?(?:caption|description)\s*:\s*)",
    re.IGNORECASE,
)
# Markdown markup only, never characters inside words ("jersey #23", "NO_PARKING", "5*3"):
# heading and list markers at a line's start, and emphasis or code marks that open before a
# word or close after one, on a word's outer edge.
_MARKDOWN = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]+|[*+-][ \t]+|>[ \t]*)"
    r"|(?<![\w*_`])[*_`]+(?=[^\s*_`])"
    r"|(?<=[^\s*_`])[*_`]+(?![\w*_`])",
    re.MULTILINE,
)


def clean_caption(text: str) -> str:
    text = _MARKDOWN.sub("", text).strip()
    for _ in range(2):  # "Sure! Caption: ..." carries two prefaces
        text = _PREFACE.sub("", text, count=1).strip()
    text = text.strip("\"'“”‘’ ").strip()
    return re.sub(r"\s+", " ", text)


def parse_caption(text: str, kind: str, words: Sequence[int]) -> tuple[str | None, str | None]:
    """(caption, None) when ``text`` reads as a caption of this kind, else (None, reason)."""
    caption = clean_caption(text)
    if not caption:
        return None, f"{kind}: empty output"
    if problem := text_problem(caption):
        return None, f"{kind}: {problem}"
    n = len(caption.split())
    low, high = words
    if kind == "short" and n > high:
        # A sound fallback: a short caption that ran on keeps its first sentence.
        first = re.split(r"(?<=[.!?])\s", caption, maxsplit=1)[0]
        if low <= len(first.split()) <= high:
            return first, None
    if not low <= n <= high:
        return None, f"{kind}: {n} words, expected {low}-{high}"
    return caption, None


def normalise_label(label: str) -> str:
    """A label as the stages compare labels: words joined by one space, case-folded."""
    return " ".join(label.split()).casefold()
