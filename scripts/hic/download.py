"""Download one URL shard with img2dataset and give its outputs the project's keys.

img2dataset names samples by its own counter; this stage renames them to the URL's
stable ``key`` (tar members, parquet and json), so the tar, the status table and every
later stage join on one key. Every input URL appears exactly once in the status table,
or the stage fails: a shard is never silently short.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hic.words import word_counts

#: Columns of ``results/images/{shard}.parquet``: one row per input URL.
STATUS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("error_type", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("sha256", pa.string()),
        ("caption_words", pa.int32()),
    ]
)

# (pattern, type) in priority order: urllib reports a redirect loop as an HTTP error.
_ERROR_TYPES = [
    (r"infinite loop", "redirect_loop"),
    (r"redirection to url .* is not allowed", "redirect_refused"),  # e.g. http -> file:
    (r"HTTP Error (\d{3})", "http_{0}"),
    (r"timed out|timeout", "timeout"),
    (r"Image decoding error", "decode_error"),
    (r"buf\.empty\(\)", "empty_response"),  # OpenCV's assertion on zero bytes
    (r"No such file or directory", "not_found"),
    (r"Name or service not known|name resolution|nodename nor servname", "dns"),
    (r"Connection refused", "connection_refused"),
    (r"Remote end closed|IncompleteRead|Connection reset", "connection_closed"),
    (r"X-Robots-Tag", "opt_out"),
    (r"image too small|image area too large|aspect ratio too large", "size_filter"),
    (r"unknown url type", "unsupported_scheme"),
]


@dataclass(frozen=True)
class DownloadSettings:
    """img2dataset options the config controls (see schemas/config.schema.yaml)."""

    image_size: int = 512
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    timeout: int = 10
    retries: int = 1
    thread_count: int = 64
    min_image_size: int = 0
    max_image_area: float = 178956970.0  # PIL's decompression-bomb limit
    max_aspect_ratio: float = float("inf")
    user_agent_token: str | None = "hic12m"
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )


def error_type(message: str | None) -> str | None:
    """A coarse, countable type for an img2dataset error message."""
    if not message:
        return None
    for pattern, name in _ERROR_TYPES:
        if m := re.search(pattern, message, flags=re.IGNORECASE):
            return name.format(*m.groups())
    return "other"


class DownloadError(RuntimeError):
    """img2dataset did not account for every URL of a shard."""


def _img2dataset(settings: DownloadSettings, url_list: Path, out: Path, n_rows: int) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else it calls home on import
    import img2dataset

    img2dataset.download(
        url_list=str(url_list),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["hic_key"],
        output_format="webdataset",
        output_folder=str(out),
        number_sample_per_shard=max(n_rows, 2),  # the whole shard in one img2dataset shard
        processes_count=1,  # one img2dataset shard per job: Snakemake parallelises shards
        thread_count=settings.thread_count,
        image_size=settings.image_size,
        resize_mode=settings.resize_mode,
        resize_only_if_bigger=settings.resize_only_if_bigger,
        encode_format=settings.encode_format,
        encode_quality=settings.encode_quality,
        timeout=settings.timeout,
        retries=settings.retries,
        min_image_size=settings.min_image_size,
        max_image_area=settings.max_image_area,
        max_aspect_ratio=settings.max_aspect_ratio,
        user_agent_token=settings.user_agent_token,
        disallowed_header_directives=list(settings.disallowed_header_directives),
        enable_wandb=False,
        # "overwrite" deletes its own _tmp folder in 1.47; the caller gives a fresh folder.
        incremental_mode="incremental",
    )


def status_table(raw: pa.Table, expected: pa.Table) -> pa.Table:
    """img2dataset's per-sample parquet -> STATUS_SCHEMA rows in input order, keyed by our key.

    Raises DownloadError unless every expected key appears exactly once.
    """
    keys = raw.column("hic_key").to_pylist()
    wanted = expected.column("key").to_pylist()
    missing, extra = set(wanted) - set(keys), set(keys) - set(wanted)
    if len(keys) != len(set(keys)) or missing or extra:
        raise DownloadError(
            f"img2dataset accounted for {len(keys)} rows of {len(wanted)}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}, "
            f"duplicated {len(keys) - len(set(keys))}"
        )
    order = {k: i for i, k in enumerate(keys)}
    raw = raw.take(pa.array([order[k] for k in wanted]))
    messages = raw.column("error_message").to_pylist()
    columns = {
        "key": raw.column("hic_key"),
        "error_type": pa.array([error_type(m) for m in messages], pa.string()),
        "caption_words": word_counts(raw.column("caption")),
    }
    for name in STATUS_SCHEMA.names:
        if name not in columns:
            columns[name] = raw.column(name)
    return pa.table({n: columns[n] for n in STATUS_SCHEMA.names}).cast(STATUS_SCHEMA)


def rekey_tar(src: Path, dst: Path, rename: dict[str, str]) -> int:
    """Copy a webdataset tar, renaming sample ``a.ext`` to ``rename[a].ext``; returns samples.

    img2dataset's threads add samples in the order downloads finish, so samples are written
    in key order, with a fixed mtime: the same images always give a byte-identical tar, and
    the stages that read it batch the same images together on every run. Members are read
    by offset, so memory holds one file at a time."""
    samples = set()
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        members = [m for m in tin.getmembers() if m.isfile()]
        members.sort(key=lambda m: (rename[m.name.partition(".")[0]], m.name))
        for member in members:
            stem, _, ext = member.name.partition(".")
            data = tin.extractfile(member).read()
            key = rename[stem]
            if ext == "json":
                meta = json.loads(data)
                meta["key"] = meta.pop("hic_key")
                data = json.dumps(meta).encode()
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            tout.addfile(info, io.BytesIO(data))
            samples.add(key)
    return len(samples)


def download_shard(
    urls: Path,
    tar: Path,
    status: Path,
    stats: Path,
    settings: DownloadSettings,
    work_dir: Path,
) -> dict:
    """Download every URL of ``urls`` (a shard_urls output) into ``tar``/``status``/``stats``.

    ``work_dir`` holds img2dataset's own output until it is rewritten into ``tar``; it is
    emptied first (leftovers of a killed attempt) and removed afterwards, failed or not."""
    expected = pq.read_table(urls, columns=["key", "url", "caption"])
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    try:
        table, n_tar = fetch_rows(expected, tar, settings, work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    pq.write_table(table, status, compression="zstd")
    counts = pc.value_counts(table["status"]).to_pylist() if table.num_rows else []
    summary = {
        "count": table.num_rows,
        "status": {c["values"]: c["counts"] for c in counts},
        "samples_in_tar": n_tar,
        "settings": asdict(settings),
    }
    stats.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def fetch_rows(
    expected: pa.Table, tar: Path, settings: DownloadSettings, work_dir: Path
) -> tuple[pa.Table, int]:
    """(status table, samples in ``tar``) for the rows of ``expected`` (key, url, caption)."""
    if not expected.num_rows:
        with tarfile.open(tar, "w"):
            pass
        return STATUS_SCHEMA.empty_table(), 0
    i2d_input = work_dir / "input.parquet"
    pq.write_table(
        pa.table(
            {"url": expected["url"], "caption": expected["caption"], "hic_key": expected["key"]}
        ),
        i2d_input,
    )
    out = work_dir / "out"
    _img2dataset(settings, i2d_input, out, expected.num_rows)
    raw_parquet = out / "00000.parquet"
    if not raw_parquet.exists():
        raise DownloadError(f"img2dataset wrote no status table in {out}; see the log above")
    raw = pq.read_table(raw_parquet)
    table = status_table(raw, expected)
    rename = dict(zip(raw["key"].to_pylist(), raw["hic_key"].to_pylist(), strict=True))
    return table, rekey_tar(out / "00000.tar", tar, rename)
