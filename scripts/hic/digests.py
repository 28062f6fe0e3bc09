"""Content digests of large input files, cached by (path, size, modification time).

The download stage's params name its URL lists by content, not by modification time: a list
copied again or touched re-crawls nothing, an edited one re-crawls its shards. Hashing a
multi-GB list costs seconds, so each digest is computed once per file version and kept in a
small JSON cache that every later DAG build reads."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cached_digest(path: Path, cache: Path) -> str:
    """``file_digest(path)``, reused while the file keeps its size and modification time."""
    stat = path.stat()
    entry = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if entry not in known:
        known[entry] = file_digest(path)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
        os.replace(tmp, cache)  # concurrent DAG builds each leave a whole file
    return known[entry]
