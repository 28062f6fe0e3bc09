"""The VLM stages' tests under the transformers release of the vLLM environment
(requirements-vlm.txt), through tests/vlm_env/check.sh. Its first run installs that one package
into a side venv under /tmp (the package index must be reachable); HIC_SKIP_VLM_ENV=1 skips it
offline."""

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("HIC_SKIP_VLM_ENV") == "1", reason="HIC_SKIP_VLM_ENV=1")
def test_vlm_tests_pass_under_the_vllm_environments_transformers():
    pinned = re.search(r"^transformers==(\S+)$", (REPO / "requirements-vlm.txt").read_text(), re.M)
    result = subprocess.run(
        [str(REPO / "tests/vlm_env/check.sh"), "-k", "not sigkill"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"transformers {pinned.group(1)}" in result.stdout
    assert re.search(r"\d+ passed", result.stdout)
