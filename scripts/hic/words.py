"""Word counts, computed once per row upstream (download, assemble) so that global
statistics only aggregate. A module of its own: the download stage depends on nothing else of
the caption code, so editing that re-runs no download."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc


def word_counts(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Whitespace-separated words per text; null and blank texts count 0 (int32)."""
    trimmed = pc.utf8_trim_whitespace(pc.fill_null(texts, ""))
    counts = pc.list_value_length(pc.split_pattern_regex(trimmed, r"\s+"))
    blank = pc.equal(pc.utf8_length(trimmed), 0)
    return pc.if_else(blank, 0, counts).cast(pa.int32())
