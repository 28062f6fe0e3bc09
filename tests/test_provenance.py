import stat

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hic.provenance import file_digest, git_describe, read_provenance, stage_provenance, stamp


def test_provenance_names_params_code_and_prompts_by_content(tmp_path):
    prompt = tmp_path / "verify.txt"
    prompt.write_text("Is the box a {label}?")
    params = {
        "model": {"id": "Qwen/Qwen2.5-VL-7B-Instruct", "revision": "abc"},
        "max": 3,
        "code": "0123456789abcdef",  # every rule's code fingerprint
    }
    inputs = {"regions": ["r.parquet"], "verify_prompt": [str(prompt)]}
    record = stage_provenance("verify_labels", params, inputs, tmp_path)
    assert record["rule"] == "verify_labels" and record["params"] == params
    assert record["prompts"] == {"verify_prompt": file_digest(prompt)}
    assert record["code_version"] == "unknown"  # tmp_path is no git checkout
    prompt.write_text("Is the box a {label}? Answer yes or no.")
    assert stage_provenance("verify_labels", params, inputs, tmp_path) != record


def test_stamp_keeps_every_row_and_adds_the_record(tmp_path):
    path = tmp_path / "shard.parquet"
    table = pa.table(
        {"key": [f"{i:04d}" for i in range(250)], "score": [i / 7 for i in range(250)]}
    )
    pq.write_table(table, path, row_group_size=100)  # several row groups stream through
    stamp(path, {"rule": "select_regions", "params": {"max_regions": 3}})
    assert pq.read_table(path).equals(table)
    assert read_provenance(path) == {"rule": "select_regions", "params": {"max_regions": 3}}
    assert not list(tmp_path.glob("*.stamping"))


def test_unstamped_file_is_named(tmp_path):
    path = tmp_path / "old.parquet"
    pq.write_table(pa.table({"key": ["a"]}), path)
    with pytest.raises(KeyError, match="old.parquet"):
        read_provenance(path)


def fake_git(bin_dir, stdout, rc):
    bin_dir.mkdir()
    git = bin_dir / "git"
    git.write_text(f'#!/bin/sh\necho "{stdout} $*"\nexit {rc}\n')
    git.chmod(git.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def test_code_version_is_git_describe(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_git(tmp_path / "bin", "v2-dirty", 0)))
    assert git_describe(tmp_path) == f"v2-dirty -C {tmp_path} describe --always --dirty"


def test_code_version_unknown_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_git(tmp_path / "bin", "fatal: not a git repository", 128)))
    assert git_describe(tmp_path) == "unknown"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert git_describe(tmp_path) == "unknown"
