"""Text checks shared by the caption stages."""

from __future__ import annotations

import unicodedata


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
