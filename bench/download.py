"""Download stage vs a bare img2dataset call, on one 2,000-URL shard served on loopback.

    .venv/bin/python bench/download.py [--urls 2000] [--repeats 3] [--configfile configs/paper.yaml]

Writes small JPEGs of a few sizes (and a handful of broken URLs: missing files, truncated
JPEGs) and serves them with a ThreadingHTTPServer on 127.0.0.1. The project side is
``hic.download.download_shard`` (what the download rule's script calls) on a shard_urls-style
parquet; the baseline is ``img2dataset.download`` on the same URLs with the same settings:
config.yaml's ``download`` section with the schema's defaults (plus ``--configfile`` on top),
one process, the whole shard in one img2dataset shard, webdataset output. Sides alternate,
each run into a fresh folder. Prints median wall and CPU seconds, images/s and whether both
kept the same images; the ratio baseline/project time is printed last (1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations calls home on import
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import img2dataset  # noqa: E402  (imported once here, so neither side's first run pays it)

from hic.download import DownloadSettings, download_shard  # noqa: E402
from hic.shard_urls import SHARD_SCHEMA  # noqa: E402
from hic.url_keys import url_key  # noqa: E402

SIZES = [(320, 240), (640, 480), (1024, 768), (480, 640), (200, 150)]


# ---------------------------------------------------------------- the served images


def write_images(folder: Path, n: int, broken: int) -> list[str]:
    """``n`` JPEG names under ``folder``; the last ``broken`` are missing or truncated."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    names = [f"{i:05d}.jpg" for i in range(n)]
    for i, name in enumerate(names[: n - broken]):
        w, h = SIZES[i % len(SIZES)]
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # smooth, photo-like bytes
        Image.fromarray(coarse).resize((w, h), Image.BILINEAR).save(folder / name, quality=90)
    for i, name in enumerate(names[n - broken :]):
        if i % 2:  # a truncated JPEG: served, fails to decode
            data = (folder / names[0]).read_bytes()
            (folder / name).write_bytes(data[: len(data) // 3])
    return names  # even ones of the broken tail are never written: 404


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 drops connects when img2dataset's threads arrive together;
    # each dropped SYN waits a 1 s retransmit, which would time the server, not the stage.
    request_queue_size = 1024


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """No access log: 2,000 lines a run on stderr would measure the terminal."""


@contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Base URL of ``folder`` on a loopback HTTP server run in a background thread."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = LoopbackServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- inputs and settings


def shard_table(urls: list[str]) -> pa.Table:
    """A shard as shard_urls writes it (results/urls/{shard}.parquet)."""
    n = len(urls)
    return pa.table(
        {
            "key": [url_key(u) for u in urls],
            "url": urls,
            "caption": [f"a test picture, number {i}" for i in range(n)],
            "width": [None] * n,
            "height": [None] * n,
            "source_file": ["bench.parquet"] * n,
            "source_row": list(range(n)),
        },
        schema=SHARD_SCHEMA,
    )


def download_settings(configfile: Path | None) -> DownloadSettings:
    """config.yaml's download section with the schema's defaults, as the rule receives it."""
    from snakemake.utils import validate  # here: img2dataset's spawned workers re-import this file

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    if configfile:
        config["download"] = {
            **config["download"],
            **yaml.safe_load(configfile.read_text())["download"],
        }
    validate(config, str(REPO / "schemas/config.schema.yaml"), set_default=True)
    return DownloadSettings(**config["download"])


# ---------------------------------------------------------------- the two sides


@dataclass(frozen=True)
class Run:
    seconds: float
    cpu: float
    successes: int


def cpu_seconds() -> float:
    """User + sys of this process (the stage's own work, the server threads) and of its
    finished children (img2dataset's worker and logger processes)."""
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def timed(side: Callable[[], int]) -> Run:
    cpu, start = cpu_seconds(), time.perf_counter()
    successes = side()
    return Run(time.perf_counter() - start, cpu_seconds() - cpu, successes)


def project(shard: Path, out: Path, settings: DownloadSettings) -> int:
    """The stage as the rule's script runs it; returns its successful downloads."""
    out.mkdir()
    summary = download_shard(
        shard,
        out / "shard.tar",
        out / "shard.parquet",
        out / "shard_stats.json",
        settings,
        work_dir=out / "shard.work",
    )
    return summary["status"].get("success", 0)


def baseline(url_list: Path, out: Path, settings: DownloadSettings, n: int) -> int:
    """img2dataset alone with the stage's settings; returns its successful downloads."""
    img2dataset.download(
        url_list=str(url_list),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        output_folder=str(out),
        number_sample_per_shard=n,  # one img2dataset shard, as the stage writes
        processes_count=1,
        enable_wandb=False,
        incremental_mode="incremental",  # "overwrite" deletes its own _tmp in 1.47: fresh folder
        **asdict(settings),
    )
    status = pq.read_table(out / "00000.parquet", columns=["status"])["status"]
    return pc.sum(pc.equal(status, "success")).as_py()


# ---------------------------------------------------------------- report


def median(runs: list[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


def summary_line(name: str, runs: list[Run]) -> str:
    seconds, images = median(runs, "seconds"), runs[0].successes
    each = ", ".join(f"{r.seconds:.2f}" for r in runs)
    return (
        f"{name:<8} | {seconds:8.2f} | {images / seconds:8.1f} | {median(runs, 'cpu'):10.2f} | "
        f"{images:9} | {each}"
    )


def alternate(
    folder: Path, settings: DownloadSettings, n: int, repeats: int
) -> dict[str, list[Run]]:
    """Baseline then project, ``repeats`` times, on the lists in ``folder``; fresh outputs."""
    runs: dict[str, list[Run]] = {"project": [], "baseline": []}
    for i in range(repeats):  # alternated: drift and others' load hit both sides
        base, proj = folder / f"base{i}", folder / f"proj{i}"
        url_list, shard = folder / "list.parquet", folder / "shard.parquet"
        runs["baseline"].append(timed(functools.partial(baseline, url_list, base, settings, n)))
        runs["project"].append(timed(functools.partial(project, shard, proj, settings)))
        print(
            f"repeat {i + 1}: baseline {runs['baseline'][-1].seconds:.2f} s, "
            f"project {runs['project'][-1].seconds:.2f} s",
            flush=True,
        )
        shutil.rmtree(base)
        shutil.rmtree(proj)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--urls", type=int, default=2000)
    parser.add_argument("--broken", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configfile", type=Path, help="overlay, e.g. configs/paper.yaml")
    args = parser.parse_args()
    settings = download_settings(args.configfile)
    print(f"settings: {asdict(settings)}")

    with tempfile.TemporaryDirectory(prefix="hic-bench-download-") as tmp:
        tmp = Path(tmp)
        names = write_images(tmp / "www", args.urls, args.broken)
        with serve(tmp / "www") as base:
            table = shard_table([f"{base}/{name}" for name in names])
            pq.write_table(table, tmp / "shard.parquet")
            pq.write_table(table.select(["url", "caption"]), tmp / "list.parquet")
            runs = alternate(tmp, settings, args.urls, args.repeats)

    successes = {r.successes for side in runs.values() for r in side}
    print(f"\n{args.urls} URLs ({args.broken} broken), {args.repeats} runs a side")
    print("side     | median s | images/s | median CPU s | successes | runs s")
    for name, side in runs.items():
        print(summary_line(name, side))
    same = "the same" if len(successes) == 1 else f"DIFFERENT ({sorted(successes)})"
    print(f"successful images: {same} in every run of both sides")
    wall = median(runs["baseline"], "seconds") / median(runs["project"], "seconds")
    cpu = median(runs["baseline"], "cpu") / median(runs["project"], "cpu")
    print(f"ratio baseline/project time: {wall:.3f} wall ({cpu:.3f} CPU)")


if __name__ == "__main__":
    main()
