"""Scene captioning: a short and a long caption per downloaded image.

Two prompts, one task each, rather than one structured prompt: a small or noisy model
rarely breaks a plain-text answer, while a JSON or sectioned answer fails as a whole; and
the short caption is not a summary of a long one that may be wrong. The cost is a second
prefill of the image per image, which vLLM's prefix cache mostly absorbs.

Resumable inside a shard (``hic.parts``): finished rows are flushed every ``flush_every``
batches; a restarted job keeps the parts written under the same fingerprint (model, prompts,
generation and parsing settings, backend, the tar and status table as written), captions only
the rest, and the final parquet is assembled from the parts: no row is lost or captioned twice.
An image the model refuses (an extreme aspect ratio, memory) fails alone with the error as its
reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from collections.abc import Container, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from hic.parts import PartStore, file_identity, fingerprint, model_identity, resumable_map
from hic.text import text_problem

log = logging.getLogger(__name__)

KINDS = ("short", "long")
IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp"}

#: Columns of ``results/scene/{shard}.parquet``: one row per URL of the download shard.
SCENE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("short_caption", pa.string()),
        ("long_caption", pa.string()),
        ("status", pa.string()),  # ok | unparsed | failed
        ("reason", pa.string()),  # why not ok
        ("short_raw", pa.string()),  # model output, kept only when it did not parse
        ("long_raw", pa.string()),
        ("short_words", pa.int32()),
        ("long_words", pa.int32()),
        ("seconds", pa.float32()),  # this image's share of its batch's model time
        ("model_id", pa.string()),
        ("model_revision", pa.string()),
        ("prompt_hash", pa.string()),
        ("generation", pa.string()),  # JSON of the generation settings
    ]
)


@dataclass(frozen=True)
class CaptionSettings:
    """The config's ``caption_scene`` section (see schemas/config.schema.yaml)."""

    backend: str = "transformers"
    batch_size: int = 8
    max_new_tokens: dict[str, int] = field(default_factory=lambda: {"short": 48, "long": 320})
    words: dict[str, list[int]] = field(
        default_factory=lambda: {"short": [3, 40], "long": [15, 500]}
    )
    min_pixels: int = 3136
    max_pixels: int = 802816
    do_sample: bool = False
    temperature: float = 1.0
    vllm: dict = field(default_factory=lambda: {"max_model_len": 8192})

    def generation(self) -> str:
        keys = ("max_new_tokens", "min_pixels", "max_pixels", "do_sample", "temperature")
        return json.dumps({k: asdict(self)[k] for k in keys}, sort_keys=True)


class Backend(Protocol):
    """Anything that turns (image, prompt) pairs into texts, in order."""

    def generate(
        self, images: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int
    ) -> list[str]: ...


def prompt_hash(prompts: dict[str, str]) -> str:
    text = "\0".join(f"{k}\0{prompts[k]}" for k in KINDS)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Prefaces chatty models put before the caption, and markdown they wrap it in. "Here is/'s"
# counts only with a short run-up to a colon: "Here's a cosy room..." is the caption itself.
_PREFACE = re.compile(
    r"^(?:(?:sure|certainly|of course)\s*[!.,]\s*|(?:here is|here's)[^\n:]{0,60}:\s*"
    r"|(?:short |long |dense )?(?:caption|description)\s*:\s*)",
    re.IGNORECASE,
)
_MARKDOWN = re.compile(r"[*#_`]+")


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


def read_images(
    tar: Path, skip: Container[str] = frozenset(), only: Container[str] | None = None
) -> Iterator[tuple[str, Image.Image | None, str | None]]:
    """(key, image, None) per image in a download tar, or (key, None, reason) if undecodable.

    Images whose key is in ``skip``, or not in ``only`` when given, are not decoded."""
    with tarfile.open(tar) as t:
        for member in t:
            key, _, ext = member.name.partition(".")
            if ext.lower() not in IMAGE_EXTENSIONS or key in skip:
                continue
            if only is not None and key not in only:
                continue
            data = t.extractfile(member).read()
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
            except (OSError, Image.DecompressionBombError) as err:
                yield key, None, f"image does not decode: {err}"
                continue
            yield key, image.convert("RGB"), None


def _row(key: str, provenance: dict, **values) -> dict:
    row = dict.fromkeys(SCENE_SCHEMA.names)
    row.update(provenance, key=key, **values)
    return row


def caption_batch(
    backend: Backend,
    batch: list[tuple[str, Image.Image]],
    prompts: dict[str, str],
    settings: CaptionSettings,
    provenance: dict,
) -> list[dict]:
    images = [image for _, image in batch]
    start = time.perf_counter()
    texts = {
        kind: backend.generate(images, [prompts[kind]] * len(images), settings.max_new_tokens[kind])
        for kind in KINDS
    }
    seconds = (time.perf_counter() - start) / len(batch)
    rows = []
    for i, (key, _) in enumerate(batch):
        parsed = {k: parse_caption(texts[k][i], k, settings.words[k]) for k in KINDS}
        reasons = [reason for _, reason in parsed.values() if reason]
        rows.append(
            _row(
                key,
                provenance,
                short_caption=parsed["short"][0],
                long_caption=parsed["long"][0],
                status="unparsed" if reasons else "ok",
                reason="; ".join(reasons) or None,
                short_raw=texts["short"][i] if parsed["short"][1] else None,
                long_raw=texts["long"][i] if parsed["long"][1] else None,
                short_words=len(parsed["short"][0].split()) if parsed["short"][0] else 0,
                long_words=len(parsed["long"][0].split()) if parsed["long"][0] else 0,
                seconds=seconds,
            )
        )
    return rows


def caption_or_isolate(
    backend: Backend,
    batch: list[tuple[str, Image.Image]],
    prompts: dict[str, str],
    settings: CaptionSettings,
    provenance: dict,
) -> list[dict]:
    """``caption_batch``, but an image the model cannot take fails alone, not its batch.

    Processors reject some images outright (Qwen2-VL's resize refuses aspect ratios over 200,
    a huge image can run out of memory): the batch is retried image by image and an image
    that fails alone gets a ``failed`` row with the error. When every image of a batch fails
    alone, the fault is not in the images and the error is raised.
    """
    try:
        return caption_batch(backend, batch, prompts, settings, provenance)
    except (ValueError, RuntimeError) as err:
        if len(batch) == 1:
            log.warning("image %s: generation failed: %s", batch[0][0], err)
            reason = f"generation failed: {type(err).__name__}: {err}"
            return [_row(batch[0][0], provenance, status="failed", reason=reason)]
        log.warning("a batch of %d failed (%s): captioning its images one by one", len(batch), err)
        rows = [
            row
            for item in batch
            for row in caption_or_isolate(backend, [item], prompts, settings, provenance)
        ]
        # Alone, an image either gets a caption_batch row (ok or unparsed) or fails.
        if all(r["status"] == "failed" for r in rows):
            raise err
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
    progress is flushed every ``flush_every`` batches.
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

    def caption(batch: list[tuple[str, Image.Image | None, str | None]]) -> list[list[dict]]:
        nonlocal batch_seconds
        good = [(key, image) for key, image, _ in batch if image is not None]
        t0 = time.perf_counter()
        rows = caption_or_isolate(backend, good, prompts, settings, provenance) if good else []
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
        settings.batch_size,
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
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "unparsed", "failed")}
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
