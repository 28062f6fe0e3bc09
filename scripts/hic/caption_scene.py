"""Scene captioning: a short and a long caption per downloaded image.

Two prompts, one task each, rather than one structured prompt: a small or noisy model
rarely breaks a plain-text answer, while a JSON or sectioned answer fails as a whole; and
the short caption is not a summary of a long one that may be wrong. The cost is a second
prefill of the image per image, which vLLM's prefix cache mostly absorbs: both prompts of
every image of a chunk (``chunk_size`` images) go to the backend in one call, which vLLM
schedules as it likes and the transformers backend cuts into length-sorted batches.

An answer cut off at its token limit (the backend's finish reason) is ``truncated`` and one
caught in a loop ``repetitive``, whatever it reads like; the decoding parameters, all set
explicitly, are recorded per row (``generation``).

Resumable inside a shard (``hic.parts``): finished rows are flushed every ``flush_every``
chunks; a restarted job keeps the parts written under the same fingerprint (model, prompts,
generation and parsing settings, backend, the tar and status table as written), captions only
the rest, and the final parquet is assembled from the parts: no row is lost or captioned twice.
An image the model refuses (an extreme aspect ratio, memory) fails alone with the error as its
reason; a fault that fails every image (a broken GPU) stops the job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from hic.decoding import Decoding, Generation
from hic.images import read_images
from hic.parts import PartStore, file_identity, fingerprint, model_identity, resumable_map
from hic.text import output_problem, parse_caption

log = logging.getLogger(__name__)

KINDS = ("short", "long")
STATUSES = ("ok", "unparsed", "truncated", "repetitive", "failed")
#: Images failing alone one after another before the fault is taken to be the backend's.
MAX_FAILURE_STREAK = 16

#: Columns of ``results/scene/{shard}.parquet``: one row per URL of the download shard.
SCENE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("short_caption", pa.string()),
        ("long_caption", pa.string()),
        ("status", pa.string()),  # ok | unparsed | truncated | repetitive | failed
        ("reason", pa.string()),  # why not ok
        ("short_raw", pa.string()),  # model output, kept only when it did not parse
        ("long_raw", pa.string()),
        ("short_words", pa.int32()),
        ("long_words", pa.int32()),
        ("seconds", pa.float32()),  # this image's share of its chunk's model time
        ("model_id", pa.string()),
        ("model_revision", pa.string()),
        ("prompt_hash", pa.string()),
        ("generation", pa.string()),  # JSON of the effective decoding and image settings
    ]
)


@dataclass(frozen=True)
class CaptionSettings:
    """The config's ``caption_scene`` section (see schemas/config.schema.yaml)."""

    backend: str = "transformers"
    chunk_size: int = 1024
    batch_size: int = 8
    # The paper's lengths: short about 20-25 words, long 120-175; accepted a little wider.
    max_new_tokens: dict[str, int] = field(default_factory=lambda: {"short": 64, "long": 384})
    words: dict[str, list[int]] = field(
        default_factory=lambda: {"short": [8, 40], "long": [80, 260]}
    )
    min_pixels: int = 3136
    max_pixels: int = 802816
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    vllm: dict = field(default_factory=lambda: {"max_model_len": 8192})

    def decoding(self) -> Decoding:
        return Decoding.from_config(asdict(self))

    def generation(self) -> str:
        """The row's record of how it was generated: every decoding value that acts."""
        keys = ("backend", "max_new_tokens", "min_pixels", "max_pixels")
        record = {k: asdict(self)[k] for k in keys} | self.decoding().effective()
        return json.dumps(record, sort_keys=True)


class Backend(Protocol):
    """Anything that turns (image, prompt) pairs into generations, in order."""

    def generate(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        max_new_tokens: int | Sequence[int],
    ) -> list[Generation]: ...


def prompt_hash(prompts: dict[str, str]) -> str:
    text = "\0".join(f"{k}\0{prompts[k]}" for k in KINDS)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _row(key: str, provenance: dict, **values) -> dict:
    row = dict.fromkeys(SCENE_SCHEMA.names)
    row.update(provenance, key=key, **values)
    return row


def judge(generation: Generation, kind: str, words: Sequence[int]) -> tuple[str | None, str]:
    """(caption, "ok") or (None, status: reason) for one generated answer of this kind."""
    if problem := output_problem(generation.text, generation.truncated):
        status, reason = problem
        return None, f"{status}: {kind}: {reason}"
    caption, reason = parse_caption(generation.text, kind, words)
    return (caption, "ok") if caption else (None, f"unparsed: {reason}")


def caption_batch(
    backend: Backend,
    batch: list[tuple[str, Image.Image]],
    prompts: dict[str, str],
    settings: CaptionSettings,
    provenance: dict,
) -> list[dict]:
    """Both captions of every image in one backend call (image by image, short then long)."""
    images = [image for _, image in batch for _ in KINDS]
    start = time.perf_counter()
    outputs = backend.generate(
        images,
        [prompts[kind] for _ in batch for kind in KINDS],
        [settings.max_new_tokens[kind] for _ in batch for kind in KINDS],
    )
    seconds = (time.perf_counter() - start) / len(batch)
    rows = []
    for i, (key, _) in enumerate(batch):
        generated = dict(zip(KINDS, outputs[len(KINDS) * i : len(KINDS) * (i + 1)], strict=True))
        judged = {k: judge(generated[k], k, settings.words[k]) for k in KINDS}
        problems = [verdict for _, verdict in judged.values() if verdict != "ok"]
        # A row takes its worst kind's status: a cut-off or loop outranks a parse failure.
        found = {p.split(":", 1)[0] for p in problems}
        status = next((s for s in ("truncated", "repetitive", "unparsed") if s in found), "ok")
        rows.append(
            _row(
                key,
                provenance,
                short_caption=judged["short"][0],
                long_caption=judged["long"][0],
                status=status,
                reason="; ".join(p.split(": ", 1)[1] for p in problems) or None,
                short_raw=generated["short"].text if judged["short"][0] is None else None,
                long_raw=generated["long"].text if judged["long"][0] is None else None,
                short_words=len(judged["short"][0].split()) if judged["short"][0] else 0,
                long_words=len(judged["long"][0].split()) if judged["long"][0] else 0,
                seconds=seconds,
            )
        )
    return rows


class FailureStreak:
    """Counts images that failed alone one after another: past ``limit`` the fault is not in
    the images (a broken GPU fails every one, whatever the chunk size) and the job stops."""

    def __init__(self, limit: int = MAX_FAILURE_STREAK):
        self.limit, self.count = limit, 0

    def record(self, rows: list[dict], err: Exception | None = None) -> None:
        for row in rows:
            self.count = self.count + 1 if row["status"] == "failed" else 0
            if self.count >= self.limit:
                raise RuntimeError(
                    f"{self.count} images in a row failed generation alone: the fault is the "
                    f"backend's, not the images' (last error: {type(err).__name__}: {err})"
                ) from err


def caption_or_isolate(
    backend: Backend,
    batch: list[tuple[str, Image.Image]],
    prompts: dict[str, str],
    settings: CaptionSettings,
    provenance: dict,
    streak: FailureStreak | None = None,
) -> list[dict]:
    """``caption_batch``, but an image the model cannot take fails alone, not its chunk.

    Processors reject some images outright (Qwen2-VL's resize refuses aspect ratios over 200,
    a huge image can run out of memory): a failed chunk is split in halves until the culprit
    stands alone, so a bad image in a chunk of thousands costs a dozen calls, and it gets a
    ``failed`` row with the error. When every image of a chunk fails alone, or ``streak``
    counts too many failures in a row (chunks of one image), the error is raised.
    """
    streak = streak or FailureStreak()
    try:
        rows = caption_batch(backend, batch, prompts, settings, provenance)
    except (ValueError, RuntimeError) as err:
        if len(batch) == 1:
            log.warning("image %s: generation failed: %s", batch[0][0], err)
            reason = f"generation failed: {type(err).__name__}: {err}"
            rows = [_row(batch[0][0], provenance, status="failed", reason=reason)]
            streak.record(rows, err)
            return rows
        log.warning("a chunk of %d failed (%s): splitting it to isolate the image", len(batch), err)
        half = len(batch) // 2
        rows = [
            row
            for part in (batch[:half], batch[half:])
            for row in caption_or_isolate(backend, part, prompts, settings, provenance, streak)
        ]
        # Alone, an image either gets a caption_batch row or fails.
        if all(r["status"] == "failed" for r in rows):
            raise err
        return rows
    streak.record(rows)
    return rows


def caption_shard(
    tar: Path,
    status: Path,
    out: Path,
    prompts: dict[str, str],
    settings: CaptionSettings,
    backend: Backend,
    model: dict,
    flush_every: int = 8,
) -> dict:
    """Caption every downloaded image of a shard into ``out`` (SCENE_SCHEMA), resumably.

    ``model`` is ``{"id", "revision"}`` for provenance; ``backend`` does the generation;
    progress is flushed every ``flush_every`` chunks.
    """
    downloads = pq.read_table(status, columns=["key", "status", "error_type"]).to_pylist()
    provenance = {
        "model_id": model["id"],
        "model_revision": model.get("revision"),
        "prompt_hash": prompt_hash(prompts),
        "generation": settings.generation(),
    }
    # Flushed rows are reused only for the same images (the tar and status table as written:
    # a re-download may keep its keys), the same model, prompts and generation, and the same
    # parsing.
    job = fingerprint(
        provenance,
        model_identity(model),
        settings.words,
        settings.backend,
        file_identity([tar, status]),
    )
    store = PartStore.beside(out, job, SCENE_SCHEMA)

    # The backend's own clock times the model alone; without one (scripted test backends),
    # the whole batch call is counted as model time.
    watch = getattr(backend, "model_time", None)
    watched_before = watch.seconds if watch is not None else 0.0
    batch_seconds, started = 0.0, time.perf_counter()
    streak = FailureStreak()

    def caption(batch: list[tuple[str, Image.Image | None, str | None]]) -> list[list[dict]]:
        nonlocal batch_seconds
        good = [(key, image) for key, image, _ in batch if image is not None]
        t0 = time.perf_counter()
        rows = (
            caption_or_isolate(backend, good, prompts, settings, provenance, streak) if good else []
        )
        batch_seconds += time.perf_counter() - t0
        captioned = iter(rows)  # one row per decoded image, in order
        return [
            [
                next(captioned)
                if image is not None
                else _row(key, provenance, status="failed", reason=reason)
            ]
            for key, image, reason in batch
        ]

    mapped = resumable_map(
        store,
        lambda done: read_images(tar, skip=done),
        lambda item: item[0],
        caption,
        settings.chunk_size,
        flush_every,
    )
    captioned = {r["key"]: r for r in mapped.rows}
    extra = set(captioned) - {d["key"] for d in downloads if d["status"] == "success"}
    if extra:  # the tar and its status table disagree: say so rather than drop them quietly
        log.warning(
            "%s: %d images in the tar are not successes in %s, left out: %s",
            tar,
            len(extra),
            status,
            sorted(extra)[:5],
        )
    rows = []
    for d in downloads:
        if d["status"] == "success":
            if d["key"] not in captioned:
                raise RuntimeError(
                    f"{tar}: image {d['key']} is in the status table but not the tar"
                )
            rows.append(captioned[d["key"]])
        else:
            reason = f"not downloaded: {d['status']} ({d['error_type']})"
            rows.append(_row(d["key"], provenance, status="failed", reason=reason))
    table = pa.Table.from_pylist(rows, schema=SCENE_SCHEMA)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, out)
    store.remove()
    total = time.perf_counter() - started
    model_seconds = watch.seconds - watched_before if watch is not None else batch_seconds
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    return {
        "rows": len(rows),
        "status": counts,
        "resumed_rows": mapped.resumed_units,
        "captioned_now": len(mapped.units) - mapped.resumed_units,
        "seconds_total": round(total, 3),
        "seconds_model": round(model_seconds, 3),
        "seconds_batches": round(batch_seconds, 3),  # model + prompts, image processing, parsing
        "fraction_outside_model": round(1 - model_seconds / total, 4) if total else 0.0,
    }
