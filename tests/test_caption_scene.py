"""caption_scene with scripted backends: parsing, statuses, and resuming after SIGKILL."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hic.caption_scene import (
    SCENE_SCHEMA,
    CaptionSettings,
    caption_shard,
    clean_caption,
    parse_caption,
    prompt_hash,
)
from hic.download import STATUS_SCHEMA

PROMPTS = {"short": "Say it short.", "long": "Say it long."}
MODEL = {"id": "scripted", "revision": "r1"}
LONG = "A red ball sits on green grass to the left of a small blue box under a clear sky today."


class Scripted:
    """A backend that answers from a function of the prompt and records every call."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def generate(self, images, prompts, max_new_tokens):
        self.calls.append(len(images))
        return [self.answer(p) for p in prompts]


def good_answer(prompt):
    return "Caption: A red ball on grass." if prompt == PROMPTS["short"] else LONG


def make_shard(folder: Path, n: int, failed: int = 1, corrupt: int = 0) -> tuple[Path, Path]:
    """A download shard: n images in a tar (the last `corrupt` undecodable) + status table."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = [f"{i:016x}" for i in range(n + failed)]
    with tarfile.open(folder / "s.tar", "w") as tar:
        for i, key in enumerate(keys[:n]):
            buf = io.BytesIO()
            Image.new("RGB", (32 + i, 24), (10 * i % 255, 80, 160)).save(buf, "JPEG")
            data = buf.getvalue() if i < n - corrupt else b"not a jpeg"
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows = [{"key": k, "status": "success"} for k in keys[:n]]
    rows += [{"key": k, "status": "failed_to_download", "error_type": "http_404"} for k in keys[n:]]
    status = pa.Table.from_pylist(rows, schema=STATUS_SCHEMA)
    pq.write_table(status, folder / "s.parquet")
    return folder / "s.tar", folder / "s.parquet"


def run(tmp_path, backend, n=5, failed=1, corrupt=0, **settings):
    tar, status = make_shard(tmp_path / "in", n, failed, corrupt)
    out = tmp_path / "scene.parquet"
    summary = caption_shard(
        tar, status, out, PROMPTS, CaptionSettings(batch_size=2, **settings), backend, MODEL
    )
    return pq.read_table(out), summary


def test_every_url_gets_a_row_with_status_and_provenance(tmp_path):
    backend = Scripted(good_answer)
    table, summary = run(tmp_path, backend, n=5, failed=2)
    assert table.schema == SCENE_SCHEMA
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == [f"{i:016x}" for i in range(7)]  # status-table order
    assert [r["status"] for r in rows] == ["ok"] * 5 + ["failed"] * 2
    assert rows[0]["short_caption"] == "A red ball on grass."  # preface removed
    assert rows[0]["long_caption"] == LONG and rows[0]["long_words"] == len(LONG.split())
    assert rows[5]["reason"] == "not downloaded: failed_to_download (http_404)"
    assert rows[5]["short_caption"] is None
    for r in rows:
        assert (r["model_id"], r["model_revision"]) == ("scripted", "r1")
        assert r["prompt_hash"] == prompt_hash(PROMPTS)
        assert json.loads(r["generation"])["max_new_tokens"] == {"short": 48, "long": 320}
    assert backend.calls == [2, 2, 2, 2, 1, 1]  # batches of 2 images, two prompts each
    assert summary["status"] == {"ok": 5, "unparsed": 0, "failed": 2}
    assert not (tmp_path / "scene.parquet.parts").exists()


def test_garbage_output_is_unparsed_and_the_run_completes(tmp_path):
    short = iter(["", "%%% 1234 ### !!", "A fine short caption.", "ok", "  ", "<|im_end|>"])
    long = iter(["%%% 1234 ### !!", LONG, "ok then", " ".join([LONG] * 40), "", LONG])
    answers = {PROMPTS["short"]: short, PROMPTS["long"]: long}
    table, summary = run(tmp_path, Scripted(lambda p: next(answers[p])), n=6, failed=0)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["unparsed"] * 2 + ["unparsed", "unparsed"] * 2
    assert summary["status"]["unparsed"] == 6
    assert rows[0]["reason"] == "short: empty output; long: not text (0/9 letters)"
    assert rows[0]["long_raw"] == "%%% 1234 ### !!"  # raw output kept for inspection
    assert rows[1]["long_caption"] == LONG and rows[1]["long_raw"] is None  # the good half
    assert rows[2]["short_caption"] == "A fine short caption."
    assert rows[2]["reason"] == "long: 2 words, expected 15-500"
    assert rows[3]["reason"].startswith("short: 1 words") and "long: 800 words" in rows[3]["reason"]


def test_undecodable_image_in_tar_fails_that_row_only(tmp_path):
    table, _ = run(tmp_path, Scripted(good_answer), n=4, failed=0, corrupt=1)
    status = [r["status"] for r in table.to_pylist()]
    assert status == ["ok", "ok", "ok", "failed"]
    assert table.column("reason")[3].as_py().startswith("image does not decode")


@pytest.mark.parametrize(
    "text, kind, expected",
    [
        ("Sure! Here is the caption:\n**A dog on a sofa.**", "short", "A dog on a sofa."),
        ('"A dog on a sofa."', "short", "A dog on a sofa."),
        ("Short caption: A dog.  ", "short", None),  # 2 words < 3
        (
            "A dog on a sofa. It is brown and looks sleepy and calm and warm and rested today "
            "while the rain falls outside on the old red roof of the house by the sea.",
            "short",
            "A dog on a sofa.",
        ),  # ran on: first sentence kept
        ("12 34 56 78 90 12 34 56", "long", None),
        ("A dog \ufffdon a sofa.", "short", None),  # what a broken byte-level BPE stream decodes to
        ("Sure.\nA dog on a sofa.", "short", "A dog on a sofa."),
        ("Here's a dog on a sofa.\nIt sleeps.", "short", "Here's a dog on a sofa. It sleeps."),
        ("Here is the caption you asked for: A dog on a sofa.", "short", "A dog on a sofa."),
    ],
)
def test_parse_caption(text, kind, expected):
    caption, reason = parse_caption(text, kind, [3, 12] if kind == "short" else [3, 40])
    assert caption == expected
    assert (reason is None) == (expected is not None)


def test_clean_caption_collapses_whitespace_and_markdown():
    assert clean_caption("## Description:\n A  *big*\n\tcat ") == "A big cat"


DRIVER = """
import json, sys, time
from pathlib import Path
from hic.caption_scene import CaptionSettings, caption_shard

calls, delay = Path(sys.argv[1]), float(sys.argv[2])

class Slow:
    def generate(self, images, prompts, max_new_tokens):
        time.sleep(delay)
        with calls.open("a") as f:
            f.write(json.dumps([im.size[0] for im in images]) + "\\n")
        if prompts[0] == "s":
            return ["A small test image."] * len(images)
        return ["A long description of a small test image with plain words."] * len(images)

summary = caption_shard(Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]),
                        {"short": "s", "long": "l"},
                        CaptionSettings(batch_size=2, words={"short": [3, 40], "long": [5, 100]}),
                        Slow(), {"id": "slow"}, flush_every=1)
print(json.dumps(summary))
"""


def test_sigkill_midway_then_restart_loses_and_repeats_nothing(tmp_path):
    n = 12
    tar, status = make_shard(tmp_path / "in", n, failed=1)
    out = tmp_path / "scene.parquet"
    parts = tmp_path / "scene.parquet.parts"
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "scripts")}

    def start(calls, delay):
        args = [sys.executable, str(tmp_path / "driver.py"), str(calls), str(delay)]
        return subprocess.Popen(
            [*args, str(tar), str(status), str(out)], env=env, stdout=subprocess.PIPE, text=True
        )

    first = start(tmp_path / "calls1.jsonl", 0.3)
    deadline = time.time() + 60
    while len(list(parts.glob("part-*.parquet"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not out.exists()
    flushed = pa.concat_tables([pq.read_table(p) for p in sorted(parts.glob("part-*.parquet"))])
    flushed_keys = set(flushed.column("key").to_pylist())
    assert 4 <= len(flushed_keys) < n

    second = start(tmp_path / "calls2.jsonl", 0.0)
    stdout, _ = second.communicate(timeout=60)
    assert second.returncode == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["resumed_rows"] == len(flushed_keys)
    assert summary["captioned_now"] == n - len(flushed_keys)

    rows = pq.read_table(out).to_pylist()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == n + 1  # no duplicates, no losses
    assert [r["status"] for r in rows].count("ok") == n
    # Image i is (32 + i) px wide: the second run captioned only what was not flushed.
    widths_again = {
        w for line in (tmp_path / "calls2.jsonl").read_text().splitlines() for w in json.loads(line)
    }
    assert widths_again == {32 + int(k, 16) for k in set(keys[:n]) - flushed_keys}
    assert not parts.exists()


def test_parts_of_another_configuration_are_discarded(tmp_path):
    backend = Scripted(good_answer)
    tar, status = make_shard(tmp_path / "in", 4, failed=0)
    out = tmp_path / "scene.parquet"
    stale = tmp_path / "scene.parquet.parts"
    stale.mkdir()
    (stale / "manifest.json").write_text(json.dumps({"fingerprint": "old prompt"}))
    pa_rows = [{"key": f"{0:016x}", "status": "ok", "short_caption": "stale"}]
    pq.write_table(pa.Table.from_pylist(pa_rows, schema=SCENE_SCHEMA), stale / "part-00000.parquet")
    caption_shard(tar, status, out, PROMPTS, CaptionSettings(batch_size=4), backend, MODEL)
    first = pq.read_table(out).to_pylist()[0]
    assert first["short_caption"] == "A red ball on grass."
    assert backend.calls == [4, 4]


def test_truncated_manifest_discards_the_parts_instead_of_failing(tmp_path):
    tar, status = make_shard(tmp_path / "in", 3, failed=0)
    out = tmp_path / "scene.parquet"
    stale = tmp_path / "scene.parquet.parts"
    stale.mkdir()
    (stale / "manifest.json").write_text('{"fingerpr')  # a kill while it was written
    backend = Scripted(good_answer)
    caption_shard(tar, status, out, PROMPTS, CaptionSettings(batch_size=4), backend, MODEL)
    assert [r["status"] for r in pq.read_table(out).to_pylist()] == ["ok"] * 3


def test_parts_of_other_images_or_parsing_are_discarded(tmp_path):
    tar, status = make_shard(tmp_path / "in", 4, failed=0)
    out = tmp_path / "scene.parquet"
    parts = tmp_path / "scene.parquet.parts"

    class Killed(Scripted):
        def generate(self, images, prompts, max_new_tokens):
            if len(self.calls) == 2:  # the first batch is flushed, then the job dies
                raise KeyboardInterrupt
            return super().generate(images, prompts, max_new_tokens)

    settings = CaptionSettings(batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        caption_shard(tar, status, out, PROMPTS, settings, Killed(good_answer), MODEL, 1)
    assert len(list(parts.glob("part-*.parquet"))) == 1
    # The shard is downloaded again with the same keys (new bytes), and the words range changes.
    os.utime(tar, ns=(1, 1))
    backend = Scripted(good_answer)
    wider = CaptionSettings(batch_size=2, words={"short": [1, 40], "long": [1, 500]})
    summary = caption_shard(tar, status, out, PROMPTS, wider, backend, MODEL, 1)
    assert summary["resumed_rows"] == 0 and backend.calls == [2, 2, 2, 2]


class Picky(Scripted):
    """Like Qwen2-VL's processor with a panorama: an image wider than 34 px is refused."""

    def generate(self, images, prompts, max_new_tokens):
        if any(image.width > 34 for image in images):
            raise ValueError("absolute aspect ratio must be smaller than 200")
        return super().generate(images, prompts, max_new_tokens)


def test_an_image_the_model_refuses_fails_alone(tmp_path):
    table, summary = run(tmp_path, Picky(good_answer), n=5, failed=0)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed", "failed"]
    assert rows[3]["reason"] == (
        "generation failed: ValueError: absolute aspect ratio must be smaller than 200"
    )
    assert summary["status"] == {"ok": 3, "unparsed": 0, "failed": 2}


def test_a_model_that_fails_every_image_stops_the_job(tmp_path):
    class Broken(Scripted):
        def generate(self, images, prompts, max_new_tokens):
            raise RuntimeError("CUDA error: device-side assert triggered")

    with pytest.raises(RuntimeError, match="device-side assert"):
        run(tmp_path, Broken(good_answer), n=4, failed=0)
    assert not (tmp_path / "scene.parquet").exists()
