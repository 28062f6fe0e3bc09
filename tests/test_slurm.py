"""The workflow on a real single-node SLURM cluster, through profiles/slurm.

tests/slurm/start.sh installs (if needed) and starts munge, MariaDB, slurmdbd, slurmctld and
slurmd on loopback, every piece of state in the test's own folder; stop.sh stops exactly those
processes. With accounting, ``sacct`` works: the plugin's default status command, as on most
clusters. A job that is cancelled or pre-empted while it runs must be resubmitted under
``sacct`` as under ``squeue``: the plugin 2.8.0 misreads both, hic.slurm_status fixes it.
"""

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import snakemake_executor_plugin_slurm as plugin
import yaml

from conftest import (
    BIN,
    RANDOM_MODELS,
    REPO,
    baselines_off,
    copy_workflow,
    random_propose_settings,
)
from hic import slurm_status

SLURM = Path(__file__).parent / "slurm"
TINY = (
    RANDOM_MODELS
    + random_propose_settings()
    + f"""
demo_world: {{n_images: 24, n_benchmark_pairs: 4, width: 96, height: 72, classify_per_class: 1}}
shards: {{size: 16}}
clip:
  defaults: {{epochs: 1, batch_size: 8, warmup: 1}}
  runs:
{baselines_off()}"""
)
# One job that runs long enough to be cancelled or pre-empted, and briefly when retried.
ONE_JOB = f"""
import sys
sys.path.insert(0, {str(REPO / "scripts")!r})
from hic.slurm_status import install_if_present
install_if_present()

rule slow:
    output: "done.txt"
    resources: seconds=lambda wildcards, attempt: 60 if attempt == 1 else 1
    shell: "sleep {{resources.seconds}}; touch {{output}}"
"""


# ------------------------------------------------------------------ the shim, without SLURM
def no_requeue(jobs):
    return set()


def test_cancelled_by_a_user_and_preempted_read_as_cancelled():
    states = {"1": "CANCELLED by 0", "2": "PREEMPTED", "3": "RUNNING", "4": "CANCELLED"}
    assert slurm_status.normalise_states(states, no_requeue) == {
        "1": "CANCELLED",
        "2": "CANCELLED",
        "3": "RUNNING",
        "4": "CANCELLED",
    }


def test_a_preempted_job_that_slurm_requeued_is_left_to_slurm():
    asked = []

    def requeued(jobs):
        asked.append(sorted(jobs))
        return {"2"}

    states = {"1": "PREEMPTED", "2": "PREEMPTED", "3": "COMPLETED"}
    assert slurm_status.normalise_states(states, requeued) == {
        "1": "CANCELLED",
        "2": "PREEMPTED",
        "3": "COMPLETED",
    }
    assert asked == [["1", "2"]]  # asked once, about the pre-empted jobs only
    assert slurm_status.normalise_states({"3": "RUNNING"}, requeued) == {"3": "RUNNING"}
    assert len(asked) == 1  # not asked when nothing was pre-empted


def test_squeue_listing_is_parsed_by_job():
    text = "12|PENDING\n13_4|PREEMPTED\n\n"
    assert slurm_status.parse_squeue(text) == {"12": "PENDING", "13_4": "PREEMPTED"}


def test_the_shim_wraps_the_query_and_passes_a_failed_query_through():
    async def query(command, logger):
        return ({"7": "CANCELLED by 1000"}, 0.5) if command == "ok" else (None, None)

    class Log:
        def debug(self, msg):
            self.msg = msg

    wrapped, log = slurm_status.shim(query, no_requeue), Log()
    assert asyncio.run(wrapped("ok", log)) == ({"7": "CANCELLED"}, 0.5)
    assert "'CANCELLED by 1000' read as 'CANCELLED'" in log.msg
    assert asyncio.run(wrapped("broken", log)) == (None, None)


def test_a_preempted_job_waits_while_squeue_cannot_say_whether_it_was_requeued():
    def squeue_down(jobs):
        raise subprocess.CalledProcessError(1, "squeue")

    class Log:
        def warning(self, msg):
            self.msg = msg

        def debug(self, msg):
            pass

    async def query(command, logger):
        return {"5": "PREEMPTED", "6": "CANCELLED by 0"}, 0.1

    log = Log()
    states, _ = asyncio.run(slurm_status.shim(query, squeue_down)("sacct", log))
    assert states == {"5": "PREEMPTED", "6": "CANCELLED"}
    assert "squeue failed" in log.msg and "['5']" in log.msg


def test_the_workflow_installs_the_shim_into_the_plugin_once(monkeypatch):
    monkeypatch.setattr(plugin, "query_job_status", plugin.query_job_status)  # restored after
    original = plugin.query_job_status
    assert not getattr(original, "hic_shim", False)
    assert slurm_status.install_if_present()
    wrapped = plugin.query_job_status
    assert wrapped.hic_shim
    slurm_status.install(plugin)
    assert plugin.query_job_status is wrapped  # not wrapped twice
    monkeypatch.delattr(plugin, "query_job_status")
    with pytest.raises(RuntimeError, match="has no query_job_status"):
        slurm_status.install(plugin)


# ------------------------------------------------------------------ a real cluster
@pytest.fixture(scope="module")
def cluster():
    if os.environ.get("HIC_SKIP_SLURM") == "1":
        pytest.skip("HIC_SKIP_SLURM=1: no SLURM cluster on this machine")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.fail("the SLURM test needs slurm-wlm installed, or apt-get to install it")
    # The daemons run as the munge, mysql and slurm users: pytest's tmp folder is closed to them.
    state = Path(tempfile.mkdtemp(prefix="hic-slurm-"))
    state.chmod(0o755)
    subprocess.run(
        ["bash", str(SLURM / "start.sh"), "--accounting", str(state)], check=True, timeout=900
    )
    yield state
    subprocess.run(["bash", str(SLURM / "stop.sh"), str(state)], check=True, timeout=300)
    shutil.rmtree(state)


def cluster_profile(folder: Path, **settings) -> Path:
    """profiles/slurm with what a user edits for their cluster (partition, memory, GPUs), and
    the test's own ``settings``."""
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
        {"slurm-init-seconds-before-status-checks": 2, "latency-wait": 5, "jobs": 4, **settings}
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


def preempt(victim: str) -> None:
    """Pre-empt ``victim`` with a short job in the higher-tier partition that needs the node."""
    subprocess.run(
        ["sbatch", "-p", "urgent", "-c", str(os.cpu_count()), "--mem=100", "-J", "hic-urgent",
         "-o", "/dev/null", "--wrap", "sleep 1"],
        check=True,
        timeout=30,
    )  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline:
        state = subprocess.run(
            ["squeue", "-h", "--states=all", "-j", victim, "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        if state == "PREEMPTED":
            return
        time.sleep(0.5)
    raise AssertionError(f"job {victim} was not pre-empted: {state!r}")


def finish(run: subprocess.Popen, log: Path, timeout: float) -> str:
    """snakemake's log once it has exited 0 within ``timeout`` seconds."""
    try:
        assert run.wait(timeout=timeout) == 0, log.read_text()[-5000:]
    except subprocess.TimeoutExpired:
        raise AssertionError(f"snakemake still waiting:\n{log.read_text()[-5000:]}") from None
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    return log.read_text()


@pytest.mark.parametrize("status", ["sacct", "squeue"])
@pytest.mark.parametrize("end", ["scancel", "preempt"])
def test_a_cancelled_or_preempted_job_is_resubmitted(cluster, tmp_path, status, end):
    (tmp_path / "Snakefile").write_text(ONE_JOB)
    profile = cluster_profile(tmp_path, **{"slurm-status-command": status, "jobs": 1})
    log = tmp_path / "snakemake.log"
    with log.open("w") as out:
        run = subprocess.Popen(
            [str(BIN / "snakemake"), "--profile", str(profile)],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    victim = running_job(run, timeout=120)
    assert victim, log.read_text()
    if end == "scancel":
        subprocess.run(["scancel", victim], check=True, timeout=30)
    else:
        preempt(victim)
    text = finish(run, log, timeout=180)
    assert f"SLURM-job '{victim}' failed, SLURM status is: 'CANCELLED'" in text
    assert "Trying to restart job" in text
    assert (tmp_path / "done.txt").exists()


def test_tiny_workflow_runs_through_slurm_and_survives_a_cancelled_job(cluster, tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    (wf / "tiny.yaml").write_text(TINY)
    profile = cluster_profile(wf)
    assert "slurm-status-command" not in yaml.safe_load((profile / "config.yaml").read_text())
    log = tmp_path / "snakemake.log"
    with log.open("w") as out:
        run = subprocess.Popen(
            [str(BIN / "snakemake"), "--profile", str(profile), "--configfile", "tiny.yaml"],
            cwd=wf,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    victim = running_job(run, timeout=300)
    assert victim, "no job reached the RUNNING state"
    subprocess.run(["scancel", victim], check=True, timeout=30)
    text = finish(run, log, timeout=2400)
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
