"""Shared fixtures: the repository, and a private copy of the workflow to run Snakemake in."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hic import codebase

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The SLURM test runs last: it installs slurm-wlm, and once its daemons are stopped every
    snakemake start waits ~9 s on `scontrol show config` (the slurm plugin asks the controller
    for MinJobAge while building its help text), which would slow every later workflow test."""
    items.sort(key=lambda item: item.path.name == "test_slurm.py")


@pytest.fixture(scope="session", autouse=True)
def offline():
    """No test may reach the network: huggingface_hub reads HF_HUB_OFFLINE once, at import."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


def file_digests(folder: Path) -> dict[str, str]:
    """File name -> sha256 of every file in ``folder`` (byte-identical builds)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def snakemake(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the venv's snakemake in ``cwd``; output is returned (and shown when check fails)."""
    proc = subprocess.run(
        [str(BIN / "snakemake"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def planned_jobs(cwd: Path, *args: str) -> dict[str, int]:
    """Rule -> job count of a dry run (empty when there is nothing to do)."""
    out = snakemake(cwd, "--dry-run", "--quiet", "rules", *args).stdout
    jobs: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            jobs[parts[0]] = int(parts[1])
    return jobs


def copy_workflow(dest: Path) -> Path:
    return codebase.copy_workflow(REPO, dest)


@pytest.fixture
def workflow(tmp_path: Path) -> Path:
    """A fresh copy of the workflow in a temporary folder."""
    return copy_workflow(tmp_path / "wf")


def region_shard(folder: Path, labels: list[list[str]]) -> tuple[Path, Path, Path]:
    """(regions, tar, status) of a shard whose image i has the regions ``labels[i]``, in the
    selected-regions layout; images are stored at half their original size."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from hic.download import STATUS_SCHEMA
    from hic.region_tables import SELECTED_SCHEMA

    folder.mkdir(parents=True, exist_ok=True)
    keys = [f"{i:016x}" for i in range(len(labels))]
    with tarfile.open(folder / "s.tar", "w") as tar:
        for i, key in enumerate(keys):
            buf = io.BytesIO()
            Image.new("RGB", (40, 30), (20 * i % 255, 90, 150)).save(buf, "PNG")
            info = tarfile.TarInfo(f"{key}.png")
            info.size = buf.tell()
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    size = {"width": 40, "height": 30, "original_width": 80, "original_height": 60}
    status = [{"key": k, "status": "success", **size} for k in keys]
    pq.write_table(pa.Table.from_pylist(status, schema=STATUS_SCHEMA), folder / "s.parquet")
    regions = [
        {
            "key": key,
            "label": label,
            "bbox": [4.0 * rank, 6.0, 30.0, 20.0],
            "score": 0.5,
            "kind": "foreground",
            "source": "detector",
            "query_source": "caption",
            "rank": rank,
        }
        for key, names in zip(keys, labels, strict=True)
        for rank, label in enumerate(names)
    ]
    path = folder / "regions.parquet"
    pq.write_table(pa.Table.from_pylist(regions, schema=SELECTED_SCHEMA), path)
    return path, folder / "s.tar", folder / "s.parquet"


#: YAML that swaps config.yaml's trained demo models for the tiny random builders (seconds to
#: build, minutes less than training) with the settings that let random scores through: tests of
#: the workflow's machinery need models of the right shape, not good ones
#: (tests/test_demo_training_*.py test the trained ones).
RANDOM_MODELS = """
models:
  vlm: {id: resources/models/tiny-qwen2_5_vl, revision: null}
  detector: {id: resources/models/tiny-owlv2, revision: null}
  sam: {id: resources/models/tiny-sam, revision: null}
select_regions: {max_regions: 3}
"""


def random_propose_settings(**more) -> str:
    """The ``propose_regions`` block for random models, with ``more`` settings."""
    settings = {"detector_threshold": 0.0, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    body = ", ".join(f"{k}: {v}" for k, v in {**settings, **more}.items())
    return f"propose_regions: {{settings: {{{body}}}}}\n"


def baselines_off() -> str:
    """YAML for a `clip.runs` block that switches off config.yaml's baseline runs (those with a
    `method`): tests of the workflow's machinery train the plain runs only, each method's own
    tests train it."""
    import yaml

    runs = yaml.safe_load((REPO / "config.yaml").read_text())["clip"]["runs"]
    return "".join(f"    {name}: null\n" for name, run in runs.items() if "method" in run)


def write_clip_shard(root: Path, samples: list, size=(96, 64), alt_texts: bool = False):
    """One download shard for training tests: ``00000.tar`` (a JPEG per sample, with an alt-text
    ``.txt`` member when ``alt_texts``), its status table and the reference annotations.
    ``samples``: (image, short caption, long caption, regions) each; key i is i in 16 hex
    digits, the alt-text "img i". Returns the shards as train() takes them."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from hic.demo_world import REFERENCE_SCHEMA
    from hic.train_clip import pair_shards

    rows, status = [], []
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i, (image, short, long, regions) in enumerate(samples):
            key, buf = f"{i:016x}", io.BytesIO()
            image.save(buf, "JPEG")
            members = [("jpg", buf.getvalue())] + ([("txt", f"img {i}".encode())] * alt_texts)
            for ext, payload in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            rows.append(
                {
                    "key": key,
                    "url": f"http://x/{i}.jpg",
                    "width": size[0],
                    "height": size[1],
                    "short_caption": short,
                    "long_caption": long,
                    "regions": regions,
                    "source": "test",
                    "seed": 0,
                }
            )
            status.append(
                {
                    "key": key,
                    "status": "success",
                    "caption": f"img {i}",
                    "original_width": size[0],
                    "original_height": size[1],
                }
            )
    pq.write_table(pa.Table.from_pylist(rows, schema=REFERENCE_SCHEMA), root / "ref.parquet")
    pq.write_table(pa.Table.from_pylist(status), root / "00000.parquet")
    return pair_shards([root / "00000.tar"], [root / "ref.parquet"], aligned=False)
