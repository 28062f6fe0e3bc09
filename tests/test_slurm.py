"""The tiny workflow on a real single-node SLURM cluster, through profiles/slurm.

tests/slurm/start.sh installs (if needed) and starts munge, slurmctld and slurmd on loopback;
stop.sh stops exactly those processes. The cluster has no accounting database, so the
plugin runs with ``slurm-status-command: squeue`` (see tests/slurm/README.md).
"""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO, copy_workflow

SLURM = Path(__file__).parent / "slurm"
TINY = """
demo_world: {n_images: 24, n_benchmark_pairs: 4, width: 96, height: 72, classify_per_class: 1}
shards: {size: 16}
clip: {defaults: {epochs: 1, batch_size: 8, warmup: 1}}
"""


@pytest.fixture(scope="module")
def cluster():
    if os.environ.get("HIC_SKIP_SLURM") == "1":
        pytest.skip("HIC_SKIP_SLURM=1: no SLURM cluster on this machine")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.fail("the SLURM test needs slurm-wlm installed, or apt-get to install it")
    # The daemons run as the munge and slurm users: pytest's private tmp folder is closed to them.
    state = Path(tempfile.mkdtemp(prefix="hic-slurm-"))
    state.chmod(0o755)
    subprocess.run(["bash", str(SLURM / "start.sh"), str(state)], check=True, timeout=900)
    yield state
    subprocess.run(["bash", str(SLURM / "stop.sh"), str(state)], check=True, timeout=300)
    shutil.rmtree(state)


def cluster_profile(folder: Path) -> Path:
    """profiles/slurm with what a user edits for their cluster: partition, memory, GPUs."""
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    profile["default-resources"].update(
        slurm_partition="debug", mem_mb=1500, runtime=30, cpus_per_task=1
    )
    for resources in profile["set-resources"].values():
        resources.update(slurm_partition="debug", mem_mb=1500, gpu=0, cpus_per_task=1)
    profile["set-threads"] = {rule: 1 for rule in profile["set-threads"]}
    # A group job asks for the sum of its members' cpus: two fit this 2-cpu node.
    profile["group-components"] = dict.fromkeys(profile["group-components"], 2)
    profile.update(
        {
            # No slurmdbd here: squeue, with MinJobAge (60 s) >= 3 x the init seconds.
            "slurm-status-command": "squeue",
            "slurm-init-seconds-before-status-checks": 2,
            "latency-wait": 5,
            "jobs": 4,
        }
    )
    out = folder / "profiles/cluster"
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(profile))
    return out


def running_job(run: subprocess.Popen, timeout: float) -> str | None:
    """The id of a job that SLURM is running, waiting up to ``timeout`` seconds while
    snakemake is alive."""
    deadline = time.time() + timeout
    while time.time() < deadline and run.poll() is None:
        out = subprocess.run(
            ["squeue", "-h", "-t", "RUNNING", "-o", "%i"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
        if out:
            return out[0]
        time.sleep(1)
    return None


def test_tiny_workflow_runs_through_slurm_and_survives_a_cancelled_job(cluster, tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    (wf / "tiny.yaml").write_text(TINY)
    profile = cluster_profile(wf)
    log = (tmp_path / "snakemake.log").open("w")
    run = subprocess.Popen(
        [str(BIN / "snakemake"), "--profile", str(profile), "--configfile", "tiny.yaml"],
        cwd=wf,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    victim = running_job(run, timeout=300)
    assert victim, "no job reached the RUNNING state"
    subprocess.run(["scancel", victim], check=True, timeout=30)  # a pre-empted job
    try:
        assert run.wait(timeout=2400) == 0, (tmp_path / "snakemake.log").read_text()[-5000:]
    finally:
        if run.poll() is None:
            run.kill()
    text = (tmp_path / "snakemake.log").read_text()
    assert f"SLURM-job '{victim}' failed, SLURM status is: 'CANCELLED'" in text
    assert "Trying to restart job" in text  # and the restarted attempt succeeded
    for group in ["select_batch", "assemble_batch"]:  # 3 shards in groups of 2: two group jobs
        assert text.count(f"Group job {group} ") == 2, group
    assert (wf / "results/tables/retrieval.md").exists()
    assert len(list((wf / "results/dataset").glob("*.parquet"))) == 3  # 33 URL rows / 16
    assert (
        "Nothing to be done"
        in subprocess.run(
            [
                str(BIN / "snakemake"),
                "--profile",
                str(profile),
                "--configfile",
                "tiny.yaml",
                "--dry-run",
            ],
            cwd=wf,
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout
    )
