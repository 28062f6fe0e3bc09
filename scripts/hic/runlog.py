"""Send a Snakemake job's output to its log file."""

from __future__ import annotations

import logging
import os
import sys


def to_log(path: str) -> logging.Logger:
    """Point file descriptors 1 and 2 at ``path`` (so child processes and C libraries log
    there too) and return a logger writing to it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    return logging.getLogger("hic")
