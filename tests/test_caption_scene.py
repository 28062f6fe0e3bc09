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
    MAX_FAILURE_STREAK,
    SCENE_SCHEMA,
    STATUSES,
    CaptionSettings,
    caption_shard,
    prompt_hash,
)
from hic.decoding import Generation
from hic.download import STATUS_SCHEMA
from hic.text import clean_caption, parse_caption

PROMPTS = {"short": "Say it short.", "long": "Say it long."}
MODEL = {"id": "scripted", "revision": "r1"}
LONG = "A red ball sits on green grass to the left of a small blue box under a clear sky today."
# These tests are about the mechanics, with short texts; the paper's lengths are checked in
# test_caption_lengths.py.
WORDS = {"short": [3, 40], "long": [15, 500]}


class Scripted:
    """A backend that answers from a function of the prompt (a text the model ended, or a
    Generation) and records the number of requests of every call."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def generate(self, images, prompts, max_new_tokens):
        assert len(images) == len(prompts) == len(max_new_tokens)
        self.calls.append(len(images))
        answers = [self.answer(p) for p in prompts]
        return [a if isinstance(a, Generation) else Generation(a, "stop") for a in answers]


def counts(**nonzero):
    return dict.fromkeys(STATUSES, 0) | nonzero


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
    settings = CaptionSettings(**{"chunk_size": 2, "words": WORDS, **settings})
    summary = caption_shard(tar, status, out, PROMPTS, settings, backend, MODEL)
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
        assert json.loads(r["generation"])["max_new_tokens"] == {"short": 64, "long": 384}
    assert backend.calls == [4, 4, 2]  # chunks of 2 images, both prompts in one call
    assert summary["status"] == counts(ok=5, failed=2)
    assert not (tmp_path / "scene.parquet.parts").exists()


def test_garbage_output_is_unparsed_and_the_run_completes(tmp_path):
    short = iter(["", "%%% 1234 ### !!", "A fine short caption.", "ok", "  ", "<|im_end|>"])
    long = iter(["%%% 1234 ### !!", LONG, "ok then", " ".join([LONG] * 40), "", LONG])
    answers = {PROMPTS["short"]: short, PROMPTS["long"]: long}
    table, summary = run(tmp_path, Scripted(lambda p: next(answers[p])), n=6, failed=0)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["unparsed"] * 3 + ["repetitive"] + ["unparsed"] * 2
    assert summary["status"] == counts(unparsed=5, repetitive=1)
    assert rows[0]["reason"] == "short: empty output; long: not text (0/12 letters)"
    assert rows[0]["long_raw"] == "%%% 1234 ### !!"  # raw output kept for inspection
    assert rows[1]["long_caption"] == LONG and rows[1]["long_raw"] is None  # the good half
    assert rows[2]["short_caption"] == "A fine short caption."
    assert rows[2]["reason"] == "long: 2 words, expected 15-500"
    # A 40-fold repeated sentence is no caption, whatever its length.
    assert (
        rows[3]["reason"]
        == "short: 1 words, expected 3-40; long: repetitive (97% of word 4-grams repeat)"
    )
    assert rows[3]["long_raw"] == " ".join([LONG] * 40)


def test_an_answer_cut_off_at_the_token_limit_is_truncated_not_ok(tmp_path):
    cut = "A long caption that describes a red ball, a box and white text (including"
    answers = {
        PROMPTS["short"]: iter(["A red ball on grass."] * 2),
        PROMPTS["long"]: iter([Generation(cut, "length"), Generation(LONG, "stop")]),
    }
    table, summary = run(tmp_path, Scripted(lambda p: next(answers[p])), n=2, failed=0)
    first, second = table.to_pylist()
    assert first["status"] == "truncated" and first["reason"] == "long: cut off at the token limit"
    assert first["long_caption"] is None and first["long_raw"] == cut
    assert first["short_caption"] == "A red ball on grass."  # the good half is kept
    assert second["status"] == "ok"
    assert summary["status"] == counts(ok=1, truncated=1)


def test_each_row_records_every_decoding_value_that_acts(tmp_path):
    table, _ = run(tmp_path, Scripted(good_answer), n=1, failed=0, repetition_penalty=1.05)
    greedy = json.loads(table.column("generation")[0].as_py())
    assert greedy == {
        "backend": "transformers",
        "do_sample": False,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "repetition_penalty": 1.05,
        "max_new_tokens": {"short": 64, "long": 384},
        "min_pixels": 3136,
        "max_pixels": 802816,
    }
    sampled = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20}
    table, _ = run(tmp_path / "s", Scripted(good_answer), n=1, failed=0, **sampled)
    assert json.loads(table.column("generation")[0].as_py()).items() >= sampled.items()


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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A player in jersey #23 stands by a NO_PARKING sign.", None),
        ("A snake_case label, a C# book and 5*3 written on a board.", None),
        ("**A red** __car__ beside a `kiosk`.", "A red car beside a kiosk."),
        ("- A dog on grass.\n- Blue sky.", "A dog on grass. Blue sky."),
        ("> _A quiet street_ at #1 Main Road.", "A quiet street at #1 Main Road."),
    ],
)
def test_clean_caption_strips_markup_not_characters_inside_words(text, expected):
    assert clean_caption(text) == (expected or text)


DRIVER = """
import json, sys, time
from pathlib import Path
from hic.caption_scene import CaptionSettings, caption_shard

calls, delay = Path(sys.argv[1]), float(sys.argv[2])

from hic.decoding import Generation

class Slow:
    def generate(self, images, prompts, max_new_tokens):
        time.sleep(delay)
        with calls.open("a") as f:
            f.write(json.dumps([im.size[0] for im in images[::2]]) + "\\n")
        return [Generation("A small test image." if p == "s" else
                           "A long description of a small test image with plain words.", "stop")
                for p in prompts]

summary = caption_shard(Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]),
                        {"short": "s", "long": "l"},
                        CaptionSettings(chunk_size=2, words={"short": [3, 40], "long": [5, 100]}),
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
    caption_shard(
        tar, status, out, PROMPTS, CaptionSettings(chunk_size=4, words=WORDS), backend, MODEL
    )
    first = pq.read_table(out).to_pylist()[0]
    assert first["short_caption"] == "A red ball on grass."
    assert backend.calls == [8]


def test_truncated_manifest_discards_the_parts_instead_of_failing(tmp_path):
    tar, status = make_shard(tmp_path / "in", 3, failed=0)
    out = tmp_path / "scene.parquet"
    stale = tmp_path / "scene.parquet.parts"
    stale.mkdir()
    (stale / "manifest.json").write_text('{"fingerpr')  # a kill while it was written
    backend = Scripted(good_answer)
    caption_shard(
        tar, status, out, PROMPTS, CaptionSettings(chunk_size=4, words=WORDS), backend, MODEL
    )
    assert [r["status"] for r in pq.read_table(out).to_pylist()] == ["ok"] * 3


def test_parts_of_other_images_or_parsing_are_discarded(tmp_path):
    tar, status = make_shard(tmp_path / "in", 4, failed=0)
    out = tmp_path / "scene.parquet"
    parts = tmp_path / "scene.parquet.parts"

    class Killed(Scripted):
        def generate(self, images, prompts, max_new_tokens):
            if len(self.calls) == 1:  # the first chunk is flushed, then the job dies
                raise KeyboardInterrupt
            return super().generate(images, prompts, max_new_tokens)

    settings = CaptionSettings(chunk_size=2, words=WORDS)
    with pytest.raises(KeyboardInterrupt):
        caption_shard(tar, status, out, PROMPTS, settings, Killed(good_answer), MODEL, 1)
    assert len(list(parts.glob("part-*.parquet"))) == 1
    # The shard is downloaded again with the same keys (new bytes), and the words range changes.
    os.utime(tar, ns=(1, 1))
    backend = Scripted(good_answer)
    wider = CaptionSettings(chunk_size=2, words={"short": [1, 40], "long": [1, 500]})
    summary = caption_shard(tar, status, out, PROMPTS, wider, backend, MODEL, 1)
    assert summary["resumed_rows"] == 0 and backend.calls == [4, 4]


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
    assert summary["status"] == counts(ok=3, failed=2)


def test_a_model_that_fails_every_image_stops_the_job(tmp_path):
    class Broken(Scripted):
        def generate(self, images, prompts, max_new_tokens):
            raise RuntimeError("CUDA error: device-side assert triggered")

    with pytest.raises(RuntimeError, match="device-side assert"):
        run(tmp_path, Broken(good_answer), n=4, failed=0)
    assert not (tmp_path / "scene.parquet").exists()


def test_a_bad_image_in_a_large_chunk_is_isolated_by_halving(tmp_path):
    backend = Picky(good_answer)
    table, _ = run(tmp_path, backend, n=4, failed=0, chunk_size=16)  # widths 32..35
    assert [r["status"] for r in table.to_pylist()] == ["ok", "ok", "ok", "failed"]
    # [0-3] fails, [0, 1] passes, [2, 3] fails, [2] passes, [3] fails alone.
    assert backend.calls == [4, 2]  # the calls that passed, two requests per image


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_a_backend_that_fails_every_image_stops_the_job_at_any_chunk_size(tmp_path, chunk_size):
    class Broken(Scripted):
        def generate(self, images, prompts, max_new_tokens):
            self.calls.append(len(images))
            raise RuntimeError("CUDA error: device-side assert triggered")

    backend = Broken(good_answer)
    with pytest.raises(RuntimeError, match="device-side assert"):
        run(tmp_path, backend, n=3 * MAX_FAILURE_STREAK, failed=0, chunk_size=chunk_size)
    assert not (tmp_path / "scene.parquet").exists()
    # It stops early: within the first failure streak, not after captioning the shard.
    assert sum(backend.calls) <= 2 * 2 * (MAX_FAILURE_STREAK + chunk_size)
