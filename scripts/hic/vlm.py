"""Generation backends of the VLM stages, with one output contract.

``transformers`` (default) runs anywhere, CUDA with bf16 when present, else CPU.
``vllm`` is the production path on GPUs: offline ``LLM.generate`` with ``multi_modal_data``.
Both take the same model reference and return one text per (image, prompt), in order
(``images=None``: text-only prompts), and score fixed answers by likelihood
(``choice_probabilities``) instead of parsing free text.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

from PIL import Image

from hic.models import (
    ModelRef,
    Stopwatch,
    chat_messages,
    choice_probabilities,
    generate_texts,
    load_vlm,
    unavailable_error,
)

BACKENDS = ("transformers", "vllm")


class BackendUnavailable(RuntimeError):
    """The configured backend cannot run in this environment."""


class TransformersBackend:
    def __init__(
        self,
        ref: ModelRef,
        *,
        min_pixels: int,
        max_pixels: int,
        do_sample: bool = False,
        temperature: float = 1.0,
    ):
        self.model, self.processor = load_vlm(ref, min_pixels=min_pixels, max_pixels=max_pixels)
        self.do_sample, self.temperature = do_sample, temperature
        self.model_time = Stopwatch()

    def choice_probabilities(
        self, images: Sequence[Image.Image], prompts: Sequence[str], choices: tuple[str, ...]
    ) -> list[dict[str, float]]:
        return choice_probabilities(
            self.model, self.processor, list(images), list(prompts), choices, self.model_time
        )

    def generate(
        self, images: Sequence[Image.Image] | None, prompts: Sequence[str], max_new_tokens: int
    ) -> list[str]:
        return generate_texts(
            self.model,
            self.processor,
            None if images is None else list(images),
            list(prompts),
            max_new_tokens=max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            watch=self.model_time,
        )


class VllmBackend:
    """vLLM's offline engine; prompts rendered with the model's own chat template.

    ``engine`` holds further ``vllm.LLM`` arguments from the config (``caption_scene.vllm``),
    e.g. ``max_model_len``: without it vLLM reserves memory for the model's whole context
    (128k tokens for Qwen2.5-VL), which an image and a caption never need."""

    def __init__(
        self,
        ref: ModelRef,
        *,
        min_pixels: int,
        max_pixels: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        engine: dict | None = None,
    ):
        import vllm  # lazy: only GPU machines have it
        from transformers import AutoProcessor

        # Only its chat template is used here; vLLM resizes images with the pixel limits.
        try:
            self.processor = AutoProcessor.from_pretrained(ref.id, revision=ref.revision)
        except OSError as err:
            raise unavailable_error(ref, err) from err
        self.llm = vllm.LLM(
            model=ref.id,
            revision=ref.revision,
            limit_mm_per_prompt={"image": 1},
            mm_processor_kwargs={"min_pixels": min_pixels, "max_pixels": max_pixels},
            **(engine or {}),
        )
        self.sampling = vllm.SamplingParams
        self.temperature = temperature if do_sample else 0.0
        self.model_time = Stopwatch()  # the engine's calls (its own preprocessing included)

    def _requests(self, images, prompts) -> list[dict]:
        requests = []
        for i, prompt in enumerate(prompts):
            messages = chat_messages(prompt, image=images is not None)
            text = self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            request = {"prompt": text}
            if images is not None:
                request["multi_modal_data"] = {"image": images[i]}
            requests.append(request)
        return requests

    def generate(
        self, images: Sequence[Image.Image] | None, prompts: Sequence[str], max_new_tokens: int
    ) -> list[str]:
        params = self.sampling(max_tokens=max_new_tokens, temperature=self.temperature)
        requests = self._requests(images, prompts)
        with self.model_time:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]

    def choice_probabilities(
        self, images: Sequence[Image.Image], prompts: Sequence[str], choices: tuple[str, ...]
    ) -> list[dict[str, float]]:
        # vLLM returns the top-k log-probabilities of the first generated token; a choice
        # outside the top 20 gets no mass (and a model answering neither gets none at all).
        params = self.sampling(max_tokens=1, temperature=0.0, logprobs=20)
        requests = self._requests(images, prompts)
        with self.model_time:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [
            {
                c: sum(
                    math.exp(lp.logprob)
                    for lp in output.outputs[0].logprobs[0].values()
                    if lp.decoded_token.strip().lower() == c
                )
                for c in choices
            }
            for output in outputs
        ]


def make_backend(
    name: str, ref: ModelRef, *, vllm: dict | None = None, **options
) -> TransformersBackend | VllmBackend:
    """The named backend; ``vllm`` is extra ``vllm.LLM`` arguments, used by that backend only."""
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise BackendUnavailable(
                "backend 'vllm' is selected but vllm is not installed in this environment. "
                "Install it on a CUDA machine (pip install vllm) or set backend: transformers."
            )
        return VllmBackend(ref, engine=vllm, **options)
    return TransformersBackend(ref, **options)
