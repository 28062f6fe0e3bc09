"""The key of a URL, which every stage joins on: the first 16 hex digits of the md5 of the URL
without leading and trailing ASCII whitespace. shard_urls computes the same digits in DuckDB;
the demo world keys its reference with it. A module of its own, so that editing shard_urls
does not re-run the demo world."""

from __future__ import annotations

import hashlib

# str.strip() would also take Unicode spaces: these are what DuckDB's regexp strips too.
_WHITESPACE = " \t\n\r\f\v"


def url_key(url: str) -> str:
    """Stable key of a URL (same digits DuckDB's ``md5`` gives in ``shard_url_lists``)."""
    return hashlib.md5(url.strip(_WHITESPACE).encode("utf-8")).hexdigest()[:16]
