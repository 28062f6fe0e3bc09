import importlib.util
import json
import math
import shutil
import sys
import time
import types

import pytest
import torch
from PIL import Image

from hic.decoding import Decoding, Generation
from hic.models import ModelRef, ModelUnavailableError, hf_generation_config
from hic.tiny_models import build_tiny_vlm
from hic.vlm import BackendUnavailable, VllmBackend, fit_pixels, make_backend


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
    """Stands in for vllm: records the engine's arguments and every call's requests and
    sampling parameters (one or one per request), and answers with scripted texts, finish
    reasons and first-token log-probabilities."""

    def __init__(self, finish_reason="stop"):
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
                per_request = params if isinstance(params, list) else [params] * len(requests)
                assert len(per_request) == len(requests)
                fake.requests.append((requests, [p.kwargs for p in per_request], use_tqdm))
                if per_request[0].kwargs.get("logprobs"):
                    top = {
                        1: types.SimpleNamespace(decoded_token=" Yes", logprob=math.log(0.6)),
                        2: types.SimpleNamespace(decoded_token="no", logprob=math.log(0.3)),
                        3: types.SimpleNamespace(decoded_token="maybe", logprob=math.log(0.1)),
                    }
                    outputs = [types.SimpleNamespace(logprobs=[top], text="Yes")]
                    return [types.SimpleNamespace(outputs=outputs) for _ in requests]
                return [
                    types.SimpleNamespace(
                        outputs=[
                            types.SimpleNamespace(
                                text=f"Caption {i}.", logprobs=None, finish_reason=finish_reason
                            )
                        ]
                    )
                    for i in range(len(requests))
                ]

        self.LLM, self.SamplingParams = LLM, SamplingParams


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm") / "tiny-qwen2_5_vl"
    build_tiny_vlm(out, seed=0)
    return out


def fake_vllm_backend(monkeypatch, tiny_vlm, fake, **options):
    monkeypatch.setitem(sys.modules, "vllm", fake)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a)
    )
    return make_backend("vllm", ModelRef(str(tiny_vlm)), **options)


def test_vllm_backend_speaks_vllms_offline_api(tiny_vlm, monkeypatch):
    fake = FakeVllm()
    backend = fake_vllm_backend(
        monkeypatch,
        tiny_vlm,
        fake,
        min_pixels=3136,
        max_pixels=12544,
        vllm={"max_model_len": 4096},
    )
    assert fake.engines == [
        {
            "model": str(tiny_vlm),
            "revision": None,
            "limit_mm_per_prompt": {"image": 1},
            "mm_processor_kwargs": {"min_pixels": 3136, "max_pixels": 12544},
            "enable_prefix_caching": True,
            "generation_config": "vllm",  # the checkpoint's sampling defaults are not read
            "max_model_len": 4096,
        }
    ]
    image = Image.new("RGB", (40, 30), "red")
    assert backend.generate([image], ["Describe it."], 16) == [Generation("Caption 0.", "stop")]
    requests, sampling, use_tqdm = fake.requests[-1]
    # Every decoding value explicit (greedy), the same values the transformers backend gets.
    assert sampling == [
        {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    ]
    assert use_tqdm is False
    (request,) = requests
    assert request["multi_modal_data"]["image"].size == (84, 56)  # smart_resize: min_pixels
    # The prompt is the model's own chat template, with the image placeholder in Qwen's form.
    assert "<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>" in request["prompt"]
    assert request["prompt"].endswith("<|im_start|>assistant\n")
    # Text-only prompts (refinement) carry no image.
    backend.generate(None, ["Rewrite this."], 8)
    assert "multi_modal_data" not in fake.requests[-1][0][0]
    # Verdicts: the first token's log-probabilities, summed per choice, not renormalised.
    (probs,) = backend.choice_probabilities([image], ["Is it red?"], ("yes", "no"))
    assert probs == pytest.approx({"yes": 0.6, "no": 0.3})
    assert fake.requests[-1][1] == [{"max_tokens": 1, "temperature": 0.0, "logprobs": 20}]


def test_vllm_backend_sends_a_chunk_in_one_call_with_each_requests_limit(tiny_vlm, monkeypatch):
    fake = FakeVllm(finish_reason="length")
    decoding = Decoding(do_sample=True, temperature=0.7, top_p=0.9, top_k=20)
    backend = fake_vllm_backend(
        monkeypatch, tiny_vlm, fake, min_pixels=3136, max_pixels=50176, decoding=decoding
    )
    big = Image.new("RGB", (1000, 600), "blue")  # 600k pixels: resized to <= 50,176 here
    images = [big, big, Image.new("RGB", (90, 60)), Image.new("RGB", (90, 60))]
    out = backend.generate(images, ["short", "long"] * 2, [48, 320] * 2)
    assert backend.calls == [4] and len(fake.requests) == 1
    assert [g.finish_reason for g in out] == ["length"] * 4 and all(g.truncated for g in out)
    requests, sampling, _ = fake.requests[0]
    assert [s["max_tokens"] for s in sampling] == [48, 320, 48, 320]
    assert sampling[0] | {"max_tokens": 0} == {
        "max_tokens": 0,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "repetition_penalty": 1.0,
    }
    sent = requests[0]["multi_modal_data"]["image"]
    assert sent.size == (280, 168) and sent.width * sent.height <= 50176  # Qwen's smart_resize
    # Both prompts of an image carry the same resized object (resized once).
    assert requests[1]["multi_modal_data"]["image"] is sent


def test_fit_pixels_is_qwens_resize_rule():
    assert fit_pixels(Image.new("RGB", (56, 28)), 784, 12544).size == (56, 28)  # already fits
    assert fit_pixels(Image.new("RGB", (1000, 500)), 784, 12544).size == (140, 56)
    with pytest.raises(ValueError, match="aspect ratio"):
        fit_pixels(Image.new("RGB", (4010, 20)), 784, 12544)


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


def test_transformers_backend_batches_by_length_and_keeps_the_order(tiny_vlm, monkeypatch):
    backend = make_backend(
        "transformers", ModelRef(str(tiny_vlm)), min_pixels=3136, max_pixels=50176, batch_size=2
    )
    seen = []
    real = backend.model.generate

    def recording(**inputs):
        seen.append((inputs["input_ids"].shape, inputs["generation_config"].max_new_tokens))
        return real(**inputs)

    monkeypatch.setattr(backend.model, "generate", recording)
    sizes = [(200, 200), (60, 60), (200, 200), (60, 60), (120, 120)]
    images = [Image.new("RGB", s, "red") for s in sizes]
    prompts = ["Describe it."] * 5
    limits = [6, 3, 6, 3, 6]
    out = backend.generate(images, prompts, limits)
    # Grouped by token limit, then ordered by size: the two small images (limit 3), then the
    # middle one with a large one, then the other large one.
    assert [(shape[0], limit) for shape, limit in seen] == [(2, 3), (2, 6), (1, 6)]
    # The same texts as one request at a time, in the caller's order.
    alone = [
        backend.generate([im], [p], n)[0] for im, p, n in zip(images, prompts, limits, strict=True)
    ]
    assert out == alone
    # A random model never emits its end token within 3 to 6 tokens: every output is cut off.
    assert [g.finish_reason for g in out] == ["length"] * 5


def test_a_sequence_without_an_end_token_is_length(tiny_vlm, monkeypatch):
    backend = make_backend(
        "transformers", ModelRef(str(tiny_vlm)), min_pixels=3136, max_pixels=3136
    )
    tokenizer = backend.processor.tokenizer
    end, pad = backend.model.generation_config.eos_token_id[0], tokenizer.pad_token_id
    word = tokenizer.convert_tokens_to_ids("red")

    def scripted(input_ids, **inputs):
        # Row 0 ends (end token, then padding); row 1 runs to the limit of 3 tokens.
        new = torch.tensor([[word, end, pad], [word, word, word]])
        return torch.cat([input_ids, new], dim=1)

    monkeypatch.setattr(backend.model, "generate", scripted)
    image = Image.new("RGB", (56, 56))
    out = backend.generate([image, image], ["Hi", "Hi"], 3)
    assert out == [Generation("red", "stop"), Generation("redredred", "length")]


def test_hf_decoding_ignores_the_checkpoints_sampling_defaults(tiny_vlm, tmp_path):
    # Qwen2.5-VL-Instruct's generation_config.json: top_k 1 makes do_sample greedy.
    model_dir = tmp_path / "vlm"
    shutil.copytree(tiny_vlm, model_dir)
    config_file = model_dir / "generation_config.json"
    config = json.loads(config_file.read_text())
    config |= {"do_sample": True, "top_k": 1, "top_p": 0.001, "repetition_penalty": 1.05}
    config_file.write_text(json.dumps(config))
    sample = Decoding(do_sample=True, temperature=1.0)
    backend = make_backend(
        "transformers", ModelRef(str(model_dir)), min_pixels=3136, max_pixels=3136, decoding=sample
    )
    image = Image.new("RGB", (56, 56), "green")
    texts = set()
    for seed in range(4):
        torch.manual_seed(seed)
        texts.add(backend.generate([image], ["Describe it."], 12)[0].text)
    assert len(texts) > 1  # it samples: the checkpoint's top_k = 1 did not act
    used = hf_generation_config(backend.model, sample, 12)
    assert (used.top_k, used.top_p, used.repetition_penalty) == (0, 1.0, 1.0)
