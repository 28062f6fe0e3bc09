"""The profiles' settings that decide what a run costs: re-run triggers and cores per job."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def load(name: str) -> dict:
    return yaml.safe_load((REPO / f"profiles/{name}/config.yaml").read_text())


def test_default_profile_reruns_on_behaviour_not_on_script_timestamps():
    triggers = load("default")["rerun-triggers"]
    assert "code" not in triggers  # compares script mtimes: a checkout would re-run everything
    assert {"mtime", "params", "input"} <= set(triggers)


def test_every_job_uses_the_cores_the_slurm_profile_gives_it():
    profile = load("slurm")
    threads = profile["set-threads"]
    for rule, resources in profile["set-resources"].items():
        cores = resources.get("cpus_per_task", profile["default-resources"]["cpus_per_task"])
        assert threads.get(rule, 1) == cores, rule
