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


#: The envs ``vlm_env()`` (rules/common.smk) chooses between, by backend.
VLM_ENVS = ("envs/caption_scene.yaml", "envs/vlm.yaml")


def rules() -> list[tuple[str, str, str]]:
    """(rule, env file, script) of every rule in rules/*.smk; a VLM rule once per env that
    ``vlm_env()`` may give it."""
    found = []
    for path in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"(?m)^(?=rule )", path.read_text())[1:]:
            name = re.match(r"rule (\w+):", block).group(1)
            conda = re.search(r'conda:\s*\n\s*"\.\./(envs/[\w.]+)"', block)
            script = re.search(r'script:\s*\n\s*"\.\./(scripts/[\w.]+)"', block)
            script = script and script.group(1)
            if re.search(r"conda:\s*\n\s*vlm_env\(\)", block):
                found += [(name, env, script) for env in VLM_ENVS]
            else:
                found.append((name, conda and conda.group(1), script))
    return found


def pinned(env: Path) -> dict[str, str]:
    """Distribution -> version of an env file's pip pins (all of ours pin with ==)."""
    spec = yaml.safe_load(env.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    return dict(line.lower().split("==") for line in pip)


@pytest.mark.parametrize(
    "rule, env, script", rules(), ids=[f"{r[0]}-{Path(r[1] or '-').stem}" for r in rules()]
)
def test_env_provides_what_the_code_imports(rule, env, script):
    assert env, f"rule {rule} names no conda env"
    assert script, f"rule {rule} runs no script"
    pins = pinned(REPO / env)
    assert all(re.fullmatch(r"\d+(\.\d+)*", v) for v in pins.values()), f"{env}: unpinned {pins}"
    # A script that loads its recipe module by name (train_demo_model) needs every recipe's.
    extra = tuple(p.stem for p in (REPO / "scripts/hic").glob("demo_training_*.py"))
    _, external = imports(REPO / script, extra=extra if rule == "train_demo_model" else ())
    wanted = {
        DISTRIBUTION.get(name, name).lower().replace("_", "-") for name in external - OPTIONAL
    }
    have = {name.replace("_", "-") for name in pins}
    assert wanted <= have, f"{rule}: {env} lacks {sorted(wanted - have)}"


def exact_pins(path: Path) -> dict[str, str]:
    """Normalised distribution name -> version of a requirements-style file's == lines."""
    pins = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_every_pin_agrees_with_the_constraints():
    """requirements.txt and every env pin the versions constraints.txt fixes (the tested set);
    the vLLM env pins those of requirements-vlm.txt (its own resolved set, README)."""
    constraints = exact_pins(REPO / "constraints.txt")
    pinned_files = [REPO / "requirements.txt", *sorted((REPO / "envs").glob("*.yaml"))]
    vlm_pins = exact_pins(REPO / "requirements-vlm.txt")
    assert pinned(REPO / "envs/vlm.yaml") == vlm_pins
    for path in pinned_files:
        if path.name == "vlm.yaml":
            continue
        pins = exact_pins(path) if path.suffix == ".txt" else pinned(path)
        for name, version in pins.items():
            key = re.sub(r"[-_.]+", "-", name).lower()
            assert constraints.get(key) == version, (
                f"{path.name}: {name}=={version}, constraints.txt has {constraints.get(key)}"
            )


def sections(block: str) -> dict[str, list[str]]:
    """Directive -> its indented lines, of one rule's text."""
    found: dict[str, list[str]] = {}
    current = None
    for line in block.splitlines()[1:]:
        if directive := re.match(r"    (\w+):(.*)$", line):
            current = directive.group(1)
            found[current] = [directive.group(2).strip()] if directive.group(2).strip() else []
        elif current and line.startswith("        ") and line.strip():
            found[current].append(line.strip())
    return found


RULE_BLOCKS = [
    block
    for path in sorted((REPO / "rules").glob("*.smk"))
    for block in re.split(r"(?m)^(?=rule )", path.read_text())[1:]
]


@pytest.mark.parametrize("block", RULE_BLOCKS, ids=[b.split(":")[0][5:] for b in RULE_BLOCKS])
def test_rule_anatomy(block):
    """Named inputs and outputs, a log, a benchmark, an env, threads and a script; no run:."""
    found = sections(block)
    missing = {"input", "output", "log", "benchmark", "conda", "threads", "script"} - set(found)
    assert not missing, f"missing {sorted(missing)}"
    assert "run" not in found and "shell" not in found
    for directive in ("input", "output"):
        for entry in found[directive]:
            if not entry.startswith(("**", ")", "]", "}")) and re.match(r"[\w\"(]", entry):
                # unpack() of an input function that returns a dict: named inputs too
                named = entry.startswith(("[", "{", "unpack("))
                assert re.match(r"\w+=", entry) or named, f"{directive} {entry!r} is not named"
