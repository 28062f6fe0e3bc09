"""Global dataset statistics at paper scale: merged per-shard summaries vs DuckDB over the text.

    .venv/bin/python bench/dataset_stats.py [--rows 12000000] [--shard-rows 10000]
                                            [--work /tmp/hic-bench-dataset-stats]

Generates ``--rows`` release rows (``hic.assemble.RELEASE_SCHEMA``, written as the assemble
stage writes them) in shards of ``--shard-rows``: short captions of ~20 words, long ones of
~170, ~3 regions per image with a label and a caption of 30-60 words, a few percent of captions
missing. Text is drawn from a Zipf-weighted word pool (the curated vocabularies and common
caption words), single-spaced. The release is kept under ``--work``: a rerun with the same sizes
skips generation. Then, each in its own process (wall time and that process's peak RSS):

- upstream: ``hic.assemble.release_summary`` of every shard, what the assemble stage adds per
  shard (the shard is read first, untimed: assemble has it in memory);
- project: ``hic.dataset_stats.dataset_stats`` over the summaries, the global stage's figures
  (median of 5 runs), then its outputs (CSV tables, markdown, JSON, plot) timed apart;
- baseline: DuckDB over the full release with the string work at query time: caption words as
  ``len(string_split(caption, ' '))``, the caption-length table (count, missing, min,
  quantile_disc, max, mean per kind) as the global stage reports it.

Checks that the baseline's caption-length table is identical to the project's, and prints the
ratio baseline / project last.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from hic.assemble import REGION_TYPE, RELEASE_SCHEMA, release_summary  # noqa: E402

STATS = yaml.safe_load((REPO / "config.yaml").read_text())["stats"]
GENERATOR = 2  # bump when the generated data changes, so cached releases are regenerated

COMMON = (
    "a an the of in on at with and near under over behind beside its his her their this that "
    "is are sits stands lies rests hangs leans shows appears wearing holding looking facing "
    "large small tall short wide narrow bright dark pale soft rough smooth old new wooden metal "
    "red blue green yellow white black brown grey orange pink purple golden silver striped "
    "left right center front back top bottom corner edge side middle background foreground "
    "light shadow surface texture pattern detail scene image view frame area part piece "
    "several two three many some few each other which while where whose from into across "
    "along around between above below toward against through during after before warm cool "
    "clear cloudy sunny quiet busy calm empty crowded natural modern rustic simple ornate "
    "slightly partly mostly gently clearly visible covered filled surrounded framed lined"
).split()
LABEL_SOURCES = (["accurate", "corrected", "unparsed"], [0.85, 0.12, 0.03])
CAPTION_SOURCES = (["llm", "fallback", "failed"], [0.93, 0.05, 0.02])
SCENE_STATUS = (["ok", "unparsed", "failed"], [0.97, 0.025, 0.005])
REGION_COUNTS = ([0, 1, 2, 3, 4, 5], [0.02, 0.06, 0.15, 0.45, 0.2, 0.12])


def vocabulary(name: str) -> list[str]:
    lines = (REPO / "data/vocabulary" / f"{name}.txt").read_text().splitlines()
    return [w for w in (line.strip() for line in lines) if w and not w.startswith("#")]


class WordPool:
    """Words as one byte buffer, each preceded by a space; Zipf weights in a fixed order."""

    def __init__(self, words: list[str]) -> None:
        encoded = [w.encode() for w in words]
        self.length = np.array([len(w) for w in encoded], np.int32)
        self.start = np.cumsum(self.length + 1, dtype=np.int32) - self.length  # after the space
        self.buffer = np.frombuffer(b"".join(b" " + w for w in encoded), np.uint8)
        weights = 1 / np.arange(1, len(words) + 1)
        self.p = weights / weights.sum()

    def texts(self, rng: np.random.Generator, lengths: np.ndarray) -> pa.Array:
        """One text per entry of ``lengths`` words, single-spaced; null where it is 0."""
        ids = rng.choice(len(self.p), int(lengths.sum()), p=self.p)
        word_offsets = np.concatenate([[0], np.cumsum(lengths)])
        first = np.zeros(len(ids), bool)
        first[word_offsets[:-1][lengths > 0]] = True
        # every word but a text's first takes the space before it in the pool buffer
        token_length = self.length[ids] + ~first
        token_source = self.start[ids] - ~first
        byte_offsets = np.concatenate([[0], np.cumsum(token_length)]).astype(np.int32)
        gather = np.repeat(token_source - byte_offsets[:-1], token_length) + np.arange(
            byte_offsets[-1], dtype=np.int32
        )
        texts = pa.StringArray.from_buffers(
            len(lengths),
            pa.py_buffer(byte_offsets[word_offsets]),
            pa.py_buffer(self.buffer[gather]),
        )
        return pc.if_else(pa.array(lengths > 0), texts, pa.scalar(None, pa.string()))


def draw(rng: np.random.Generator, choices: tuple[list, list[float]], n: int) -> np.ndarray:
    values, p = choices
    return np.asarray(values)[rng.choice(len(values), n, p=p)]


def word_lengths(rng: np.random.Generator, mean: float, sd: float, low: int, n: int) -> np.ndarray:
    return np.maximum(low, rng.normal(mean, sd, n).round()).astype(np.int32)


def list_array(counts: np.ndarray, values: pa.Array, type_: pa.DataType) -> pa.ListArray:
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32())
    return pa.ListArray.from_arrays(offsets, values, type=type_)


def region_lists(
    rng: np.random.Generator, pool: WordPool, labels: np.ndarray, counts: np.ndarray
) -> tuple[pa.ListArray, pa.ListArray]:
    """(regions, region_words) of images with ``counts`` regions: the last one background."""
    n = int(counts.sum())
    caption_source = draw(rng, CAPTION_SOURCES, n)
    words = np.where(caption_source == "failed", 0, rng.integers(30, 61, n)).astype(np.int32)
    last = np.cumsum(counts)[counts > 0] - 1
    kind = np.full(n, "foreground", dtype=object)
    kind[last] = "background"
    boxes = rng.uniform(0, 500, (n, 4)).round(1).ravel()
    structs = pa.StructArray.from_arrays(
        [
            pa.array(labels[rng.integers(0, len(labels), n)]),
            list_array(np.full(n, 4), pa.array(boxes), pa.list_(pa.float64())),
            pool.texts(rng, words),
            pa.array(kind, pa.string()),
            pa.array(rng.uniform(0.1, 1, n)),
            pa.array(draw(rng, LABEL_SOURCES, n)),
            pa.array(caption_source),
        ],
        fields=list(REGION_TYPE),
    )
    return (
        list_array(counts, structs, pa.list_(REGION_TYPE)),
        list_array(counts, pa.array(words), pa.list_(pa.int32())),
    )


def release_shard(index: int, rows: int, first_key: int) -> pa.Table:
    """``rows`` release rows, seeded by the shard ``index``."""
    rng = np.random.default_rng([GENERATOR, index])
    labels = vocabulary("things") + vocabulary("stuff")
    # single words: "traffic light" is two words of a caption
    pool = WordPool(list(dict.fromkeys(COMMON + " ".join(labels).split())))
    status = draw(rng, SCENE_STATUS, rows)
    ok = status == "ok"
    short = np.where(ok, word_lengths(rng, 20, 5, 3, rows), 0).astype(np.int32)
    long = np.where(ok, word_lengths(rng, 170, 35, 40, rows), 0).astype(np.int32)
    counts = draw(rng, REGION_COUNTS, rows).astype(np.int32)
    regions, region_words = region_lists(rng, pool, np.array(labels), counts)
    keys = [f"{k:016x}" for k in range(first_key, first_key + rows)]
    provenance = json.dumps({"verify_labels": {"model": "Qwen/Qwen2.5-VL-7B-Instruct"}})
    alt_rng = np.random.default_rng([index, 1])  # own stream: other columns unchanged
    return pa.table(
        {
            "key": keys,
            "url": [f"https://images.example.org/{k}.jpg" for k in keys],
            "alt_text": pool.texts(alt_rng, word_lengths(alt_rng, 10, 5, 1, rows)),
            "width": rng.integers(256, 2048, rows),
            "height": rng.integers(256, 2048, rows),
            "short_caption": pool.texts(rng, short),
            "long_caption": pool.texts(rng, long),
            "regions": regions,
            "regions_note": pa.array(np.where(counts == 0, "no proposal", None), pa.string()),
            "scene_status": status,
            "scene_model": pa.repeat("Qwen/Qwen2.5-VL-7B-Instruct", rows),
            "scene_model_revision": pa.repeat("cc594898", rows),
            "scene_prompt_hash": pa.repeat("242f25ffb505c626", rows),
            "region_provenance": pa.repeat(provenance, rows),
            # two code versions: the provenance table has more than one row
            "code_version": pa.repeat("v1.0" if index % 3 else "v1.1", rows),
            "short_words": short,
            "long_words": long,
            "region_count": counts,
            "region_words": region_words,
        },
        schema=RELEASE_SCHEMA,
    )


def write_shard(folder: Path, index: int, rows: int, first_key: int) -> None:
    pq.write_table(release_shard(index, rows, first_key), folder / f"{index:05d}.parquet")


def ensure_release(work: Path, rows: int, shard_rows: int) -> list[Path]:
    """The generated release shards under ``work``; generated unless the same ones are there."""
    folder = work / "release"
    plan = {"generator": GENERATOR, "rows": rows, "shard_rows": shard_rows}
    sizes = [min(shard_rows, rows - start) for start in range(0, rows, shard_rows)]
    files = [folder / f"{i:05d}.parquet" for i in range(len(sizes))]
    marker = work / "release.json"
    if marker.exists() and json.loads(marker.read_text()) == plan:
        print(f"release: {rows:,} rows in {len(files)} shards, reused from {folder}")
        return files
    marker.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.parquet"):
        stale.unlink()
    start = time.perf_counter()
    write_shard(folder, 0, sizes[0], 0)  # first, to size the whole release
    needed = files[0].stat().st_size * rows / sizes[0] * 1.05
    free = shutil.disk_usage(folder).free + files[0].stat().st_size
    if needed > free:
        fits = int(rows * free / needed) // shard_rows * shard_rows
        raise SystemExit(
            f"{rows:,} rows need about {needed / 2**30:.1f} GiB, {folder} has "
            f"{free / 2**30:.1f} GiB free: use --rows {fits} or another --work"
        )
    rest = range(1, len(sizes))
    with ProcessPoolExecutor() as pool:
        list(pool.map(write_shard, [folder] * len(rest), rest, sizes[1:], np.cumsum(sizes)[:-1]))
    marker.write_text(json.dumps(plan))
    print(
        f"release: {rows:,} rows in {len(files)} shards generated in "
        f"{time.perf_counter() - start:.0f} s"
    )
    return files


# ------------------------------------------------------------------ the three measured steps
def upstream(work: Path) -> dict:
    """Summarise every release shard; seconds of release_summary (and of writing it) alone."""
    out = work / "summary"
    out.mkdir(exist_ok=True)
    for stale in out.glob("*.parquet"):
        stale.unlink()
    summarise = write = 0.0
    files = sorted((work / "release").glob("*.parquet"))
    for f in files:
        table = pq.read_table(f)
        start = time.perf_counter()
        summary = release_summary(table)
        middle = time.perf_counter()
        pq.write_table(summary, out / f.name)
        summarise, write = summarise + middle - start, write + time.perf_counter() - middle
    return {"seconds": summarise, "write_seconds": write, "shards": len(files)}


def project(work: Path, repeats: int = 5) -> dict:
    """The global stage over the summaries: its figures (median of ``repeats`` runs: it is
    short, and the machine is shared), then its outputs."""
    from hic.dataset_stats import dataset_stats, plot_dataset, summary_dict, summary_markdown

    summaries = sorted((work / "summary").glob("*.parquet"))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        tables = dataset_stats(
            summaries, quantiles=STATS["quantiles"], top_labels=STATS["top_labels"]
        )
        runs.append(time.perf_counter() - start)
    start = time.perf_counter()
    out = work / "stats"
    (out / "tables").mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_csv(out / "tables" / f"{name}.csv", index=False)
    (out / "dataset_summary.md").write_text(summary_markdown(tables))
    (out / "dataset_summary.json").write_text(json.dumps(summary_dict(tables), indent=2))
    plot_dataset(tables, out / "dataset.png")
    outputs = time.perf_counter() - start
    tables["caption_words"].to_parquet(work / "project_caption_words.parquet")
    return {"seconds": statistics.median(runs), "runs": runs, "outputs_seconds": outputs}


def words(column: str) -> str:
    return f"coalesce(len(string_split({column}, ' ')), 0)::INTEGER AS words"


def baseline(work: Path) -> dict:
    """Caption lengths per kind, the words counted from the text at query time."""
    import duckdb

    quantiles = ", ".join(
        f'quantile_disc(words, {q}) FILTER (words > 0) AS "q{q:g}"' for q in STATS["quantiles"]
    )
    release = str(work / "release" / "*.parquet")
    sql = (
        f"WITH words AS (SELECT 'short' AS kind, {words('short_caption')} FROM '{release}' "
        f"UNION ALL SELECT 'long', {words('long_caption')} FROM '{release}' "
        f"UNION ALL SELECT 'region', {words('r.caption')} "
        f"FROM (SELECT unnest(regions) AS r FROM '{release}')) "
        f"SELECT kind, count(*) FILTER (words > 0) AS n, count(*) FILTER (words = 0) AS missing, "
        f"min(words) FILTER (words > 0) AS min, {quantiles}, max(words) FILTER (words > 0) "
        f"AS max, round(avg(words) FILTER (words > 0), 2) AS mean FROM words GROUP BY kind "
        f"ORDER BY list_position(['short', 'long', 'region'], kind)"
    )
    start = time.perf_counter()
    table = duckdb.sql(sql).df()
    seconds = time.perf_counter() - start
    table.to_parquet(work / "baseline_caption_words.parquet")
    return {"seconds": seconds}


STEPS = {"upstream": upstream, "project": project, "baseline": baseline}


def measured(step: str, work: Path) -> dict:
    """Run ``step`` in a fresh process; its result with that process's peak RSS in GiB."""
    proc = subprocess.run(
        [sys.executable, __file__, "--step", step, "--work", str(work)],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=12_000_000)
    parser.add_argument("--shard-rows", type=int, default=10_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hic-bench-dataset-stats"))
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # a measured child
    args = parser.parse_args()
    if args.step:
        result = STEPS[args.step](args.work)
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({**result, "peak_rss_gib": peak_kib / 2**20}))
        return
    files = ensure_release(args.work, args.rows, args.shard_rows)
    size = sum(f.stat().st_size for f in files) / 2**30
    print(f"release on disk: {size:.1f} GiB")
    up = measured("upstream", args.work)
    print(
        f"upstream, per shard: release_summary {up['seconds'] / up['shards'] * 1000:.1f} ms "
        f"+ write {up['write_seconds'] / up['shards'] * 1000:.1f} ms "
        f"({up['seconds']:.1f} s over {up['shards']} shards; peak RSS {up['peak_rss_gib']:.2f} GiB)"
    )
    base = measured("baseline", args.work)
    print(
        f"baseline (DuckDB, words from the text): {base['seconds']:.1f} s, "
        f"peak RSS {base['peak_rss_gib']:.2f} GiB"
    )
    proj = measured("project", args.work)
    print(
        f"project (merge {up['shards']} summaries): {proj['seconds']:.2f} s (median of "
        f"{', '.join(f'{s:.2f}' for s in proj['runs'])}), peak RSS {proj['peak_rss_gib']:.2f} "
        f"GiB; its outputs (tables, markdown, JSON, plot) {proj['outputs_seconds']:.1f} s more"
    )
    ours = pd.read_parquet(args.work / "project_caption_words.parquet")
    theirs = pd.read_parquet(args.work / "baseline_caption_words.parquet")
    print(ours.to_string(index=False))
    print(f"caption-length figures identical: {'yes' if ours.equals(theirs) else 'NO'}")
    print(f"ratio baseline/project: {base['seconds'] / proj['seconds']:.1f}")


if __name__ == "__main__":
    main()
