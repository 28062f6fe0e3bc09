"""Generation backends of the VLM stages, with one output contract.

``transformers`` (default) runs anywhere, CUDA with bf16 when present, else CPU.
``vllm`` is the production path on GPUs: offline ``LLM.generate`` with ``multi_modal_data``.
Both take the same model reference and return one text per (image, prompt), in order.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from PIL import Image

from hic.models import ModelRef, generate_texts, load_vlm

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

    def generate(
        self, images: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int
    ) -> list[str]:
        return generate_texts(
            self.model,
            self.processor,
            list(images),
            list(prompts),
            max_new_tokens=max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
        )


class VllmBackend:
    """vLLM's offline engine; prompts rendered with the model's own chat template."""

    def __init__(
        self,
        ref: ModelRef,
        *,
        min_pixels: int,
        max_pixels: int,
        do_sample: bool = False,
        temperature: float = 1.0,
    ):
        import vllm  # lazy: only GPU machines have it
        from transformers import AutoProcessor

        # Only its chat template is used here; vLLM resizes images with the pixel limits.
        self.processor = AutoProcessor.from_pretrained(ref.id, revision=ref.revision)
        self.llm = vllm.LLM(
            model=ref.id,
            revision=ref.revision,
            limit_mm_per_prompt={"image": 1},
            mm_processor_kwargs={"min_pixels": min_pixels, "max_pixels": max_pixels},
        )
        self.sampling = vllm.SamplingParams
        self.temperature = temperature if do_sample else 0.0

    def generate(
        self, images: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int
    ) -> list[str]:
        requests = []
        for image, prompt in zip(images, prompts, strict=True):
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
            ]
            text = self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            requests.append({"prompt": text, "multi_modal_data": {"image": image}})
        params = self.sampling(max_tokens=max_new_tokens, temperature=self.temperature)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]


def make_backend(name: str, ref: ModelRef, **options) -> TransformersBackend | VllmBackend:
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise BackendUnavailable(
                "backend 'vllm' is selected but vllm is not installed in this environment. "
                "Install it on a CUDA machine (pip install vllm) or set backend: transformers."
            )
        return VllmBackend(ref, **options)
    return TransformersBackend(ref, **options)
