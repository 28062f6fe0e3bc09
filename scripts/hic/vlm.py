"""Generation backends of the VLM stages, with one output contract.

``transformers`` (default) runs anywhere, CUDA with bf16 when present, else CPU: the portable
fallback, batched by length. ``vllm`` is the production path on GPUs (its own environment,
envs/vlm.yaml): one offline ``LLM.generate`` call over every request it is given (a stage
hands it a whole chunk of images, both scene prompts of each image together), prefix caching
on, images resized to the pixel limits before they are sent.

Both take the same model reference and the same explicit :class:`Decoding`, return one
:class:`Generation` (text and finish reason) per (image, prompt), in order (``images=None``:
text-only prompts), and score fixed answers by likelihood (``choice_probabilities``) instead
of parsing free text.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from hic.decoding import GREEDY, Decoding, Generation
from hic.models import (
    ModelRef,
    Stopwatch,
    chat_messages,
    choice_probabilities,
    generate_texts,
    load_vlm,
    unavailable_error,
)
from hic.parts import model_identity

BACKENDS = ("transformers", "vllm")
PATCH = 28  # Qwen2.5-VL: 14 px patches merged 2x2 into one visual token


class BackendUnavailable(RuntimeError):
    """The configured backend cannot run in this environment."""


def _limits(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != n:
        raise ValueError(f"{len(limits)} token limits for {n} prompts")
    return limits


def fit_pixels(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """The image at the size Qwen2-VL's processor would give it (``smart_resize``: sides
    multiples of 28 px, area within the limits), so that a large image is not shipped to the
    engine whole. Raises ValueError for an aspect ratio over 200, as the processor does."""
    height, width = smart_resize(
        image.height, image.width, factor=PATCH, min_pixels=min_pixels, max_pixels=max_pixels
    )
    if (width, height) == image.size:
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)


class TransformersBackend:
    """``batch_size`` requests per ``generate`` call, sorted by length (None: all at once)."""

    def __init__(
        self,
        ref: ModelRef,
        *,
        min_pixels: int,
        max_pixels: int,
        decoding: Decoding = GREEDY,
        batch_size: int | None = None,
    ):
        self.model, self.processor = load_vlm(ref, min_pixels=min_pixels, max_pixels=max_pixels)
        self.decoding, self.batch_size = decoding, batch_size
        self.model_time = Stopwatch()

    def choice_probabilities(
        self, images: Sequence[Image.Image], prompts: Sequence[str], choices: tuple[str, ...]
    ) -> list[dict[str, float]]:
        return choice_probabilities(
            self.model, self.processor, list(images), list(prompts), choices, self.model_time
        )

    def generate(
        self,
        images: Sequence[Image.Image] | None,
        prompts: Sequence[str],
        max_new_tokens: int | Sequence[int],
    ) -> list[Generation]:
        return generate_texts(
            self.model,
            self.processor,
            None if images is None else list(images),
            list(prompts),
            max_new_tokens=_limits(max_new_tokens, len(prompts)),
            decoding=self.decoding,
            batch_size=self.batch_size,
            watch=self.model_time,
        )


class VllmBackend:
    """vLLM's offline engine; prompts rendered with the model's own chat template.

    ``engine`` holds further ``vllm.LLM`` arguments from the config (``caption_scene.vllm``),
    e.g. ``max_model_len``: without it vLLM reserves memory for the model's whole context
    (128k tokens for Qwen2.5-VL), which an image and a caption never need. Prefix caching is
    on (a second prompt about the same image reuses its prefill), and the checkpoint's
    generation_config is not read (``generation_config="vllm"``): decoding is ours alone."""

    def __init__(
        self,
        ref: ModelRef,
        *,
        min_pixels: int,
        max_pixels: int,
        decoding: Decoding = GREEDY,
        engine: dict | None = None,
        batch_size: int | None = None,  # vLLM schedules its own batches
    ):
        import vllm  # lazy: only GPU machines have it
        from transformers import AutoProcessor

        # Only its chat template is used here; images are resized before they are sent.
        try:
            self.processor = AutoProcessor.from_pretrained(ref.id, revision=ref.revision)
        except OSError as err:
            raise unavailable_error(ref, err) from err
        self.pixels = (min_pixels, max_pixels)
        self.llm = vllm.LLM(
            model=ref.id,
            revision=ref.revision,
            limit_mm_per_prompt={"image": 1},
            mm_processor_kwargs={"min_pixels": min_pixels, "max_pixels": max_pixels},
            enable_prefix_caching=True,
            generation_config="vllm",
            **(engine or {}),
        )
        self.sampling = vllm.SamplingParams
        self.decoding = decoding
        self.model_time = Stopwatch()  # the engine's calls (its own preprocessing included)
        self.calls: list[int] = []  # requests per engine call

    def _requests(self, images, prompts) -> list[dict]:
        requests, fitted = [], {}
        for i, prompt in enumerate(prompts):
            messages = chat_messages(prompt, image=images is not None)
            text = self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            request = {"prompt": text}
            if images is not None:
                # Both prompts of an image send the same resized object (resized once).
                image = fitted.setdefault(id(images[i]), fit_pixels(images[i], *self.pixels))
                request["multi_modal_data"] = {"image": image}
            requests.append(request)
        return requests

    def _params(self, max_tokens: int):
        effective = self.decoding.effective()
        del effective["do_sample"]  # vLLM decodes greedily at temperature 0
        return self.sampling(max_tokens=max_tokens, **effective)

    def _run(self, requests, params):
        self.calls.append(len(requests))
        with self.model_time:
            return self.llm.generate(requests, params, use_tqdm=False)

    def generate(
        self,
        images: Sequence[Image.Image] | None,
        prompts: Sequence[str],
        max_new_tokens: int | Sequence[int],
    ) -> list[Generation]:
        """Every request in one engine call, with one SamplingParams per distinct limit."""
        limits = _limits(max_new_tokens, len(prompts))
        params = {limit: self._params(limit) for limit in set(limits)}
        outputs = self._run(self._requests(images, prompts), [params[n] for n in limits])
        return [Generation(o.outputs[0].text, o.outputs[0].finish_reason) for o in outputs]

    def choice_probabilities(
        self, images: Sequence[Image.Image], prompts: Sequence[str], choices: tuple[str, ...]
    ) -> list[dict[str, float]]:
        # vLLM returns the top-k log-probabilities of the first generated token; a choice
        # outside the top 20 gets no mass (and a model answering neither gets none at all).
        params = self.sampling(max_tokens=1, temperature=0.0, logprobs=20)
        outputs = self._run(self._requests(images, prompts), params)
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
    name: str,
    ref: ModelRef,
    *,
    vllm: dict | None = None,
    decoding: Decoding | dict | None = None,
    **options,
) -> TransformersBackend | VllmBackend:
    """The named backend; ``vllm`` is extra ``vllm.LLM`` arguments, used by that backend only;
    ``decoding`` a :class:`Decoding` or the config's keys for one (default: greedy)."""
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if not isinstance(decoding, Decoding):
        decoding = Decoding.from_config(decoding or {})
    if name == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise BackendUnavailable(
                "backend 'vllm' is selected but vllm is not installed in this environment. "
                "Install its environment on a CUDA machine (envs/vlm.yaml, or pip install -r "
                "requirements-vlm.txt) or set backend: transformers."
            )
        return VllmBackend(ref, engine=vllm, decoding=decoding, **options)
    return TransformersBackend(ref, decoding=decoding, **options)


def stage_backend(params, config) -> tuple[TransformersBackend | VllmBackend, dict]:
    """(backend, identity) for a region stage's Snakemake job: the model, backend and shared
    image and decoding options of its params, vLLM's engine arguments from the config (speed
    settings, never params), and what identifies the backend to the stage's flushed parts."""
    backend = make_backend(
        params.backend,
        ModelRef.from_config(params.model),
        **params.vlm,
        vllm=config["caption_scene"]["vllm"],
    )
    identity = {"model": model_identity(params.model), "backend": params.backend}
    return backend, {**identity, "vlm": params.vlm}
