"""Every rule names a pinned conda env that provides every package its code imports."""

import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from hic.codebase import imports

# Import name -> distribution name, where they differ.
DISTRIBUTION = {
    "PIL": "pillow",
    "open_clip": "open_clip_torch",
    "open_clip_train": "open_clip_torch",
    "segment_anything": "segment-anything",
    "yaml": "pyyaml",
}
# Imported lazily, only when the config asks for it (the vllm backend on GPU nodes).
OPTIONAL = {"vllm"}


def rules() -> list[tuple[str, str, str]]:
    """(rule, env file, script) of every rule in rules/*.smk."""
    found = []
    for path in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"(?m)^(?=rule )", path.read_text())[1:]:
            name = re.match(r"rule (\w+):", block).group(1)
            conda = re.search(r'conda:\s*\n\s*"\.\./(envs/[\w.]+)"', block)
            script = re.search(r'script:\s*\n\s*"\.\./(scripts/[\w.]+)"', block)
            found.append((name, conda and conda.group(1), script and script.group(1)))
    return found


def pinned(env: Path) -> dict[str, str]:
    """Distribution -> version of an env file's pip pins (all of ours pin with ==)."""
    spec = yaml.safe_load(env.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    return dict(line.lower().split("==") for line in pip)


@pytest.mark.parametrize("rule, env, script", rules(), ids=[r[0] for r in rules()])
def test_env_provides_what_the_code_imports(rule, env, script):
    assert env, f"rule {rule} names no conda env"
    assert script, f"rule {rule} runs no script"
    pins = pinned(REPO / env)
    assert all(re.fullmatch(r"\d+(\.\d+)*", v) for v in pins.values()), f"{env}: unpinned {pins}"
    _, external = imports(REPO / script)
    wanted = {
        DISTRIBUTION.get(name, name).lower().replace("_", "-") for name in external - OPTIONAL
    }
    have = {name.replace("_", "-") for name in pins}
    assert wanted <= have, f"{rule}: {env} lacks {sorted(wanted - have)}"


def test_env_pins_match_the_local_requirements():
    required = dict(
        line.lower().split("==")
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if "==" in line
    )
    for env in sorted((REPO / "envs").glob("*.yaml")):
        for name, version in pinned(env).items():
            if name in required:
                assert required[name] == version, (
                    f"{env.name}: {name} {version} vs {required[name]}"
                )
