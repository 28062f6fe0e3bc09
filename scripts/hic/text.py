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
