"""The curated name lists (``data/vocabulary/things.txt``, ``stuff.txt``). A module of its own:
propose_regions queries them and verify_labels plants wrong labels from them, and neither
stage's environment needs the other's packages."""

from __future__ import annotations

from pathlib import Path


def load_vocabulary(path: Path) -> list[str]:
    """The names of a list file, lowercased, without blank lines and ``#`` comments."""
    lines = (line.strip().lower() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]
