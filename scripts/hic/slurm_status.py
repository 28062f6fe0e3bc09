"""A shim around snakemake-executor-plugin-slurm's job status query, until upstream fixes it.

The plugin (2.8.0) compares the whole state string that ``sacct``/``squeue`` report with its
failure list, so two ways a job ends leave snakemake waiting for it forever:

- ``sacct`` with slurmdbd accounting reports a job cancelled by ``scancel`` as
  ``CANCELLED by <uid>``, not ``CANCELLED``;
- a pre-empted job that SLURM does not requeue stays ``PREEMPTED`` (in ``squeue`` too), which
  the plugin leaves to SLURM to resume.

``install`` wraps the plugin's ``query_job_status`` so that both read as ``CANCELLED``: the
plugin reports the job failed and ``--retries`` resubmits it. A ``PREEMPTED`` job that SLURM
has requeued (``squeue`` shows it pending or running again; ``sacct`` still says
``PREEMPTED``) is left alone, so it is never run twice. profiles/slurm sets
``slurm-no-requeue`` so that snakemake alone retries pre-empted jobs.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
from collections.abc import Callable, Iterable

PLUGIN = "snakemake_executor_plugin_slurm"
CANCELLED = "CANCELLED"
# squeue states of a job that is still SLURM's to run (a requeued one is PENDING again).
QUEUED = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
}


def normalise_states(
    states: dict[str, str], requeued: Callable[[Iterable[str]], set[str]]
) -> dict[str, str]:
    """The states with ``CANCELLED by <uid>`` and every ``PREEMPTED`` job that ``requeued``
    does not name read as ``CANCELLED``. ``requeued`` is asked only about pre-empted jobs."""
    preempted = [job for job, state in states.items() if state == "PREEMPTED"]
    back_in_queue = requeued(preempted) if preempted else set()
    out = {}
    for job, state in states.items():
        if state.split(" ", 1)[0] == CANCELLED or (
            state == "PREEMPTED" and job not in back_in_queue
        ):
            out[job] = CANCELLED
        else:
            out[job] = state
    return out


def parse_squeue(text: str) -> dict[str, str]:
    """``squeue -h -o '%i|%T'`` output as {job id: state}."""
    rows = (line.split("|", 1) for line in text.splitlines() if line.strip())
    return {job.strip(): state.strip() for job, state in rows}


def requeued_by_slurm(jobs: Iterable[str]) -> set[str]:
    """The jobs that SLURM's queue holds in a state it will run again (requeued after
    pre-emption). A job the queue has forgotten is not requeued."""
    jobs = set(jobs)
    listing = subprocess.run(
        ["squeue", "-h", "--states=all", "-o", "%i|%T"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return {job for job, state in parse_squeue(listing).items() if job in jobs and state in QUEUED}


def shim(query: Callable, requeued: Callable[[Iterable[str]], set[str]] = requeued_by_slurm):
    """``query`` (the plugin's ``async query_job_status(command, logger)``), its states
    normalised; a failed query (None) passes through for the plugin to retry. While squeue
    cannot say whether a pre-empted job was requeued, it stays pre-empted (asked again at
    the next status check)."""

    async def query_job_status(command, logger):
        states, seconds = await query(command, logger)
        if states is None:
            return states, seconds

        def requeued_or_unknown(jobs):
            try:
                return requeued(jobs)
            except (subprocess.SubprocessError, OSError) as error:
                logger.warning(f"squeue failed ({error}); pre-empted jobs {sorted(jobs)} wait")
                return set(jobs)

        normalised = normalise_states(states, requeued_or_unknown)
        for job in sorted(j for j in states if states[j] != normalised[j]):
            logger.debug(f"SLURM job {job}: state {states[job]!r} read as {CANCELLED!r}")
        return normalised, seconds

    query_job_status.hic_shim = True
    return query_job_status


def install(plugin) -> None:
    """Wrap ``plugin.query_job_status`` (the name the executor calls) once."""
    original = getattr(plugin, "query_job_status", None)
    if original is None:
        raise RuntimeError(
            f"{plugin.__name__} has no query_job_status: hic.slurm_status was written for "
            "snakemake-executor-plugin-slurm 2.8.0; check whether the new version still needs it"
        )
    if not getattr(original, "hic_shim", False):
        plugin.query_job_status = shim(original)


def install_if_present() -> bool:
    """Install the shim wherever the plugin is installed; True if it was."""
    if importlib.util.find_spec(PLUGIN) is None:
        return False
    install(importlib.import_module(PLUGIN))
    return True
