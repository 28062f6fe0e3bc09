"""Long-text CLIP training on download tars joined with hierarchical annotations.

Data: the download stage's webdataset tars, streamed with ``webdataset``, joined by key with an
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

Reproducible and resumable: the sample order of an epoch is a function of (seed, epoch), each
sample's caption choice a function of (seed, epoch, key), and a checkpoint every
``checkpoint_every`` steps holds model, optimiser and step; a restarted run skips the samples
it has already trained on and reaches the same weights as an uninterrupted one (on CPU).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import torch
import webdataset as wds
from open_clip import ClipLoss
from open_clip_train.scheduler import cosine_lr
from PIL import Image

from hic.clip_model import create_long_clip
from hic.parts import batches as caption_batches

log = logging.getLogger(__name__)

POLICIES = ("alt", "short", "long", "regions", "hierarchical")
MIX_KINDS = ("short", "long", "region")


@dataclass(frozen=True)
class TrainSettings:
    """One entry of the config's ``clip.runs``, merged over ``clip.defaults``."""

    policy: str = "hierarchical"
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


def stable_random(*parts: object) -> random.Random:
    """A Random seeded from ``parts`` alone (Python's own str hash is salted per process)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def load_annotations(files: list[Path]) -> dict[str, dict]:
    """key -> short, long and region captions of the release files (captions only)."""
    columns = ["key", "short_caption", "long_caption", "regions"]
    annotations = {}
    for path in files:
        for row in pq.read_table(path, columns=columns).to_pylist():
            row["regions"] = [r for r in row["regions"] or [] if r.get("caption")]
            annotations[row.pop("key")] = row
    return annotations


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


def epoch_samples(
    tars: list[Path],
    annotations: dict[str, dict],
    sizes: dict[str, tuple[int, int]],
    settings: TrainSettings,
    epoch: int,
    shuffle_buffer: int = 256,
    skipped: Counter | None = None,
) -> Iterator[tuple[bytes, str, list[float] | None, tuple[int, int] | None]]:
    """(image bytes, text, region box, original size) of one epoch, in an order fixed by
    (seed, epoch). Images stay encoded here: counting an epoch, or skipping what a restarted
    run already trained on, decodes nothing (``load_image`` decodes what a step uses).
    ``skipped`` counts the tar samples left out, by reason."""
    skipped = Counter() if skipped is None else skipped
    order = list(tars)
    stable_random(settings.seed, epoch, "shards").shuffle(order)
    stream = wds.WebDataset([str(t) for t in order], shardshuffle=False, empty_check=False)
    buffer: list = []
    shuffler = stable_random(settings.seed, epoch, "buffer")
    for sample in stream:
        key = sample["__key__"]
        image_bytes = next((sample[e] for e in ("jpg", "png", "webp") if e in sample), None)
        if key not in annotations or image_bytes is None:
            skipped["no annotation" if image_bytes is not None else "no image"] += 1
            continue
        rng = stable_random(settings.seed, epoch, key)
        alt = sample.get("txt", b"").decode("utf-8", "replace")
        text, region = caption_for(settings.policy, alt, annotations[key], rng, settings.mix)
        if not text:
            skipped[f"no caption for policy {settings.policy}"] += 1
            continue
        box = region["bbox"] if region is not None else None
        buffer.append((image_bytes, text, box, sizes.get(key)))
        if len(buffer) >= shuffle_buffer:
            yield buffer.pop(shuffler.randrange(len(buffer)))
    shuffler.shuffle(buffer)
    yield from buffer


def load_image(image_bytes: bytes, box: list[float] | None, size: tuple[int, int] | None):
    """The sample's image, cropped to its region when the caption is a region's."""
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    return image if box is None else crop_to(image, box, size or image.size)


def count_samples(tars, annotations, sizes, settings) -> tuple[int, Counter]:
    """Samples of epoch 0 (the same every epoch up to the seeded caption choice), and the
    tar samples left out, by reason."""
    skipped: Counter = Counter()
    samples = epoch_samples(tars, annotations, sizes, settings, 0, 1, skipped)
    return sum(1 for _ in samples), skipped


def train(
    tars: list[Path],
    annotation_files: list[Path],
    sizes: dict[str, tuple[int, int]],
    out_dir: Path,
    settings: TrainSettings,
    *,
    data_id: str = "",
    max_steps: int | None = None,
) -> dict:
    """Train (or resume) one run into ``out_dir``: model.pt, metrics.jsonl, params.txt.

    A checkpoint in ``out_dir`` is resumed only when it was written under the same settings
    and the same ``data_id`` (``input_identity`` of the job's inputs): a job re-run because
    its data or code changed starts from step 0. ``max_steps`` stops early (tests use it to
    simulate a killed job)."""
    torch.manual_seed(settings.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, train_tf, _, tokenizer = create_long_clip(
        settings.arch,
        pretrained=settings.pretrained,
        keep=settings.keep_positions,
        factor=settings.stretch,
        device=device,
    )
    annotations = load_annotations(annotation_files)
    n_samples, skipped = count_samples(tars, annotations, sizes, settings)
    log.info("%d samples an epoch; left out: %s", n_samples, dict(skipped) or "none")
    per_epoch = n_samples // settings.batch_size
    if per_epoch == 0:
        raise ValueError(
            f"no full batch of {settings.batch_size} annotated images for policy "
            f"{settings.policy!r}: {len(annotations)} annotations, {len(tars)} tars, "
            f"{n_samples} samples; left out: {dict(skipped) or 'none'}"
        )
    total = per_epoch * settings.epochs
    optimizer = torch.optim.AdamW(
        param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.98), eps=1e-6
    )
    schedule = cosine_lr(optimizer, settings.lr, settings.warmup, total)
    loss_fn = ClipLoss()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.txt").write_text(
        "".join(f"{k}: {v}\n" for k, v in sorted(asdict(settings).items()))
    )
    checkpoint, metrics_path = out_dir / "checkpoint.pt", out_dir / "metrics.jsonl"
    fingerprint = json.dumps({"settings": asdict(settings), "data": data_id}, sort_keys=True)
    step = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state["settings"] == fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])  # the augmentations continue where they were
            step = state["step"]
            log.info("resuming at step %d of %d", step, total)
        else:
            log.info("%s is of other settings or data: training from step 0", checkpoint)
    _truncate_metrics(metrics_path, step)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    model.train()
    with metrics_path.open("a") as metrics:
        while step < total and (max_steps is None or step < max_steps):
            epoch, done = divmod(step, per_epoch)
            samples = epoch_samples(tars, annotations, sizes, settings, epoch)
            # A last partial batch is dropped: every step sees batch_size pairs.
            batches = caption_batches(samples, settings.batch_size, drop_last=True)
            for _ in range(done):  # what this epoch trained on before a restart
                next(batches, None)
            waited = time.perf_counter()
            for batch in batches:
                if (
                    step >= total
                    or (max_steps is not None and step >= max_steps)
                    or (step // per_epoch != epoch)
                ):
                    break
                images = [load_image(data, box, size) for data, _, box, size in batch]
                images = torch.stack([train_tf(im) for im in images]).to(device)
                texts = tokenizer([text for _, text, _, _ in batch]).to(device)
                started = time.perf_counter()
                lr = schedule(step)
                with autocast:
                    out = model(images, texts)
                    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():  # CLIP's temperature clamp
                    model.logit_scale.clamp_(0, math.log(100))
                finished = time.perf_counter()
                step += 1
                metrics.write(
                    json.dumps(
                        {
                            "step": step,
                            "epoch": epoch,
                            "loss": round(loss.item(), 6),
                            "lr": lr,
                            "samples_per_s": round(len(batch) / (finished - waited), 2),
                            "data_wait": round((started - waited) / (finished - waited), 4),
                        }
                    )
                    + "\n"
                )
                metrics.flush()
                if step % settings.checkpoint_every == 0 or step == total:
                    _save(checkpoint, model, optimizer, step, fingerprint)
                waited = time.perf_counter()
    if step == total:
        torch.save(
            {"model": model.state_dict(), "settings": asdict(settings), "steps": step},
            out_dir / "model.pt",
        )
    return {
        "steps": step,
        "total_steps": total,
        "steps_per_epoch": per_epoch,
        "samples_per_epoch": n_samples,
        "left_out": dict(sorted(skipped.items())),
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as open_clip_train makes them: no weight decay on gains, biases, norms
    and the temperature (parameters under 2-D, or named bn/ln/bias/logit_scale)."""
    groups: dict[bool, list] = {True: [], False: []}
    for name, param in model.named_parameters():
        exempt = param.ndim < 2 or any(k in name for k in ("bn", "ln", "bias", "logit_scale"))
        groups[not exempt].append(param)
    return [
        {"params": groups[False], "weight_decay": 0.0},
        {"params": groups[True], "weight_decay": weight_decay},
    ]


def input_identity(paths: list[Path], code: str = "") -> str:
    """Path, size and modification time of every input, and the training code's fingerprint,
    hashed: it changes when Snakemake rewrites an input or the code's behaviour changes, and
    costs no read of the (at paper scale, terabytes of) data."""
    stats: list = [code]
    for path in sorted(map(Path, paths)):
        stat = path.stat()
        stats.append((str(path), stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def _save(path: Path, model, optimizer, step: int, fingerprint: str) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "settings": fingerprint,
            "rng": torch.get_rng_state(),
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
