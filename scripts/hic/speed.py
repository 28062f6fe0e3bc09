"""Settings that decide how fast a stage runs, not what it writes.

They are never rule params, so changing one re-runs nothing (at 12M images, tuning a batch
size must not re-caption the dataset): the rules pass a stage's other settings as params and
the scripts read these from the config. Batched floating-point arithmetic may still differ in
the last bits between batch sizes; that is noise, not a different result.
"""

from __future__ import annotations

from collections.abc import Mapping

#: config section -> its keys that only change speed. (The top-level ``flush_every``, how
#: often GPU jobs save progress, is no rule's param either.)
SPEED = {
    "caption_scene": frozenset({"batch_size", "chunk_size", "vllm"}),
    "verify_labels": frozenset({"batch_size"}),
    "caption_regions": frozenset({"batch_size"}),
    "refine_regions": frozenset({"batch_size"}),
    "propose_regions/settings": frozenset({"batch_size"}),
    "download": frozenset({"thread_count", "processes_count"}),
    "clip/defaults": frozenset({"checkpoint_every"}),
}


def section(config: Mapping, path: str) -> Mapping:
    node = config
    for part in path.split("/"):
        node = node.get(part) or {}
    return node


def science(config: Mapping, path: str) -> dict:
    """The settings of ``path`` ("caption_scene", "propose_regions/settings") that change what
    the stage writes: its params."""
    return {k: v for k, v in section(config, path).items() if k not in SPEED.get(path, ())}


def speed(config: Mapping, path: str) -> dict:
    """The settings of ``path`` that only change speed: read by the script, never params."""
    return {k: v for k, v in section(config, path).items() if k in SPEED.get(path, ())}
