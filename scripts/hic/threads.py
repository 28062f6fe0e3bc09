"""CPU threads of a job: what Snakemake gives it (``threads``), not the whole machine."""

from __future__ import annotations


def use_threads(n: int) -> None:
    """Bound torch's CPU threads to the job's ``threads`` (its cores on a cluster node): by
    default torch takes every core of the machine, which on a shared node oversubscribes it."""
    import torch

    torch.set_num_threads(max(1, int(n)))
