"""The download stage against a loopback HTTP server that fails in every way the web does."""

import io
import json
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hic.download import (
    STATUS_SCHEMA,
    DownloadError,
    DownloadSettings,
    download_shard,
    error_type,
    rekey_tar,
    status_table,
)
from hic.retry_downloads import RETRIES_KEY, retry_shard, transient
from hic.shard_urls import shard_url_lists
from hic.url_keys import url_key

TIMEOUT = 3  # seconds; /slow sleeps past it (generous: a busy CI machine is slow)


def jpeg(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


GOOD = jpeg((200, 30, 30))


class Handler(BaseHTTPRequestHandler):
    seen: set[str] = set()  # /flaky/* paths already asked for once

    def log_message(self, *args):  # keep test output quiet
        pass

    def reply(self, code, body=b"", ctype="image/jpeg", headers=()):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path
        if path.startswith("/good/"):
            self.reply(200, GOOD)
        elif path == "/404":
            self.reply(404, b"not here", "text/plain")
        elif path == "/500":
            self.reply(500, b"boom", "text/plain")
        elif path == "/slow":
            time.sleep(TIMEOUT + 3)
            self.reply(200, GOOD)
        elif path == "/html":
            self.reply(200, b"<html><body>not an image</body></html>", "text/html")
        elif path == "/truncated":
            self.reply(200, GOOD[: len(GOOD) // 3])
        elif path == "/empty":
            self.reply(200, b"")
        elif path == "/redirect":
            self.reply(302, headers=[("Location", "/good/target")])
        elif path == "/loop":
            self.reply(302, headers=[("Location", "/loop")])
        elif path.startswith("/flaky/"):  # 503 the first time, the image afterwards
            first = path not in Handler.seen
            Handler.seen.add(path)
            self.reply(503, b"busy", "text/plain") if first else self.reply(200, GOOD)
        elif path == "/optout":
            self.reply(200, GOOD, headers=[("X-Robots-Tag", "noai")])
        else:
            self.reply(404)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # /slow's client has given up (the timeout under test): its broken pipe is expected.
        if not isinstance(sys.exc_info()[1], BrokenPipeError | ConnectionResetError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def server():
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


# path -> (status, error_type)
EXPECTED = {
    "/good/1": ("success", None),
    "/good/2": ("success", None),
    "/404": ("failed_to_download", "http_404"),
    "/500": ("failed_to_download", "http_500"),
    "/slow": ("failed_to_download", "timeout"),
    "/html": ("failed_to_resize", "decode_error"),
    "/truncated": ("failed_to_resize", "decode_error"),
    "/empty": ("failed_to_resize", "empty_response"),
    "/redirect": ("success", None),
    "/loop": ("failed_to_download", "redirect_loop"),
    "/optout": ("failed_to_download", "opt_out"),
}


def test_every_failure_is_recorded_once_with_its_status(server, tmp_path):
    urls = [server + p for p in EXPECTED]
    pq.write_table(
        pa.table({"url": urls, "caption": [f"alt {p}" for p in EXPECTED]}),
        tmp_path / "list.parquet",
    )
    shard_url_lists([tmp_path / "list.parquet"], tmp_path / "urls", 1)
    out = tmp_path / "images"
    out.mkdir()
    summary = download_shard(
        tmp_path / "urls" / "00000.parquet",
        out / "00000.tar",
        out / "00000.parquet",
        out / "00000_stats.json",
        DownloadSettings(timeout=TIMEOUT, retries=0, thread_count=16),
        work_dir=out / "00000.work",
    )
    table = pq.read_table(out / "00000.parquet")
    assert table.schema == STATUS_SCHEMA
    rows = {r["url"].removeprefix(server): r for r in table.to_pylist()}
    assert table.num_rows == len(EXPECTED) == len(rows)
    got = {p: (r["status"], r["error_type"]) for p, r in rows.items()}
    assert got == EXPECTED
    for path, row in rows.items():
        assert row["key"] == url_key(server + path)
        assert row["caption_words"] == 2

    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
        successes = {r["key"] for r in rows.values() if r["status"] == "success"}
        assert {n.split(".")[0] for n in names} == successes
        assert {n.split(".", 1)[1] for n in names} == {"jpg", "json", "txt"}
        meta = json.loads(tar.extractfile(f"{rows['/redirect']['key']}.json").read())
        assert meta["key"] == rows["/redirect"]["key"] and "hic_key" not in meta
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats == summary and stats["count"] == len(EXPECTED)
    assert stats["status"]["success"] == 3 and stats["samples_in_tar"] == 3
    assert not (out / "00000.work").exists()


def test_empty_shard_writes_empty_outputs(tmp_path):
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/x.jpg"]}), tmp_path / "l.parquet")
    shard_url_lists([tmp_path / "l.parquet"], tmp_path / "urls", 3)
    empty = next(
        p
        for p in sorted((tmp_path / "urls").glob("0*.parquet"))
        if pq.read_metadata(p).num_rows == 0
    )
    summary = download_shard(
        empty,
        tmp_path / "s.tar",
        tmp_path / "s.parquet",
        tmp_path / "s.json",
        DownloadSettings(),
        tmp_path / "work",
    )
    assert summary["count"] == 0 and pq.read_table(tmp_path / "s.parquet").schema == STATUS_SCHEMA
    with tarfile.open(tmp_path / "s.tar") as tar:
        assert tar.getnames() == []


@pytest.mark.parametrize(
    "message, expected",
    [
        (None, None),
        ("HTTP Error 403: Forbidden", "http_403"),
        (
            "HTTP Error 302: The HTTP server returned a redirect error that would lead to an "
            "infinite loop.",
            "redirect_loop",
        ),
        ("<urlopen error timed out>", "timeout"),
        ("The read operation timed out", "timeout"),
        ("<urlopen error [Errno -2] Name or service not known>", "dns"),
        ("image area too large", "size_filter"),
        ("something new", "other"),
        ("redirection to url 'file:///etc/passwd' is not allowed", "redirect_refused"),
    ],
)
def test_error_type(message, expected):
    assert error_type(message) == expected


def raw_i2d(keys):
    """A parquet table shaped like img2dataset's, for the given hic keys."""
    n = len(keys)
    return pa.table(
        {
            "hic_key": keys,
            "caption": ["a b"] * n,
            "url": [f"u{k}" for k in keys],
            "key": [f"{i:07d}" for i in range(n)],
            "status": ["success"] * n,
            "error_message": [None] * n,
            "width": pa.array([1] * n, pa.int32()),
            "height": pa.array([1] * n, pa.int32()),
            "original_width": pa.array([1] * n, pa.int32()),
            "original_height": pa.array([1] * n, pa.int32()),
            "exif": [None] * n,
            "sha256": ["x"] * n,
        }
    )


def test_status_table_restores_input_order():
    expected = pa.table({"key": ["b", "a", "c"]})
    table = status_table(raw_i2d(["a", "c", "b"]), expected)
    assert table.column("key").to_pylist() == ["b", "a", "c"]
    assert table.column("url").to_pylist() == ["ub", "ua", "uc"]


@pytest.mark.parametrize("keys", [["a", "b"], ["a", "b", "c", "c"], ["a", "b", "c", "d"]])
def test_status_table_refuses_lost_or_duplicated_urls(keys):
    with pytest.raises(DownloadError, match="accounted for"):
        status_table(raw_i2d(keys), pa.table({"key": ["a", "b", "c"]}))


def test_rekey_tar(tmp_path):
    with tarfile.open(tmp_path / "in.tar", "w") as tar:
        for name, data in [
            ("0000000.jpg", GOOD),
            ("0000000.json", b'{"key": "0000000", "hic_key": "abc"}'),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert rekey_tar(tmp_path / "in.tar", tmp_path / "out.tar", {"0000000": "abc"}) == 1
    with tarfile.open(tmp_path / "out.tar") as tar:
        assert tar.getnames() == ["abc.jpg", "abc.json"]
        assert tar.extractfile("abc.jpg").read() == GOOD
        assert json.loads(tar.extractfile("abc.json").read()) == {"key": "abc"}


def test_rekeyed_tar_is_the_same_whatever_order_the_downloads_finished(tmp_path):
    rename = {"0000000": "b2", "0000001": "a1", "0000002": "c3"}
    members = [(f"{i:07d}.{ext}", f"{i}{ext}".encode()) for i in range(3) for ext in ("jpg", "txt")]
    for n, order in enumerate([members, members[::-1], members[2:] + members[:2]]):
        with tarfile.open(tmp_path / f"in{n}.tar", "w") as tar:
            for name, data in order:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1_700_000_000 + n  # written at different times
                tar.addfile(info, io.BytesIO(data))
        rekey_tar(tmp_path / f"in{n}.tar", tmp_path / f"out{n}.tar", rename)
    with tarfile.open(tmp_path / "out0.tar") as tar:
        assert tar.getnames() == ["a1.jpg", "a1.txt", "b2.jpg", "b2.txt", "c3.jpg", "c3.txt"]
    assert len({(tmp_path / f"out{n}.tar").read_bytes() for n in range(3)}) == 1


def test_retry_fetches_only_transient_failures_and_merges_them(server, tmp_path):
    paths = ["/good/a", "/flaky/1", "/404", "/flaky/2", "/good/b", "/html"]
    urls = [server + p for p in paths]
    pq.write_table(pa.table({"url": urls, "caption": ["alt"] * 6}), tmp_path / "list.parquet")
    shard_url_lists([tmp_path / "list.parquet"], tmp_path / "urls", 1)
    out = tmp_path / "images"
    out.mkdir()
    files = out / "00000.tar", out / "00000.parquet", out / "00000_stats.json"
    settings = DownloadSettings(timeout=TIMEOUT, retries=0, thread_count=4)
    download_shard(tmp_path / "urls/00000.parquet", *files, settings, work_dir=tmp_path / "w1")
    before = {r["url"]: r for r in pq.read_table(files[1]).to_pylist()}
    assert before[server + "/flaky/1"]["error_type"] == "http_503"
    pq.write_table(  # the stamped provenance must survive the retry
        pq.read_table(files[1]).replace_schema_metadata({"hic.provenance": "{}"}), files[1]
    )
    with tarfile.open(files[0]) as t:
        old_members = {m.name: t.extractfile(m).read() for m in t}

    summary = retry_shard(*files, settings, tmp_path / "w2")
    assert summary == {"shard": "00000", "retried": 2, "recovered": 2}
    table = pq.read_table(files[1])
    assert table.schema.metadata[b"hic.provenance"] == b"{}"
    assert json.loads(table.schema.metadata[RETRIES_KEY])[0]["recovered"] == 2
    after = {r["url"]: r for r in table.to_pylist()}
    assert [r["url"] for r in table.to_pylist()] == list(before)  # the same rows, in order
    assert {p: after[server + p]["status"] for p in paths} == {
        "/good/a": "success",
        "/flaky/1": "success",
        "/404": "failed_to_download",  # final: not retried
        "/flaky/2": "success",
        "/good/b": "success",
        "/html": "failed_to_resize",
    }
    with tarfile.open(files[0]) as t:
        names = t.getnames()
        members = {m.name: t.extractfile(m).read() for m in t}
    assert names == sorted(names, key=lambda n: (n.partition(".")[0], n))  # key order
    assert {k: members[k] for k in old_members} == old_members  # successes kept as they were
    successes = {r["key"] for r in after.values() if r["status"] == "success"}
    assert {n.partition(".")[0] for n in names} == successes
    stats = json.loads(files[2].read_text())
    assert stats["status"]["success"] == 4 and stats["samples_in_tar"] == 4
    assert retry_shard(*files, settings, tmp_path / "w3")["retried"] == 0  # nothing left


def test_transient_failures_are_server_and_network_errors():
    status = pa.table(
        {
            "status": ["failed_to_download"] * 7 + ["success"],
            "error_type": [
                "timeout",
                "http_503",
                "http_404",
                "connection_closed",
                "opt_out",
                "dns",
                "http_429",
                None,
            ],
        }
    )
    assert transient(status) == [0, 1, 3, 5, 6]
