"""Train the demo's tiny Qwen2.5-VL on the demo world, so that scene captioning decides with
real signal (issue 14).

Trained from scratch on scene captions alone, the tiny model writes fluent captions with the
right background but guesses the objects: its vision tower, taught only through captions,
does not learn shapes. So the tower is taught to see first (``pretrain_vision``: object crops
classified by class and colour through a linear head used only there), and each caption step
also carries per-object supervision: the reference box of an object, cropped with some
context, asked for in a short prompt without a system turn (a few tokens, so it is cheap) and
answered "<Colour> <class>". The scene tasks are taught exactly as the stage asks them: the
stage's prompt files, the processor and chat template (its default system turn included), the
stage's pixel limits, and answers in the format ``hic.text.parse_caption`` accepts within the
stage's token budgets.

Scenes come from ``demo_world.make_scene`` with a generator of their own (``TRAIN_STREAM``),
never the demo URL list's or the benchmark's (those spawn from ``SeedSequence(seed)``), and
are rendered on the fly. Everything is seeded: on one CPU thread a run is deterministic.

Measured (bench/demo_vlm.py, 100 held-out scenes through the stage's code): every caption
``ok``, about half the objects' colours named, but their classes less often than naming the
three commonest classes would: in a CPU budget of minutes the 2-layer tower learns shapes
slowly (see bench/RESULTS.md).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    GenerationConfig,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    get_scheduler,
)

from hic import demo_world as dw
from hic.models import chat_messages
from hic.tiny_models import (
    scene_sentences,
    tiny_qwen2_5_vl_config,
    tiny_qwen2_5_vl_processor,
    train_qwen_tokenizer,
)

#: Entropy of the training scenes' generator, beside the run's seed: a list entropy that no
#: ``SeedSequence(seed)`` of the demo world (its URL list, noise, benchmark and classification
#: streams) can equal. Held-out evaluation scenes take the stream after it.
TRAIN_STREAM = 14_000_014
EVAL_STREAM = TRAIN_STREAM + 1
#: The per-object question: short, and asked without a system turn, so it costs a few tokens.
OBJECT_PROMPT = "What is this?"


@dataclass(frozen=True)
class VlmTrainSettings:
    """One training run of the demo VLM; every value that changes the weights."""

    seed: int = 0
    vision_steps: int = 1000  # the vision tower alone first (pretrain_vision)
    steps: int = 260
    # Per step: a batch of object crops and a batch of scene captions (short or long).
    object_batch: int = 48
    scene_batch: int = 16
    long_every: int = 4  # every fourth scene batch asks the long caption
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    # The demo world's images (config.yaml demo_world) and the stage's pixel limits.
    width: int = 192
    height: int = 144
    objects_per_image: tuple[int, int] = (2, 5)
    min_pixels: int = 3136
    max_pixels: int = 50176
    # The stage's long-caption token budget: the reference paragraph is cut at a sentence
    # boundary to fit it, with room for the end token.
    long_tokens: int = 96
    # Model sizes (the architecture stays Qwen2.5-VL's).
    text_hidden: int = 128
    text_layers: int = 2
    vision_hidden: int = 64
    vision_layers: int = 2
    patch_size: int = 14
    tokenizer_scenes: int = 1000
    crop_margin: tuple[float, float] = (0.1, 0.5)  # context around a box, of its size

    def record(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


# ---------------------------------------------------------------- data
def scene_stream(seed: int, stream: int, settings: VlmTrainSettings) -> Iterator[dw.Scene]:
    rng = np.random.default_rng([stream, seed])
    while True:
        yield dw.make_scene(rng, settings.width, settings.height, settings.objects_per_image)


def as_downloaded(scene: dw.Scene) -> Image.Image:
    """The scene as the stage reads it: rendered and stored as the demo world's JPEG."""
    buf = io.BytesIO()
    dw.render(scene).save(buf, "JPEG", quality=90)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def crop_object(image: Image.Image, bbox: Sequence[int], margin: float) -> Image.Image:
    x, y, w, h = bbox
    mx, my = round(margin * w), round(margin * h)
    box = (
        max(0, x - mx),
        max(0, y - my),
        min(image.width, x + w + mx),
        min(image.height, y + h + my),
    )
    return image.crop(box)


def long_target(scene: dw.Scene, tokenizer, budget: int) -> str:
    """The reference long caption's leading sentences that fit ``budget`` tokens (its end
    token included): the stage cuts an answer at its token limit and calls it truncated."""
    sentences = dw.long_caption(scene).split(". ")
    sentences = [s if s.endswith(".") else s + "." for s in sentences]
    kept = sentences[:1]
    for s in sentences[1:]:
        text = " ".join([*kept, s])
        if len(tokenizer(text)["input_ids"]) + 1 > budget:
            break
        kept.append(s)
    return " ".join(kept)


def tokenizer_corpus(settings: VlmTrainSettings) -> Iterator[str]:
    """The stock tiny corpus and the training scenes' captions: the demo's words become
    single tokens, so captions are short in tokens (a long caption fits the stage's budget)."""
    yield from scene_sentences()
    scenes = scene_stream(settings.seed, TRAIN_STREAM, settings)
    for scene in itertools.islice(scenes, settings.tokenizer_scenes):
        yield dw.short_caption(scene)
        yield dw.long_caption(scene)


def object_answer(o: dw.SceneObject) -> str:
    """ "Red ball": the colour capitalised as a caption starts, one token each for the demo."""
    return f"{o.colour.capitalize()} {o.label}"


def object_text(processor: ProcessorMixin, answer: str) -> str:
    """A user turn holding the crop and ``OBJECT_PROMPT``, then the answer: no system turn."""
    return (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        f"{OBJECT_PROMPT}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
    )


def stage_text(processor: ProcessorMixin, prompt: str, answer: str) -> str:
    """The stage's chat prompt (``hic.models.chat_messages`` through the processor's
    template, as ``generate_texts`` renders it), then the answer and its end token."""
    head = processor.apply_chat_template(
        chat_messages(prompt), add_generation_prompt=True, tokenize=False
    )
    return f"{head}{answer}<|im_end|>\n"


def batch_inputs(processor: ProcessorMixin, texts: list[str], images: list[Image.Image]) -> dict:
    """Right-padded inputs with labels on each answer and its end token only."""
    processor.tokenizer.padding_side = "right"
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    ids = inputs["input_ids"]
    tok = processor.tokenizer
    start = tok.convert_tokens_to_ids("<|im_start|>")
    head = len(tok("assistant\n")["input_ids"])
    labels = torch.full_like(ids, -100)
    for row in range(ids.shape[0]):
        first = int((ids[row] == start).nonzero()[-1]) + 1 + head
        last = int(inputs["attention_mask"][row].sum()) - 1  # the trailing newline: unlabelled
        labels[row, first:last] = ids[row, first:last]
    inputs["labels"] = labels
    return inputs


@dataclass
class Batches:
    """On-the-fly training batches from the training scene stream."""

    processor: ProcessorMixin
    prompts: dict[str, str]
    settings: VlmTrainSettings
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng([TRAIN_STREAM, self.settings.seed, 1])
        self.scenes = scene_stream(self.settings.seed, TRAIN_STREAM, self.settings)
        self.pending: list[tuple[Image.Image, dw.SceneObject]] = []

    def objects(self) -> dict:
        images, picked = self.crops()
        texts = [object_text(self.processor, object_answer(o)) for o in picked]
        return batch_inputs(self.processor, texts, images)

    def crops(self) -> tuple[list[Image.Image], list[dw.SceneObject]]:
        """``object_batch`` reference boxes with some context, from the next scenes."""
        n, lo, hi = self.settings.object_batch, *self.settings.crop_margin
        while len(self.pending) < n:
            scene = next(self.scenes)
            image = as_downloaded(scene)
            self.pending += [(image, o) for o in scene.objects]
        picked, self.pending = self.pending[:n], self.pending[n:]
        images = [crop_object(im, o.bbox, float(self.rng.uniform(lo, hi))) for im, o in picked]
        return images, [o for _, o in picked]

    def scene(self, kind: str) -> dict:
        scenes = list(itertools.islice(self.scenes, self.settings.scene_batch))
        tok = self.processor.tokenizer
        if kind == "short":
            answers = [dw.short_caption(s) for s in scenes]
        else:
            answers = [long_target(s, tok, self.settings.long_tokens) for s in scenes]
        texts = [stage_text(self.processor, self.prompts[kind], a) for a in answers]
        return batch_inputs(self.processor, texts, [as_downloaded(s) for s in scenes])


# ---------------------------------------------------------------- vision first
CLASS_IDS = {label: i for i, label in enumerate(dw.CLASSES)}
COLOUR_IDS = {colour: i for i, colour in enumerate(dw.COLOURS)}


def pretrain_vision(model, batches: Batches, steps: int, lr: float, log=print) -> list[dict]:
    """Teach the vision tower to see before it talks: object crops classified (class and
    colour) from the mean of their visual tokens by a linear head used only here, so the
    tower gets its gradient straight rather than through the language model's answers."""
    visual = model.model.visual
    head = torch.nn.Linear(visual.config.out_hidden_size, len(CLASS_IDS) + len(COLOUR_IDS))
    params = [*visual.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=steps // 10, num_training_steps=steps
    )
    n, history, hits = len(CLASS_IDS), [], []
    for step in range(steps):
        images, picked = batches.crops()
        inputs = batches.processor.image_processor(images, return_tensors="pt")
        features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        logits = head(torch.stack([f.mean(0) for f in features.pooler_output]))
        classes = torch.tensor([CLASS_IDS[o.label] for o in picked])
        colours = torch.tensor([COLOUR_IDS[o.colour] for o in picked])
        loss = torch.nn.functional.cross_entropy(logits[:, :n], classes)
        loss = loss + torch.nn.functional.cross_entropy(logits[:, n:], colours)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        hits.append(float((logits[:, :n].argmax(1) == classes).float().mean()))
        if step % 100 == 99 or step == steps - 1:
            recent = hits[-100:]
            record = {"vision_step": step, "loss": round(loss.item(), 4)}
            record["class_accuracy"] = round(sum(recent) / len(recent), 3)
            history.append(record)
            log(json.dumps(record))
    return history


# ---------------------------------------------------------------- model
def build_model(settings: VlmTrainSettings):
    """(model, processor): a fresh Qwen2.5-VL at the settings' sizes, its tokenizer learned
    on the stock tiny corpus plus training-scene captions."""
    tokenizer = train_qwen_tokenizer(tokenizer_corpus(settings))
    config = tiny_qwen2_5_vl_config(tokenizer)
    text, vision = config.text_config, config.vision_config
    head_dim = text.hidden_size // text.num_attention_heads
    text.hidden_size = settings.text_hidden
    text.intermediate_size = 2 * settings.text_hidden
    text.num_attention_heads = settings.text_hidden // head_dim
    text.num_hidden_layers = text.max_window_layers = settings.text_layers
    if hasattr(text, "layer_types"):
        text.layer_types = ["full_attention"] * settings.text_layers
    vision.hidden_size = settings.vision_hidden
    vision.intermediate_size = 2 * settings.vision_hidden
    vision.num_heads = settings.vision_hidden // 16
    vision.depth = settings.vision_layers
    vision.fullatt_block_indexes = [settings.vision_layers - 1]
    vision.out_hidden_size = settings.text_hidden
    vision.patch_size = settings.patch_size
    torch.manual_seed(settings.seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=[text.eos_token_id, text.pad_token_id],
        pad_token_id=text.pad_token_id,
    )
    processor = tiny_qwen2_5_vl_processor(tokenizer)
    for proc in (processor.image_processor, processor.video_processor):
        proc.patch_size = settings.patch_size
    return model, processor


def train_vlm(
    out_dir: Path, prompts: dict[str, str], settings: VlmTrainSettings, log=print
) -> dict:
    """Train and save the model with its processor to ``out_dir``; returns the run's record."""
    started = time.perf_counter()
    model, processor = build_model(settings)
    model.train()
    batches = Batches(processor, prompts, settings)
    vision = pretrain_vision(model, batches, settings.vision_steps, settings.lr, log)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=settings.lr,
    )
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=settings.warmup, num_training_steps=settings.steps
    )
    history = []
    for step in range(settings.steps):
        kind = "long" if step % settings.long_every == settings.long_every - 1 else "short"
        losses = {}
        tasks = [("object", batches.objects)] if settings.object_batch else []
        if settings.scene_batch:
            tasks.append((kind, lambda kind=kind: batches.scene(kind)))
        for task, make in tasks:
            loss = model(**make()).loss
            loss.backward()
            losses[task] = round(loss.item(), 4)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == settings.steps - 1:
            record = {"step": step, "seconds": round(time.perf_counter() - started, 1), **losses}
            history.append(record)
            log(json.dumps(record))
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    card = {
        "architecture": type(model).__name__,
        "kind": "trained on the demo world",
        "settings": settings.record(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / "hic_model.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return {**card, "history": vision + history}


# ---------------------------------------------------------------- evaluation
def held_out_loss(model, processor, prompts: dict[str, str], scenes, kind: str = "short") -> float:
    """The model's mean loss on the reference answers of ``scenes`` to the stage's prompt."""
    answers = [dw.short_caption(s) for s in scenes]
    texts = [stage_text(processor, prompts[kind], a) for a in answers]
    inputs = batch_inputs(processor, texts, [as_downloaded(s) for s in scenes])
    with torch.inference_mode():
        return float(model(**inputs).loss)


def held_out_scenes(n: int, settings: VlmTrainSettings) -> list[dw.Scene]:
    return list(itertools.islice(scene_stream(settings.seed, EVAL_STREAM, settings), n))


def evaluate_captions(
    model_dir: Path,
    prompts: dict[str, str],
    scenes: Sequence[dw.Scene],
    caption_settings: dict | None = None,
) -> dict:
    """Scene captions of held-out scenes through the stage's own code (its backend, prompts,
    budgets, judging) scored as ``dataset_stats`` scores a release against the reference."""
    from hic.caption_scene import CaptionSettings, caption_batch
    from hic.dataset_stats import scene_caption_scores
    from hic.models import ModelRef
    from hic.vlm import make_backend

    settings = CaptionSettings(**(caption_settings or {}))
    backend = make_backend(
        settings.backend,
        ModelRef(str(model_dir)),
        min_pixels=settings.min_pixels,
        max_pixels=settings.max_pixels,
        decoding=settings.decoding(),
        batch_size=settings.batch_size,
    )
    images = [(f"{i:04d}", as_downloaded(s)) for i, s in enumerate(scenes)]
    rows = []
    for k in range(0, len(images), 32):
        rows += caption_batch(backend, images[k : k + 32], prompts, settings, {})
    pairs = [
        (
            {"short_caption": r["short_caption"], "scene_status": r["status"]},
            {"short_caption": dw.short_caption(s), "regions": dw.regions(s)},
        )
        for r, s in zip(rows, scenes, strict=True)
    ]
    scores = scene_caption_scores(pairs, list(dw.COLOURS)).iloc[0].to_dict()
    statuses = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    # Objects the reference short caption names, and how many of them the model names.
    in_ref = named_in_ref = 0
    for r, s in zip(rows, scenes, strict=True):
        ref = dw.short_caption(s).lower()
        for o in s.objects:
            if f"{o.colour} {o.label}" in ref:
                in_ref += 1
                named_in_ref += (
                    bool(r["short_caption"])
                    and f"{o.colour} {o.label}" in r["short_caption"].lower()
                )
    scores |= {
        "status": statuses,
        "reference_objects": in_ref,
        "reference_objects_named_with_colour": named_in_ref,
        "examples": [
            (r["short_caption"], dw.short_caption(s))
            for r, s in zip(rows[:5], scenes[:5], strict=True)
        ],
        "long_examples": [r["long_caption"] or r["reason"] for r in rows[:2]],
    }
    return scores


def random_share(scenes: Sequence[dw.Scene]) -> float:
    """Objects named by always naming the three commonest classes of ``scenes``: guessing."""
    counts: dict[str, int] = {}
    for s in scenes:
        for o in s.objects:
            counts[o.label] = counts.get(o.label, 0) + 1
    top = sorted(counts, key=counts.get, reverse=True)[:3]
    total = sum(counts.values())
    return sum(counts[c] for c in top) / total if total else math.nan
