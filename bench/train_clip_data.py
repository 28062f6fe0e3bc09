"""CLIP training data at scale: the project's loader vs the one it replaced (commit 627eb03).

    .venv/bin/python bench/train_clip_data.py [--part scale|decode|same|all]
        [--rows 12000000] [--shard-rows 10000] [--work /tmp/hic-bench-train-clip]
        [--images 512] [--repeats 3]

``scale``: ``--rows`` release rows (``hic.assemble.RELEASE_SCHEMA``; generated with
``bench/dataset_stats.py``'s ``release_shard``: 10 distinct shards of text, each written
under 120 sets of keys) in shards of ``--shard-rows``, with the download stage's status table
per shard. Only the first shard of the epoch gets a tar (``--shard-rows`` copies of one
768-px JPEG): nothing before the first step reads any other tar. In a fresh process each:

- project: ``train(max_steps=1)`` on the tiny CLIP with 2 DataLoader workers: seconds to the
  first step, and the count pass, first batch and peak RSS of the data side (the training
  process and its largest worker);
- baseline: the replaced ``load_annotations`` (every release row in a dict) on 1% of the
  shards, and its ``count_samples`` (a pass over the tars) on the one tar, both scaled by
  shards; the baseline cannot run at 12M on this machine (its dict alone is tens of GB).

``same``: 256 demo-world images in 4 tars (``bench/train_clip.py``'s data): the global
batches of the project's loader and the replaced one for epochs 0 and 1 and three policies,
compared as (image bytes, text, region box).

``decode``: ``--images`` demo scenes rendered at 768x576 (JPEG, quality 90) with their long
captions, decoded, augmented (ViT-B-16's training transform, 224 px) and tokenised (248
tokens), one epoch of batches of 32 and nothing else:

- baseline: the replaced loader in the main process (full-size decoding);
- project with reduced-size (draft) decoding, in the main process and with 2 workers;
- project, 2 workers, full-size decoding.

Alternating, ``--repeats`` times; median and range of samples/s; ratios to the baseline last.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))

from hic import demo_world  # noqa: E402
from hic.train_clip import (  # noqa: E402
    Pairs,
    TrainSettings,
    epoch_loader,
    epoch_order,
    load_image,
    pair_shards,
    stable_random,
    to_sample,
    train,
)

BASELINE_COMMIT = "627eb03"  # the last commit with the replaced loader
GENERATOR = 1  # bump when the generated data changes
BASE_SHARDS = 10
SETTINGS = TrainSettings(arch="HIC-Tiny-CLIP", policy="hierarchical", batch_size=32, seed=0)


def baseline_module():
    """hic.train_clip as of BASELINE_COMMIT, imported from git."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{BASELINE_COMMIT}:scripts/hic/train_clip.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "train_clip_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("train_clip_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def jpeg(image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def status_table(keys: list[str], alt: pa.Array, size: tuple[int, int]) -> pa.Table:
    n = len(keys)
    return pa.table(
        {
            "key": keys,
            "status": pa.repeat("success", n),
            "caption": alt,
            "original_width": pa.repeat(size[0], n),
            "original_height": pa.repeat(size[1], n),
        }
    )


# ------------------------------------------------------------------ scale
def write_scale_shard(work: Path, index: int, rows: int) -> None:
    """Release and status table of shard ``index``: base shard ``index % 10`` re-keyed."""
    base = pq.read_table(work / "base" / f"{index % BASE_SHARDS:05d}.parquet")
    keys = [f"{k:016x}" for k in range(index * rows, (index + 1) * rows)]
    table = base.set_column(0, "key", pa.array(keys))
    table = table.set_column(1, "url", pa.array([f"https://img.example.org/{k}.jpg" for k in keys]))
    pq.write_table(table, work / "dataset" / f"{index:05d}.parquet")
    alt = pa.array([f"a photo, number {k}" for k in range(index * rows, (index + 1) * rows)])
    pq.write_table(status_table(keys, alt, (1024, 768)), work / "images" / f"{index:05d}.parquet")


def write_base(work: Path, index: int, rows: int) -> None:
    from dataset_stats import release_shard

    pq.write_table(release_shard(index, rows, 0), work / "base" / f"{index:05d}.parquet")


def ensure_scale(work: Path, rows: int, shard_rows: int) -> list:
    """The generated release and status tables, and the first shard's tar; reused when the
    same sizes are there already."""
    n_shards = rows // shard_rows
    plan = {"generator": GENERATOR, "rows": rows, "shard_rows": shard_rows}
    marker = work / "plan.json"
    tars = [work / "images" / f"{i:05d}.tar" for i in range(n_shards)]
    dataset = [work / "dataset" / f"{i:05d}.parquet" for i in range(n_shards)]
    shards = pair_shards(tars, dataset, aligned=True)
    if marker.exists() and json.loads(marker.read_text()) == plan:
        print(f"scale: {rows:,} rows in {n_shards} shards, reused from {work}")
        return shards
    start = time.perf_counter()
    for sub in ("base", "dataset", "images"):
        (work / sub).mkdir(parents=True, exist_ok=True)
        for stale in (work / sub).iterdir():
            stale.unlink()
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(write_base, [work] * BASE_SHARDS, range(BASE_SHARDS), [shard_rows] * 10))
        list(
            pool.map(write_scale_shard, [work] * n_shards, range(n_shards), [shard_rows] * n_shards)
        )
    # The epoch's first shard, the only tar read before the first step.
    first = list(shards)
    stable_random(SETTINGS.seed, 0, "shards").shuffle(first)
    keys = pq.read_table(first[0].status, columns=["key"])["key"].to_pylist()
    image = jpeg(demo_world.render(demo_world.make_scene(np.random.default_rng(0), 768, 576)))
    with tarfile.open(first[0].tar, "w") as tar:
        for key in keys:
            add(tar, f"{key}.jpg", image)
            add(tar, f"{key}.txt", b"a photo")
    marker.write_text(json.dumps(plan))
    size = sum(f.stat().st_size for f in dataset) / 2**30
    print(
        f"scale: {rows:,} rows in {n_shards} shards ({size:.1f} GiB of release) generated in "
        f"{time.perf_counter() - start:.0f} s"
    )
    return shards


def peak_rss() -> dict:
    return {
        "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "children_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
    }


def step_project(work: Path, rows: int, shard_rows: int) -> dict:
    """train() to its first step, with 2 workers; the count pass and first batch timed apart."""
    import torch

    from hic import train_clip

    torch.set_num_threads(1)
    shards = ensure_scale(work, rows, shard_rows)
    marks = {}
    count, plan = train_clip.count_samples, train_clip.epoch_order

    def timed_count(*args, **kw):
        marks["count_start"] = time.perf_counter()
        result = count(*args, **kw)
        marks["count_end"] = time.perf_counter()
        return result

    def timed_plan(*args, **kw):
        marks["plan_start"] = time.perf_counter()
        yield from plan(*args, **kw)

    train_clip.count_samples, train_clip.epoch_order = timed_count, timed_plan
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = train(shards, Path(out), SETTINGS, max_steps=1, workers=2)
        first_step = time.perf_counter() - start
        metric = json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[0])
    step_seconds = SETTINGS.batch_size / metric["samples_per_s"]
    return {
        "first_step_s": first_step,
        "count_s": marks["count_end"] - marks["count_start"],
        "plan_to_step_s": start + first_step - marks["plan_start"],
        "step_s": step_seconds,
        "samples": summary["samples_per_epoch"],
        **peak_rss(),
    }


def step_baseline(work: Path, rows: int, shard_rows: int) -> dict:
    """The replaced loader's two passes before step 0, on 1% of the shards / the one tar."""
    before = baseline_module()
    shards = ensure_scale(work, rows, shard_rows)
    part = shards[: max(1, len(shards) // 100)]
    imported = peak_rss()["rss_gib"]  # torch and open_clip, before any row
    start = time.perf_counter()
    annotations = before.load_annotations([s.annotations[0] for s in part])
    load_s = time.perf_counter() - start
    rss = peak_rss()["rss_gib"] - imported
    tar = next(s for s in shards if s.tar.exists())
    keys = pq.read_table(tar.status, columns=["key"])["key"].to_pylist()
    annotations.update(before.load_annotations([tar.annotations[0]]))
    start = time.perf_counter()
    counted, _ = before.count_samples([tar.tar], annotations, {}, SETTINGS)
    count_s = time.perf_counter() - start
    return {
        "load_s": load_s,
        "load_shards": len(part),
        "load_rss_gib": rss,
        "imported_rss_gib": imported,
        "tar_count_s": count_s,
        "tar_samples": counted,
        "tar_gib": tar.tar.stat().st_size / 2**30,
        "keys": len(keys),
    }


# ------------------------------------------------------------------ same batches
def step_same(work: Path) -> dict:
    """Global batches of both loaders on demo data, as (image bytes, text, box)."""
    from train_clip import write_data

    before = baseline_module()
    with tempfile.TemporaryDirectory() as tmp:
        tars, ref, sizes = write_data(Path(tmp), 256, 4)
        for tar in tars:  # the status tables the download stage writes beside its tars
            with tarfile.open(tar) as t:
                alt = {m.name[:-4]: t.extractfile(m).read().decode() for m in t if ".txt" in m.name}
            keys = list(alt)
            pq.write_table(
                status_table(keys, pa.array(list(alt.values())), (192, 144)),
                tar.with_suffix(".parquet"),
            )
        shards = pair_shards(tars, [ref], aligned=False)
        compared = 0
        for policy in ("hierarchical", "alt", "regions"):
            settings = TrainSettings(**{**SETTINGS.__dict__, "policy": policy})
            for epoch in (0, 1):
                annotations = before.load_annotations([ref])
                old = [
                    [(data, text, box) for data, text, box, _ in batch]
                    for batch in before.caption_batches(
                        before.epoch_samples(tars, annotations, sizes, settings, epoch), 32, True
                    )
                ]
                new = []
                batches = before.caption_batches(epoch_order(shards, settings, epoch), 32, True)
                for batch in batches:
                    rows = []
                    for item in batch:
                        sample = to_sample(*item)
                        rng = stable_random(settings.seed, epoch, sample.key)
                        from hic.train_clip import caption_for

                        text, region = caption_for(
                            policy, sample.alt, sample.record, rng, settings.mix
                        )
                        with open(sample.tar, "rb") as f:
                            f.seek(sample.offset)
                            data = f.read(sample.size)
                        rows.append((data, text, region["bbox"] if region else None))
                    new.append(rows)
                if old != new:
                    return {"identical": False, "policy": policy, "epoch": epoch}
                compared += len(old)
    return {"identical": True, "batches": compared}


# ------------------------------------------------------------------ decode
def write_decode_data(folder: Path, n_images: int):
    rng = np.random.default_rng(1)
    reference, keys, alts = [], [], []
    tar_path = folder / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(n_images):
            scene = demo_world.make_scene(rng, 768, 576)
            key, long = f"{i:016x}", demo_world.long_caption(scene)
            add(tar, f"{key}.jpg", jpeg(demo_world.render(scene)))
            add(tar, f"{key}.txt", long.encode())
            keys.append(key)
            alts.append(long)
            reference.append(
                {
                    "key": key,
                    "url": f"bench:{i}",
                    "width": 768,
                    "height": 576,
                    "short_caption": demo_world.short_caption(scene),
                    "long_caption": long,
                    "regions": demo_world.regions(scene),
                    "source": "bench",
                    "seed": 0,
                }
            )
    ref = folder / "reference.parquet"
    pq.write_table(pa.Table.from_pylist(reference, schema=demo_world.REFERENCE_SCHEMA), ref)
    pq.write_table(status_table(keys, pa.array(alts), (768, 576)), folder / "00000.parquet")
    return [tar_path], ref, {k: (768, 576) for k in keys}


def decode_runs(tars, ref, sizes, repeats: int) -> dict[str, list[float]]:
    import torch

    from hic.clip_model import create_long_clip

    torch.set_num_threads(1)
    before = baseline_module()
    settings = TrainSettings(**{**SETTINGS.__dict__, "policy": "long", "arch": "ViT-B-16"})
    model, train_tf, _, tokenizer = create_long_clip("ViT-B-16", pretrained=None, keep=20, factor=4)
    shards = pair_shards(tars, [ref], aligned=False)

    def baseline() -> int:
        annotations = before.load_annotations([ref])
        samples = before.epoch_samples(tars, annotations, sizes, settings, 0)
        n = 0
        for batch in before.caption_batches(samples, settings.batch_size, drop_last=True):
            images = [before.load_image(data, box, size) for data, _, box, size in batch]
            torch.stack([train_tf(im) for im in images])
            tokenizer([text for _, text, _, _ in batch])
            n += len(batch)
        return n

    def project(workers: int, draft: bool) -> int:
        pairs = Pairs(settings, 0, train_tf, tokenizer, 280 if draft else None)
        return sum(len(images) for images, _ in epoch_loader(shards, settings, 0, pairs, workers))

    # Per sample, one process, best of 5 passes over 64 images: the least disturbed figure on
    # a shared machine, for the reduced-size decoding alone.
    with open(tars[0], "rb") as f:
        images = [f.read()]
    samples = [to_sample(*item) for item in islice(epoch_order(shards, settings, 0), 64)]
    blobs = [(images[0][s.offset : s.offset + s.size], s.record["long_caption"]) for s in samples]
    per_sample = {}
    for name, min_side in (("full-size", None), ("draft", 280)):

        def one_pass(min_side=min_side):
            for blob, text in blobs:
                train_tf(load_image(blob, None, None, min_side))
                tokenizer([text])

        per_sample[name] = min(timed(one_pass) for _ in range(5)) / len(blobs)
        print(f"per sample, decode + augment + tokenise, {name}: {1000 * per_sample[name]:.1f} ms")
    sides = {
        "baseline: replaced loader, main process": baseline,
        "project: draft decoding, main process": lambda: project(0, True),
        "project: draft decoding, 2 workers": lambda: project(2, True),
        "project: full decoding, 2 workers": lambda: project(2, False),
    }
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(repeats):
        for name, run in sides.items():
            start = time.perf_counter()
            n = run()
            rates[name].append(n / (time.perf_counter() - start))
            print(f"run {r} {name}: {rates[name][-1]:.1f} samples/s", flush=True)
    return rates, per_sample["full-size"] / per_sample["draft"]


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


# ------------------------------------------------------------------ main
def measured(step: str, args) -> dict:
    """Run ``step`` in a fresh process (its own peak RSS); its JSON result."""
    command = [sys.executable, __file__, "--step", step, "--work", str(args.work)]
    command += ["--rows", str(args.rows), "--shard-rows", str(args.shard_rows)]
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def report_scale(args) -> None:
    ensure_scale(args.work, args.rows, args.shard_rows)
    n_shards = args.rows // args.shard_rows
    for r in range(args.repeats):
        p = measured("project", args)
        print(
            f"project run {r}: first step {p['first_step_s']:.1f} s after train() began "
            f"(count pass {p['count_s']:.1f} s over {n_shards} shards, {p['samples']:,} "
            f"samples; plan to the end of step 1 {p['plan_to_step_s']:.1f} s, of it the step "
            f"{p['step_s']:.2f} s); peak RSS {p['rss_gib']:.2f} GiB, largest worker "
            f"{p['children_rss_gib']:.2f} GiB",
            flush=True,
        )
    b = measured("baseline", args)
    scale = n_shards / b["load_shards"]
    print(
        f"baseline: load_annotations of {b['load_shards']} shards {b['load_s']:.1f} s, "
        f"+{b['load_rss_gib']:.2f} GiB RSS over the {b['imported_rss_gib']:.2f} GiB of imports "
        f"(x{scale:.0f}: {b['load_s'] * scale:.0f} s, {b['load_rss_gib'] * scale:.0f} GiB); "
        f"count pass over one tar of {b['tar_gib']:.2f} "
        f"GiB {b['tar_count_s']:.1f} s ({b['tar_samples']:,} samples; x{n_shards}: "
        f"{b['tar_count_s'] * n_shards / 60:.0f} min)"
    )
    first = b["load_s"] * scale + b["tar_count_s"] * n_shards
    print(f"ratio baseline/project, time to the first step: {first / p['first_step_s']:.0f}")


def report_decode(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        data = write_decode_data(Path(tmp), args.images)
        written = time.perf_counter() - start
        print(f"decode: {args.images} images of 768x576 written in {written:.0f} s")
        rates, draft_alone = decode_runs(*data, args.repeats)
    for name, values in rates.items():
        print(
            f"{name}: median {statistics.median(values):.1f} samples/s "
            f"(range {min(values):.1f}-{max(values):.1f})"
        )
    print(f"ratio per sample, full-size / draft decoding (one process): {draft_alone:.2f}")
    base = statistics.median(rates["baseline: replaced loader, main process"])
    names = list(rates)
    for name in names[1:]:
        print(
            f"ratio {name.split(': ')[1]} / baseline: {statistics.median(rates[name]) / base:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["scale", "decode", "same", "all"], default="all")
    parser.add_argument("--rows", type=int, default=12_000_000)
    parser.add_argument("--shard-rows", type=int, default=10_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hic-bench-train-clip"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step", help=argparse.SUPPRESS)  # a measured child
    args = parser.parse_args()
    if args.step:
        steps = {"project": step_project, "baseline": step_baseline}
        print(json.dumps(steps[args.step](args.work, args.rows, args.shard_rows)))
        return
    if args.part in ("same", "all"):
        print(f"same batches as the replaced loader on demo data: {step_same(args.work)}")
    if args.part in ("scale", "all"):
        report_scale(args)
    if args.part in ("decode", "all"):
        report_decode(args)


if __name__ == "__main__":
    main()
