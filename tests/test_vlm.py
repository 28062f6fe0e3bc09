import importlib.util

import pytest

from hic.models import ModelRef
from hic.vlm import BackendUnavailable, make_backend


def test_selecting_vllm_without_it_says_how_to_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    with pytest.raises(BackendUnavailable) as err:
        make_backend("vllm", ModelRef("Qwen/Qwen2.5-VL-7B-Instruct"), min_pixels=1, max_pixels=2)
    assert "vllm is not installed" in str(err.value) and "backend: transformers" in str(err.value)


def test_unknown_backend_is_named():
    with pytest.raises(BackendUnavailable, match="unknown backend 'tgi'"):
        make_backend("tgi", ModelRef("x"), min_pixels=1, max_pixels=2)
