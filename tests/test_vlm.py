import importlib.util
import math
import sys
import time
import types

import pytest
from PIL import Image

from hic.models import ModelRef, ModelUnavailableError, build_tiny_vlm
from hic.vlm import BackendUnavailable, VllmBackend, make_backend


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


class FakeVllm(types.ModuleType):
    """Stands in for vllm: records the engine's arguments and every request, and answers
    with scripted texts and first-token log-probabilities."""

    def __init__(self):
        super().__init__("vllm")
        self.engines, self.requests = [], []
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        class LLM:
            def __init__(self, **kwargs):
                fake.engines.append(kwargs)

            def generate(self, requests, params, use_tqdm=True):
                fake.requests.append((requests, params.kwargs, use_tqdm))
                if params.kwargs.get("logprobs"):
                    top = {
                        1: types.SimpleNamespace(decoded_token=" Yes", logprob=math.log(0.6)),
                        2: types.SimpleNamespace(decoded_token="no", logprob=math.log(0.3)),
                        3: types.SimpleNamespace(decoded_token="maybe", logprob=math.log(0.1)),
                    }
                    outputs = [types.SimpleNamespace(logprobs=[top], text="Yes")]
                else:
                    outputs = [types.SimpleNamespace(text="A caption.", logprobs=None)]
                return [types.SimpleNamespace(outputs=outputs) for _ in requests]

        self.LLM, self.SamplingParams = LLM, SamplingParams


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm") / "tiny-qwen2_5_vl"
    build_tiny_vlm(out, seed=0)
    return out


def test_vllm_backend_speaks_vllms_offline_api(tiny_vlm, monkeypatch):
    fake = FakeVllm()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a)
    )
    backend = make_backend(
        "vllm",
        ModelRef(str(tiny_vlm)),
        min_pixels=3136,
        max_pixels=12544,
        do_sample=False,
        vllm={"max_model_len": 4096},
    )
    assert fake.engines == [
        {
            "model": str(tiny_vlm),
            "revision": None,
            "limit_mm_per_prompt": {"image": 1},
            "mm_processor_kwargs": {"min_pixels": 3136, "max_pixels": 12544},
            "max_model_len": 4096,
        }
    ]
    image = Image.new("RGB", (40, 30), "red")
    assert backend.generate([image], ["Describe it."], 16) == ["A caption."]
    requests, sampling, use_tqdm = fake.requests[-1]
    assert sampling == {"max_tokens": 16, "temperature": 0.0} and use_tqdm is False
    (request,) = requests
    assert request["multi_modal_data"] == {"image": image}
    # The prompt is the model's own chat template, with the image placeholder in Qwen's form.
    assert "<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>" in request["prompt"]
    assert request["prompt"].endswith("<|im_start|>assistant\n")
    # Text-only prompts (refinement) carry no image.
    backend.generate(None, ["Rewrite this."], 8)
    assert "multi_modal_data" not in fake.requests[-1][0][0]
    # Verdicts: the first token's log-probabilities, summed per choice, not renormalised.
    (probs,) = backend.choice_probabilities([image], ["Is it red?"], ("yes", "no"))
    assert probs == pytest.approx({"yes": 0.6, "no": 0.3})
    assert fake.requests[-1][1] == {"max_tokens": 1, "temperature": 0.0, "logprobs": 20}


def test_vllm_backend_names_a_missing_model(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", FakeVllm())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="no-such-org/no-such-vlm"):
        VllmBackend(ModelRef("no-such-org/no-such-vlm", "abc"), min_pixels=1, max_pixels=2)


def test_transformers_backend_times_the_model_alone(tiny_vlm):
    backend = make_backend(
        "transformers", ModelRef(str(tiny_vlm)), min_pixels=3136, max_pixels=12544
    )
    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (60, 30), "blue")]
    started = time.perf_counter()
    backend.generate(images, ["Describe it."] * 2, 4)
    wall = time.perf_counter() - started
    # Inside the call: the chat template, image processing and decoding are not model time.
    assert 0 < backend.model_time.seconds < wall
    before = backend.model_time.seconds
    backend.choice_probabilities(images[:1], ["Is it red?"], ("yes", "no"))
    assert backend.model_time.seconds > before
