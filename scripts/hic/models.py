"""Vision-language models: one loading path for real hub weights and for tiny offline stand-ins.

Real runs name a Hugging Face id with a pinned revision. Without network, the workflow builds
tiny randomly initialised models of the same architectures (``hic.tiny_models``), saved the way
hub checkpoints are, so that loading, prompting, batching and decoding run through exactly the
code real weights use.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    PreTrainedModel,
    ProcessorMixin,
)

from hic.decoding import GREEDY, Decoding, Generation


@dataclass(frozen=True)
class ModelRef:
    """A Hugging Face hub id (pin ``revision`` for reproducible runs) or a local folder."""

    id: str
    revision: str | None = None

    @classmethod
    def from_config(cls, d: dict) -> ModelRef:
        return cls(id=str(d["id"]), revision=d.get("revision"))


class ModelUnavailableError(OSError):
    """The model is neither a local folder nor in the Hugging Face cache."""


def unavailable_error(ref: ModelRef, why: OSError) -> ModelUnavailableError:
    revision = ref.revision or "main"
    return ModelUnavailableError(
        f"cannot load model {ref.id!r} (revision {revision}): it is neither a complete local "
        f"folder nor in the Hugging Face cache ({why}). To fix: for a tiny model under "
        "resources/models/tiny-<arch>, build it with the workflow's build_tiny_model rule "
        f"(snakemake {ref.id}); for hub weights, run `hf download {ref.id} "
        f"--revision {revision}` on a machine with network and make that Hugging Face cache "
        "visible here (HF_HOME)."
    )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_vlm(
    ref: ModelRef,
    *,
    device: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load processor and model for generation; the same path for hub weights and tiny models."""
    device = device or default_device()
    try:
        processor = AutoProcessor.from_pretrained(ref.id, revision=ref.revision)
        if min_pixels is not None or max_pixels is not None:
            # Pixel limits are constructor arguments of the Qwen2-VL image processor (it folds them
            # into `size`). Given to AutoProcessor instead, they would also land in the tokenizer's
            # init kwargs and be re-sent on every call through a deprecated per-call path.
            processor.image_processor = AutoImageProcessor.from_pretrained(
                ref.id, revision=ref.revision, min_pixels=min_pixels, max_pixels=max_pixels
            )
        model = AutoModelForImageTextToText.from_pretrained(
            ref.id,
            revision=ref.revision,
            dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32,
        )
    except OSError as err:
        raise unavailable_error(ref, err) from err
    # Generation appends on the right, so batched prompts must be padded on the left.
    processor.tokenizer.padding_side = "left"
    return model.to(device).eval(), processor


def chat_messages(prompt: str, system: str | None = None, image: bool = True) -> list[dict]:
    """One user turn (single-image unless ``image`` is False), optionally after a system turn."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    user = [{"type": "image"}] if image else []
    user.append({"type": "text", "text": prompt})
    return [*messages, {"role": "user", "content": user}]


def _chat_inputs(processor, images, prompts, system=None):
    """Tokenised chat prompts (with one image each, or text-only when ``images`` is None)."""
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    texts = [
        processor.apply_chat_template(
            chat_messages(prompt, system, image=images is not None),
            add_generation_prompt=True,
            tokenize=False,
        )
        for prompt in prompts
    ]
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


class Stopwatch:
    """Accumulated wall time of the blocks it times (``with watch: ...``): backends time the
    model's own calls with it, so a stage can tell model time from its own overhead."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self._start


def hf_generation_config(model: PreTrainedModel, decoding: Decoding, max_new_tokens: int):
    """A complete ``GenerationConfig``: only the checkpoint's token ids are inherited."""
    effective = decoding.effective()
    if not decoding.do_sample:
        effective["temperature"] = 1.0  # unused when greedy; Hugging Face wants it > 0
    own = model.generation_config
    return GenerationConfig(
        **effective,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        num_beams=1,
        no_repeat_ngram_size=0,
        bos_token_id=own.bos_token_id,
        eos_token_id=own.eos_token_id,
        pad_token_id=own.pad_token_id,
    )


def _sorted_groups(keys: list[tuple], batch_size: int) -> list[list[int]]:
    """Indices in ``keys`` order, cut into groups of at most ``batch_size`` that share the
    first key element (the token limit): similar lengths pad little, and one long request
    lengthens only its own group."""
    order = sorted(range(len(keys)), key=keys.__getitem__)
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) < batch_size and keys[groups[-1][0]][0] == keys[i][0]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def generate_texts(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    images: list[Image.Image] | None,
    prompts: list[str],
    *,
    max_new_tokens: int | Sequence[int],
    decoding: Decoding = GREEDY,
    batch_size: int | None = None,
    system: str | None = None,
    watch: Stopwatch | None = None,
) -> list[Generation]:
    """One generation per (image, prompt), in order, in batches of ``batch_size`` (all at
    once when None) sorted by length: token limit, then image pixels, then prompt length.

    ``max_new_tokens`` is one limit or one per request. ``images=None`` asks text-only
    questions (the refinement stage's LLM role). ``watch`` times ``model.generate`` alone (not
    the chat template, image processing or decoding)."""
    n = len(prompts)
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != n:
        raise ValueError(f"{len(limits)} token limits for {n} prompts")
    if images is not None and len(images) != n:
        raise ValueError(f"{len(images)} images but {n} prompts")
    keys = [
        (limits[i], 0 if images is None else images[i].width * images[i].height, len(prompts[i]))
        for i in range(n)
    ]
    results: list[Generation | None] = [None] * n
    for group in _sorted_groups(keys, batch_size or max(n, 1)):
        batch = _generate_batch(
            model,
            processor,
            None if images is None else [images[i] for i in group],
            [prompts[i] for i in group],
            hf_generation_config(model, decoding, limits[group[0]]),
            system,
            watch,
        )
        for i, generation in zip(group, batch, strict=True):
            results[i] = generation
    return results


def _generate_batch(model, processor, images, prompts, config, system, watch) -> list[Generation]:
    inputs = _chat_inputs(processor, images, prompts, system).to(model.device)
    with torch.inference_mode(), watch or contextlib.nullcontext():
        output = model.generate(**inputs, generation_config=config)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    # A sequence that holds no end token ran into the limit (finished ones are padded after it).
    eos = config.eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=output.device)
    ended = torch.isin(new_tokens, eos).any(dim=1).tolist()
    texts = processor.batch_decode(new_tokens, skip_special_tokens=True)
    return [
        Generation(text, "stop" if stop else "length")
        for text, stop in zip(texts, ended, strict=True)
    ]


def choice_probabilities(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    images: list[Image.Image],
    prompts: list[str],
    choices: tuple[str, ...],
    watch: Stopwatch | None = None,
) -> list[dict[str, float]]:
    """P(answer starts with each choice) per (image, prompt), not renormalised: what the
    choices leave of the distribution tells whether the model answers the question at all.

    One forward pass instead of generation: the next-token distribution after the assistant
    header is read at the first token of each choice ("yes", " yes", "Yes", ...), so a verdict
    never depends on parsing free text."""
    inputs = _chat_inputs(processor, images, prompts).to(model.device)
    with torch.inference_mode(), watch or contextlib.nullcontext():
        logits = model(**inputs).logits[:, -1, :].float()
    probs = logits.softmax(dim=-1)
    tokenizer = processor.tokenizer
    first_ids = {
        c: sorted(
            {
                tokenizer.encode(v, add_special_tokens=False)[0]
                for v in (c, " " + c, c.capitalize(), " " + c.capitalize())
            }
        )
        for c in choices
    }
    return [{c: float(row[ids].sum()) for c, ids in first_ids.items()} for row in probs]
