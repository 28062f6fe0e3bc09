"""Long-text CLIP training on download tars joined with hierarchical annotations.

Data: the download stage's webdataset tars with their status tables, joined by key with an
annotation source in the HIC release format (the pipeline's assembled dataset, or released
annotations such as the demo world's reference). Only images with an annotation are used, for
every caption policy, so runs differ in their texts alone.

Caption policies (one per run):

- ``alt``: the LAION alt-text stored with the image;
- ``short`` / ``long``: the image's short or long caption;
- ``regions``: one region per sample (seeded), the image cropped to its box (10% margin)
  and paired with its region caption;
- ``hierarchical``: per sample, a seeded choice among short, long and region with the run's
  ``mix`` probabilities (default 0.25 / 0.5 / 0.25: long captions carry most of the detail
  the benchmarks test, short ones keep short queries working, regions add local detail).

At scale (12M images, 1,200 shards, several GPUs):

- a shard's captions are read (Arrow) when the stream reaches that shard, never all at once;
  the samples of an epoch are counted from the status tables and annotations, not the tars;
- the epoch's order is planned from metadata alone (tar headers, no image bytes), and
  DataLoader workers read, decode (JPEG draft mode: at the smallest power-of-two reduction
  that still covers the model's input), augment and tokenise each sample;
- under ``torchrun`` (DDP) each rank takes a disjoint slice of every global batch, and the
  loss gathers features with gradients, so N ranks compute the gradient of one process.

Reproducible and resumable: the sample order of an epoch is a function of (seed, epoch), each
sample's caption choice and augmentation a function of (seed, epoch, key), whatever the number
of workers and ranks; a checkpoint every ``checkpoint_every`` steps holds model, optimiser and
step; a restarted run skips the batches it has already trained on and reaches the same
weights as an uninterrupted one (on CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from open_clip_train.distributed import init_distributed_device, is_master
from open_clip_train.scheduler import cosine_lr
from PIL import Image
from torch.utils.data import DataLoader

from hic.methods import METHODS, method_for
from hic.methods.base import Context, Method
from hic.parts import batches as caption_batches
from hic.parts import file_identity, fingerprint

log = logging.getLogger(__name__)

POLICIES = ("alt", "short", "long", "regions", "hierarchical")
MIX_KINDS = ("short", "long", "region")
IMAGE_EXTENSIONS = ("jpg", "png", "webp")  # a sample's image, in this order of preference
STATUS_COLUMNS = ["key", "status", "caption", "original_width", "original_height"]
CAPTION_COLUMNS = ["key", "short_caption", "long_caption", "regions"]
WORD_COLUMNS = ["short_words", "long_words", "region_words"]  # the release's, per caption
SHUFFLE_BUFFER = 256
# RandomResizedCrop keeps >= 90% of the area at aspect 3/4..4/3: a crop's short side can be
# ~0.8 of the image's, so a reduced decode keeps the short side >= 1.25x the model's input.
DRAFT_MARGIN = 1.25


@dataclass(frozen=True)
class TrainSettings:
    """One entry of the config's ``clip.runs``, merged over ``clip.defaults``."""

    policy: str = "hierarchical"
    method: str = "clip"
    options: dict = field(default_factory=dict)  # the method's own (hic.methods)
    arch: str = "ViT-B-16"
    pretrained: str | None = None
    keep_positions: int = 20
    stretch: int = 4
    epochs: int = 1
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.2
    warmup: int = 10
    seed: int = 0
    checkpoint_every: int = 50
    mix: dict[str, float] = field(
        default_factory=lambda: {"short": 0.25, "long": 0.5, "region": 0.25}
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown caption policy {self.policy!r}; choose one of {POLICIES}")
        # A kind the mix does not list has probability 0: ``mix: {long: 1}`` is long only.
        mix = {kind: float(self.mix.get(kind, 0)) for kind in MIX_KINDS}
        unknown = set(self.mix) - set(MIX_KINDS)
        if unknown or min(mix.values()) < 0 or sum(mix.values()) <= 0:
            raise ValueError(
                f"mix {self.mix} must give non-negative weights to some of {MIX_KINDS} "
                f"(and nothing else), with a positive sum"
            )
        object.__setattr__(self, "mix", mix)


@dataclass(frozen=True)
class Shard:
    """One download shard: its tar, its status table, and the annotation files that hold its
    keys (its own release shard, or every file of an annotation list)."""

    tar: Path
    status: Path
    annotations: tuple[Path, ...]


def pair_shards(tars: list[Path], annotations: list[Path], aligned: bool) -> list[Shard]:
    """Shards of ``tars`` (status table beside each, as img2dataset writes it). ``aligned``:
    ``annotations[i]`` is the release shard of ``tars[i]`` (the assembled dataset), so a
    shard reads one file; otherwise every shard looks its keys up in every file."""
    tars, annotations = [Path(t) for t in tars], [Path(a) for a in annotations]
    if aligned and len(annotations) != len(tars):
        raise ValueError(f"{len(annotations)} annotation files cannot align with {len(tars)} tars")
    return [
        Shard(
            tar, tar.with_suffix(".parquet"), (annotations[i],) if aligned else tuple(annotations)
        )
        for i, tar in enumerate(tars)
    ]


def stable_random(*parts: object) -> random.Random:
    """A Random seeded from ``parts`` alone (Python's own str hash is salted per process)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# ------------------------------------------------------------------ one shard's captions
def _present(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """True where a caption exists (not null, not empty)."""
    return np.asarray(pc.fill_null(pc.not_equal(column, ""), False))


def _region_counts(regions: pa.ChunkedArray, present) -> np.ndarray:
    """Per row, the list items (regions) for which ``present(flat items)`` holds."""
    regions = regions.combine_chunks() if isinstance(regions, pa.ChunkedArray) else regions
    if len(regions) == 0:
        return np.zeros(0, np.int64)
    parents = np.asarray(pc.list_parent_indices(regions))
    return np.bincount(parents[present(pc.list_flatten(regions))], minlength=len(regions))


def _captions(path: Path, keys: pa.Array, text: bool) -> pa.Table:
    """The rows of ``path`` whose key is in ``keys``: key, which captions exist (``has_short``,
    ``has_long``, ``has_region``) and, with ``text``, the captions. The release's word counts
    say which exist without reading any text; other files are judged by their text."""
    counted = set(WORD_COLUMNS) <= set(pq.read_schema(path).names)
    columns = ["key", *(WORD_COLUMNS if counted else [])]
    columns += CAPTION_COLUMNS[1:] if text or not counted else []
    table = pq.read_table(path, columns=columns)
    table = table.filter(pc.is_in(table["key"], value_set=keys))
    if counted:
        words = [np.asarray(pc.fill_null(table[c], 0)) > 0 for c in WORD_COLUMNS[:2]]
        regions = _region_counts(
            table["region_words"], lambda w: np.asarray(pc.fill_null(w, 0)) > 0
        )
    else:
        words = [_present(table[c]) for c in CAPTION_COLUMNS[1:3]]
        regions = _region_counts(
            table["regions"], lambda r: _present(pc.struct_field(r, "caption"))
        )
    has = {"has_short": words[0], "has_long": words[1], "has_region": regions > 0}
    out = pa.table({"key": table["key"], **has})
    for name in CAPTION_COLUMNS[1:] if text else []:
        out = out.append_column(name, table[name])
    return out


def shard_rows(
    shard: Shard, settings: TrainSettings, text: bool = True
) -> tuple[pa.Table, Counter]:
    """The shard's usable samples: downloaded images (status ``success``) with an annotation
    and the caption their policy needs, as one table (status columns, and with ``text`` the
    captions), and the downloaded images left out, by reason. Reads this shard's rows only."""
    status = pq.read_table(shard.status, columns=STATUS_COLUMNS)
    status = status.filter(pc.equal(status["status"], "success"))
    found = [_captions(path, status["key"], text) for path in shard.annotations]
    captions = pa.concat_tables(found, promote_options="permissive")
    at = pc.index_in(status["key"], value_set=captions["key"])
    annotated = np.asarray(pc.is_valid(at))
    joined = status.select(["key", "caption", "original_width", "original_height"])
    for name in captions.column_names[1:]:
        joined = joined.append_column(name, captions[name].take(at))
    has = {kind: np.asarray(pc.fill_null(joined[f"has_{kind}"], False)) for kind in MIX_KINDS}
    has["alt"] = _present(joined["caption"])
    if settings.policy == "hierarchical":
        usable = np.zeros(len(joined), bool)
        for kind in MIX_KINDS:
            usable |= has[kind] & (settings.mix[kind] > 0)
    else:
        usable = has["region" if settings.policy == "regions" else settings.policy]
    usable &= annotated
    left_out = Counter(
        {
            "no annotation": int((~annotated).sum()),
            f"no caption for policy {settings.policy}": int((annotated & ~usable).sum()),
        }
    )
    return joined.filter(pa.array(usable)), +left_out


def count_samples(
    shards: list[Shard], settings: TrainSettings, threads: int = 4
) -> tuple[list[int], Counter]:
    """Usable samples per shard (the same every epoch) and the images left out, by reason;
    from the status tables and annotations only (a thread per shard read: Arrow reads
    release the GIL)."""

    def count(shard: Shard) -> tuple[int, Counter]:
        rows, left_out = shard_rows(shard, settings, text=False)
        return len(rows), left_out  # the rows go: only the counts stay

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(count, shards))
    left_out: Counter = Counter()
    for _, reasons in results:
        left_out.update(reasons)
    return [n for n, _ in results], left_out


# ------------------------------------------------------------------ the epoch's order
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key.extension split


def _tar_members(path: Path) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of a tar's regular files, reading headers only."""
    with open(path, "rb") as f:
        offset = 0
        while True:
            f.seek(offset)
            header = f.read(512)
            if len(header) < 512 or header.count(0) == 512:
                return
            kind = header[156:157]
            raw_size = header[124:136]
            if kind not in (b"0", b"\0") or raw_size[0] & 0x80:
                raise _NotPlainTar  # pax/GNU headers, links, huge sizes: tarfile knows them
            size = int(raw_size.rstrip(b"\0 ") or b"0", 8)
            name = header[:100].rstrip(b"\0").decode()
            prefix = header[345:500].rstrip(b"\0").decode() if header[257:262] == b"ustar" else ""
            yield (f"{prefix}/{name}" if prefix else name), offset + 512, size
            offset += 512 + (size + 511) // 512 * 512


class _NotPlainTar(Exception):
    pass


def tar_images(path: Path) -> list[tuple[str, int, int]]:
    """(key, offset, size) of each sample's image in tar order: where its bytes are, with no
    image read. Plain ustar headers are parsed directly (what img2dataset writes), anything
    else through ``tarfile``."""
    try:
        members = list(_tar_members(path))
    except _NotPlainTar:
        import tarfile

        with tarfile.open(path) as tar:
            members = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    for name, offset, size in members:
        if match := _MEMBER.match(name):
            samples.setdefault(match[1], {})[match[2].lower()] = (offset, size)
    images = []
    for key, files in samples.items():
        ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        if ext is not None:
            images.append((key, *files[ext]))
    return images


@dataclass(frozen=True)
class Sample:
    """What a DataLoader worker needs to make one training pair."""

    key: str
    tar: str
    offset: int
    size: int
    alt: str | None
    record: dict
    original: tuple[int, int]


def epoch_order(
    shards: list[Shard], settings: TrainSettings, epoch: int, buffer_size: int = SHUFFLE_BUFFER
) -> Iterator[tuple[pa.Table, int, str, int, int]]:
    """(shard rows, row, tar, offset, size) of each sample of an epoch, in an order fixed by
    (seed, epoch): shards shuffled, then a seeded shuffle buffer over their samples in tar
    order. Metadata only: a shard's captions are read when the stream reaches it."""
    order = list(shards)
    stable_random(settings.seed, epoch, "shards").shuffle(order)
    shuffler = stable_random(settings.seed, epoch, "buffer")
    buffer: list = []
    for shard in order:
        rows, _ = shard_rows(shard, settings)
        index = {key: i for i, key in enumerate(rows["key"].to_pylist())}
        seen = 0
        for key, offset, size in tar_images(shard.tar):
            row = index.get(key)
            if row is None:
                continue
            seen += 1
            buffer.append((rows, row, str(shard.tar), offset, size))
            if len(buffer) >= buffer_size:
                yield buffer.pop(shuffler.randrange(len(buffer)))
        if seen != len(index):
            raise ValueError(
                f"{shard.tar} lacks the images of {len(index) - seen} samples that "
                f"{shard.status} lists as downloaded"
            )
    shuffler.shuffle(buffer)
    yield from buffer


def to_sample(rows: pa.Table, row: int, tar: str, offset: int, size: int) -> Sample:
    record = rows.slice(row, 1).to_pylist()[0]
    record["regions"] = [r for r in record["regions"] or [] if r.get("caption")]
    return Sample(
        key=record["key"],
        tar=tar,
        offset=offset,
        size=size,
        alt=record["caption"],
        record=record,
        original=(record["original_width"], record["original_height"]),
    )


class RankBatches:
    """This rank's slice of every global batch of an epoch from batch ``first`` on: a
    DataLoader ``batch_sampler`` whose indices are Samples. A last partial batch is dropped:
    every step sees ``batch_size`` pairs."""

    def __init__(self, shards, settings, epoch, first=0, rank=0, world=1):
        if settings.batch_size % world:
            raise ValueError(f"batch size {settings.batch_size} does not split over {world} ranks")
        self.args = shards, settings, epoch
        self.first, self.per_rank, self.rank = first, settings.batch_size // world, rank

    def __iter__(self) -> Iterator[list[Sample]]:
        shards, settings, epoch = self.args
        batches = caption_batches(epoch_order(shards, settings, epoch), settings.batch_size, True)
        for index, batch in enumerate(batches):
            if index >= self.first:
                mine = batch[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
                yield [to_sample(*item) for item in mine]


# ------------------------------------------------------------------ one training pair
def crop_to(image: Image.Image, bbox: list[float], original: tuple[int, int]) -> Image.Image:
    """The region ``bbox`` ([x, y, w, h] in ORIGINAL pixels) of the stored image, 10% margin."""
    sx, sy = image.width / original[0], image.height / original[1]
    x, y, w, h = bbox
    mx, my = 0.1 * w, 0.1 * h
    box = (
        max(0, (x - mx) * sx),
        max(0, (y - my) * sy),
        min(image.width, (x + w + mx) * sx),
        min(image.height, (y + h + my) * sy),
    )
    return image.crop(tuple(round(v) for v in box))


def caption_for(
    policy: str, alt: str, record: dict, rng: random.Random, mix: dict[str, float]
) -> tuple[str | None, dict | None]:
    """(text, region or None) for one sample; None text when the record lacks that caption."""
    if policy == "hierarchical":
        # Only kinds this record has, so whether a record is used never depends on the draw.
        have = {
            "short": record["short_caption"],
            "long": record["long_caption"],
            "region": record["regions"],
        }
        kinds = [k for k in ("short", "long", "region") if have[k] and mix[k] > 0]
        if not kinds:
            return None, None
        policy = rng.choices(kinds, weights=[mix[k] for k in kinds])[0]
        policy = "regions" if policy == "region" else policy
    if policy == "alt":
        return alt or None, None
    if policy in ("short", "long"):
        return record[f"{policy}_caption"], None
    if not record["regions"]:
        return None, None
    region = rng.choice(record["regions"])
    return f"{region['label']}. {region['caption']}", region


def load_image(
    data: bytes,
    box: list[float] | None,
    original: tuple[int, int] | None,
    min_side: int | None = None,
):
    """The sample's image, cropped to its region when the caption is a region's. With
    ``min_side``, a JPEG is decoded at the smallest size (1/2, 1/4, 1/8) whose crop keeps a
    short side of at least ``min_side`` pixels: the same picture at a fraction of the work."""
    image = Image.open(io.BytesIO(data))
    if min_side and image.format == "JPEG":
        crop_w, crop_h = image.size
        if box is not None:
            ow, oh = original or image.size
            crop_w, crop_h = 1.2 * box[2] * image.width / ow, 1.2 * box[3] * image.height / oh
        scale = min_side / max(1.0, min(crop_w, crop_h))
        image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    image = image.convert("RGB")
    return image if box is None else crop_to(image, box, original or image.size)


class Pairs(torch.utils.data.Dataset):
    """Sample -> the method's tensors for it (``Method.example``): what DataLoader workers
    run. The caption choice and the augmentation are seeded by (seed, epoch, key), so a
    sample is the same whichever process makes it and whenever."""

    def __init__(self, settings, epoch, method: Method, min_side=None):
        self.settings, self.epoch, self.min_side = settings, epoch, min_side
        self.method = method

    def __getitem__(self, sample: Sample) -> dict:
        s = self.settings
        rng = stable_random(s.seed, self.epoch, sample.key)
        text, region = caption_for(s.policy, sample.alt, sample.record, rng, s.mix)
        if not text:
            raise ValueError(f"sample {sample.key} was planned with no {s.policy} caption")
        with open(sample.tar, "rb") as f:
            f.seek(sample.offset)
            data = f.read(sample.size)
        box = region["bbox"] if region is not None else None
        image = load_image(data, box, sample.original, self.min_side)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.getrandbits(63))
            return self.method.example(image, text, rng)


def epoch_loader(shards, settings, epoch, pairs: Pairs, workers: int, **rank) -> DataLoader:
    """Batches of this rank from an epoch's batch ``first`` on (``rank``: first, rank, world)."""
    return DataLoader(
        pairs,
        batch_sampler=RankBatches(shards, settings, epoch, **rank),
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )


# ------------------------------------------------------------------ training
def train(
    shards: list[Shard],
    out_dir: Path,
    settings: TrainSettings,
    *,
    data_id: str = "",
    max_steps: int | None = None,
    workers: int = 0,
    draft: bool = True,
    device: str | None = None,
) -> dict:
    """Train (or resume) one run into ``out_dir``: model.pt, metrics.jsonl, params.txt.

    A checkpoint in ``out_dir`` is resumed only when it was written under the same settings
    and the same ``data_id`` (``input_identity`` of the job's inputs): a job re-run because
    its data or code changed starts from step 0. ``max_steps`` stops early (tests use it to
    simulate a killed job). ``workers``: DataLoader processes per rank (0: the training
    process decodes). Under torch.distributed (``main`` under torchrun) each rank trains on
    its slice of every batch and rank 0 writes the files."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    master = rank == 0
    log.info("rank %d of %d, %d DataLoader workers", rank, world, workers)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(settings.seed)
    method = method_for(settings)
    model = method.build(device)
    counted = None
    if master:
        counted = count_samples(shards, settings)
    if distributed:  # one rank reads the tables; the others take its counts
        box = [counted]
        dist.broadcast_object_list(box, src=0)
        counted = box[0]
    counts, skipped = counted
    n_samples = sum(counts)
    log.info("%d samples an epoch; left out: %s", n_samples, dict(skipped) or "none")
    per_epoch = n_samples // settings.batch_size
    if per_epoch == 0:
        raise ValueError(
            f"no full batch of {settings.batch_size} annotated images for policy "
            f"{settings.policy!r}: {len(shards)} shards, {n_samples} samples; "
            f"left out: {dict(skipped) or 'none'}"
        )
    total = per_epoch * settings.epochs
    optimizer = torch.optim.AdamW(
        method.parameter_groups(model, settings.weight_decay),
        lr=settings.lr,
        betas=method.adam_betas,
        eps=method.adam_eps,
    )
    schedule = cosine_lr(optimizer, settings.lr, settings.warmup, total)
    checkpoint, metrics_path = out_dir / "checkpoint.pt", out_dir / "metrics.jsonl"
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "params.txt").write_text(
            "".join(f"{k}: {v}\n" for k, v in sorted(asdict(settings).items()))
        )
    fingerprint = json.dumps({"settings": asdict(settings), "data": data_id}, sort_keys=True)
    step = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state["settings"] == fingerprint:
            method.load_saved(model, state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step = state["step"]
            log.info("resuming at step %d of %d", step, total)
        else:
            log.info("%s is of other settings or data: training from step 0", checkpoint)
    if master:
        _truncate_metrics(metrics_path, step)
    trained = model
    if distributed:
        ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=method.find_unused_parameters
        )
    device_type = torch.device(device).type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda")
    min_side = math.ceil(DRAFT_MARGIN * method.input_side(model)) if draft else None
    model.train()
    metrics = metrics_path.open("a") if master else None
    while step < total and (max_steps is None or step < max_steps):
        epoch, done = divmod(step, per_epoch)
        pairs = Pairs(settings, epoch, method, min_side)
        batches = epoch_loader(
            shards, settings, epoch, pairs, workers, first=done, rank=rank, world=world
        )
        waited = time.perf_counter()
        for batch in batches:
            if (
                step >= total
                or (max_steps is not None and step >= max_steps)
                or (step // per_epoch != epoch)
            ):
                break
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            started = time.perf_counter()
            lr = schedule(step)
            # With features gathered with their gradients (ctx.gather), each rank's loss is the
            # global batch's and DDP's gradient average is one process's over the whole batch.
            ctx = Context(rank=rank, world=world, step=step, total=total)
            with autocast:
                loss, logs = method.loss(trained(**batch), ctx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            method.after_step(model, step, total)
            finished = time.perf_counter()
            step += 1
            if master:
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": round(loss.item(), 6),
                    "lr": lr,
                    "samples_per_s": round(settings.batch_size / (finished - waited), 2),
                    "data_wait": round((started - waited) / (finished - waited), 4),
                    **{k: round(float(v), 6) for k, v in logs.items()},
                }
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if step % settings.checkpoint_every == 0 or step == total:
                    _save(checkpoint, method.saved_state(model), optimizer, step, fingerprint)
            waited = time.perf_counter()
        del batches  # its workers end here
    if metrics is not None:
        metrics.close()
    if master and step == total:
        torch.save(
            {"model": method.saved_state(model), "settings": asdict(settings), "steps": step},
            out_dir / "model.pt",
        )
    if distributed:
        dist.barrier()  # every rank leaves once rank 0's files are whole
    return {
        "steps": step,
        "total_steps": total,
        "steps_per_epoch": per_epoch,
        "samples_per_epoch": n_samples,
        "left_out": dict(sorted(skipped.items())),
    }


def input_identity(paths: list[Path], code: str = "") -> str:
    """Path, size and modification time of every input, and the training code's fingerprint,
    hashed: it changes when Snakemake rewrites an input or the code's behaviour changes, and
    costs no read of the (at paper scale, terabytes of) data."""
    return fingerprint(code, file_identity(sorted(map(Path, paths))))


def _save(path: Path, model_state: dict, optimizer, step: int, fingerprint: str) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model_state,
            "optimizer": optimizer.state_dict(),
            "step": step,
            "settings": fingerprint,
        },
        tmp,
    )
    os.replace(tmp, path)  # a killed job leaves the previous checkpoint whole


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of the steps the checkpoint holds (a restart redoes the rest)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


# ------------------------------------------------------------------ torchrun entry point
def write_job(path: Path, shards: list[Shard], out_dir: Path, settings: TrainSettings, **kw):
    """A job file for ``main``: what ``train`` takes, as JSON."""
    job = {
        "shards": [[str(s.tar), str(s.status), [str(a) for a in s.annotations]] for s in shards],
        "out_dir": str(out_dir),
        "settings": asdict(settings),
        **kw,
    }
    path.write_text(json.dumps(job))


def main(argv: list[str] | None = None) -> None:
    """``python -m hic.train_clip JOB.json``, alone or under ``torchrun --nproc_per_node N``
    (DDP, set up by open_clip_train's ``init_distributed_device``). Rank 0 writes the run's
    summary to ``<out_dir>/summary.json``."""
    parser = argparse.ArgumentParser(description="Train one long-text CLIP run.")
    parser.add_argument("job", type=Path, help="JSON written by write_job")
    job = json.loads(parser.parse_args(argv).job.read_text())
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    args = SimpleNamespace(device="cuda" if torch.cuda.is_available() else "cpu")
    init_distributed_device(args)
    if job.get("workers"):  # the rank's other cores decode: more threads would only spin
        torch.set_num_threads(1)
    shards = [Shard(Path(t), Path(s), tuple(map(Path, a))) for t, s, a in job.pop("shards")]
    out_dir = Path(job.pop("out_dir"))
    settings = TrainSettings(**job.pop("settings"))
    summary = train(shards, out_dir, settings, device=args.device, **job)
    if is_master(args):
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
