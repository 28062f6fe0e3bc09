"""Train the demo's tiny Qwen2.5-VL on the demo world for every VLM stage of the workflow
(issue 14): scene captions, label verification and correction, region captions and their
refinement, so that each stage decides with real signal.

Each task is taught exactly as its stage asks it: the stage's prompt files, the processor and
chat template (its default system turn included), the stage's pixel limits, boxes drawn by
the stage's own drawing code, prompts filled by the stage's own functions, and answers in the
form the stage's parser or scorer accepts within its token budget (``hic.demo_vlm_examples``).

The vision tower learns to see first (``pretrain_vision``): object crops classified by class
and colour through a linear head used only in training. Its crops come from single-object
scenes: in the workflow's scenes objects overlap, so a crop often shows more of another object
than of its own, and that ambiguity halves how fast the tower learns shapes. Then each step
trains every task on a batch of its own: scene captions; one region of each of a few scenes
with its box drawn, asked for the verdict (true and wrong label, a balanced pair), the
correction and the region caption, all three reading one computation of its visual tokens;
the head's lesson on those tokens (what each shows, how much of it is in the box); the
scenes' objects cropped and named ("Red ball", how the language side learns colour and class
words); and the refinement, text only. A task's loss is taken on its answer tokens only, and
the language model head runs on those positions alone (most positions are prompt and image).

Scenes come from ``demo_world.make_scene`` with generators of their own (``TRAIN_STREAM``),
never the demo URL list's or the benchmark's (those spawn from ``SeedSequence(seed)``), and are
rendered on the fly. Everything is seeded: on one CPU thread a run is deterministic.

Measured held-out through each stage's code: bench/demo_vlm.py, bench/RESULTS.md.
"""

from __future__ import annotations

import itertools
import json
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
    Qwen2VLImageProcessor,
    get_scheduler,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from hic import demo_vlm_examples as ex
from hic import demo_world as dw
from hic.region_images import fill
from hic.tiny_models import (
    scene_sentences,
    tiny_qwen2_5_vl_config,
    tiny_qwen2_5_vl_processor,
    train_qwen_tokenizer,
)

#: Entropy of the training scenes' generator, beside the run's seed: a list entropy that no
#: ``SeedSequence(seed)`` of the demo world (its URL list, noise, benchmark and classification
#: streams) can equal. Held-out evaluation scenes take the stream after it; the vision tower's
#: single-object scenes the one after that.
TRAIN_STREAM = 14_000_014
EVAL_STREAM = TRAIN_STREAM + 1
VISION_STREAM = TRAIN_STREAM + 2
#: Prompt key -> the stage's prompt file under prompts/: the scene captions (caption_scene),
#: the verdict and the correction (verify_labels, under the keys it reads them by), the
#: region caption (caption_regions) and the refinement (refine_regions).
PROMPT_FILES = {
    "short": "scene_short.txt",
    "long": "scene_long.txt",
    "verify": "verify_label.txt",
    "correct": "correct_label.txt",
    "region": "region_caption.txt",
    "refine": "region_refine.txt",
}
#: Copies of each prompt in the tokenizer's corpus: enough that its words become tokens of
#: their own, as a real tokenizer's are, so a prompt costs tokens like a real model's.
PROMPT_COPIES = 100
#: The chat template's default system turn, which every stage's prompt carries.
SYSTEM_TURN = "You are a helpful assistant."


@dataclass(frozen=True)
class VlmTrainSettings:
    """One training run of the demo VLM; every value that changes the weights."""

    seed: int = 0
    # The vision tower alone first (pretrain_vision), on crops of single-object scenes.
    vision_steps: int = 400
    vision_lr: float = 1e-2
    object_batch: int = 48
    crop_margin: tuple[float, float] = (0.1, 0.5)  # context around a box, of its size
    # Then every task at once, each step a batch of each (0 leaves a task out).
    steps: int = 260
    scene_batch: int = 16  # scene captions, short or long
    long_every: int = 4  # every fourth scene batch asks the long caption
    refine_batch: int = 4
    # The region tasks share one set of drawn regions per step (the first n of them each),
    # whose visual tokens are computed once.
    verify_batch: int = 8  # regions, each asked with its true and a wrong label
    correct_batch: int = 8
    region_batch: int = 8
    # Objects of those regions' scenes cropped and named ("Red ball"; at most this many a
    # step): how the language side learns colour and class words from the tower.
    object_names: int = 24
    # Wrong labels that the image shows outside the box. Uniform ones (0) are what the
    # evaluation asks; the verdict's box-dependence is measured apart (reject_shown_elsewhere).
    hard_negatives: float = 0.0
    # The tower's head keeps teaching it on those regions' visual tokens: what each shows
    # and how much of it lies in the box (0: off).
    cell_weight: float = 1.0
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.01
    # The demo world's images (config.yaml demo_world), the stages' pixel limits and box.
    width: int = 192
    height: int = 144
    objects_per_image: tuple[int, int] = (2, 5)
    min_pixels: int = 3136
    max_pixels: int = 50176
    box_colour: str = "red"
    box_width: int = 3
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

    def record(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def box(self) -> ex.Box:
        return ex.Box(self.box_colour, self.box_width)


# ---------------------------------------------------------------- data
def scene_stream(
    seed: int, stream: int, settings: VlmTrainSettings, objects: tuple[int, int] | None = None
) -> Iterator[dw.Scene]:
    rng = np.random.default_rng([stream, seed])
    objects = objects or settings.objects_per_image
    while True:
        yield dw.make_scene(rng, settings.width, settings.height, objects)


def tokenizer_corpus(settings: VlmTrainSettings, prompts: dict[str, str]) -> Iterator[str]:
    """The stock tiny corpus, the training scenes' answers of every task and the stages'
    prompts: the demo's words become single tokens, so answers fit the stages' budgets."""
    yield from scene_sentences()
    scenes = scene_stream(settings.seed, TRAIN_STREAM, settings)
    for scene in itertools.islice(scenes, settings.tokenizer_scenes):
        yield dw.short_caption(scene)
        yield dw.long_caption(scene)
        for region in dw.regions(scene):
            yield ex.region_caption_answer(region)
            yield ex.refine_answer(region)
            yield from ("yes", "no", region["label"])  # a verdict is one token, as in Qwen's
    filled = [
        fill(prompts[k], colour=settings.box_colour, label="", caption="") for k in sorted(prompts)
    ]
    for _ in range(PROMPT_COPIES):
        yield from (SYSTEM_TURN, *filled)


@dataclass
class Batch:
    """One task's batch: model inputs, and for the region tasks the index of the step's drawn
    region each sequence shows (their visual tokens are computed once for all tasks)."""

    inputs: dict
    views: list[int] | None = None


@dataclass
class Shown:
    """The step's drawn regions: scene, reference region, the image with its box, and the
    image as stored (without it)."""

    scenes: list[dw.Scene]
    regions: list[dict]
    images: list[Image.Image]
    stored: list[Image.Image]


@dataclass
class Batches:
    """On-the-fly batches of every task from a scene stream (the training one by default)."""

    processor: ProcessorMixin
    prompts: dict[str, str]
    settings: VlmTrainSettings
    stream: int = TRAIN_STREAM  # EVAL_STREAM: held-out batches
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        seed = self.settings.seed
        self.rng = np.random.default_rng([self.stream, seed, 1])
        self.scenes = scene_stream(seed, self.stream, self.settings)
        self.single = scene_stream(seed, VISION_STREAM, self.settings, (1, 1))
        self.box = self.settings.box()

    def crops(self) -> tuple[list[Image.Image], list[dw.SceneObject]]:
        """``object_batch`` objects, each from a single-object scene, with some context."""
        lo, hi = self.settings.crop_margin
        scenes = list(itertools.islice(self.single, self.settings.object_batch))
        images = [
            ex.crop_object(dw.as_downloaded(s), s.objects[0].bbox, float(self.rng.uniform(lo, hi)))
            for s in scenes
        ]
        return images, [s.objects[0] for s in scenes]

    def scene(self, kind: str) -> Batch:
        scenes = list(itertools.islice(self.scenes, self.settings.scene_batch))
        tok = self.processor.tokenizer
        if kind == "short":
            answers = [dw.short_caption(s) for s in scenes]
        else:
            answers = [ex.long_target(s, tok, self.settings.long_tokens) for s in scenes]
        texts = [ex.stage_text(self.processor, self.prompts[kind], a) for a in answers]
        return Batch(ex.batch_inputs(self.processor, texts, [dw.as_downloaded(s) for s in scenes]))

    def refine(self) -> Batch:
        examples = []
        for scene in itertools.islice(self.scenes, self.settings.refine_batch):
            regions = dw.regions(scene)
            region = regions[int(self.rng.integers(len(regions)))]
            raw = ex.raw_region_caption(region, self.rng, self.box)
            examples.append(ex.refine_example(region, raw, self.prompts["refine"]))
        return Batch(ex.example_inputs(self.processor, examples))

    def shown(self) -> Shown:
        """One region of each of the next scenes with its box drawn, as the stages show it:
        a random one of the scene's objects and its two bands."""
        s = self.settings
        n = max(s.verify_batch, s.correct_batch, s.region_batch)
        scenes = list(itertools.islice(self.scenes, n))
        regions = []
        for scene in scenes:
            candidates = dw.regions(scene)
            regions.append(candidates[int(self.rng.integers(len(candidates)))])
        stored = [dw.as_downloaded(scene) for scene in scenes]
        images = [
            ex.drawn_view(image, region, self.box)
            for image, region in zip(stored, regions, strict=True)
        ]
        return Shown(scenes, regions, images, stored)

    def objects(self, shown: Shown) -> Batch:
        """The shown scenes' objects cropped with some context and named "<Colour> <class>"."""
        lo, hi = self.settings.crop_margin
        picked = [
            (im, o) for im, s in zip(shown.stored, shown.scenes, strict=True) for o in s.objects
        ]
        picked = picked[: self.settings.object_names]
        crops = [ex.crop_object(im, o.bbox, float(self.rng.uniform(lo, hi))) for im, o in picked]
        texts = [ex.object_text(ex.object_answer(o)) for _, o in picked]
        return Batch(ex.batch_inputs(self.processor, texts, crops))

    def region_tasks(self, shown: Shown) -> dict[str, Batch]:
        """Verification pairs, corrections and region captions of the shown regions."""
        s, prompts, box = self.settings, self.prompts, self.box
        drawn = list(zip(shown.scenes, shown.regions, shown.images, strict=True))
        wrong = [self.wrong(region, scene) for scene, region, _ in drawn]
        examples: dict[str, list[tuple[int, ex.Example]]] = {
            "verify": [
                (i, e)
                for i, (_, region, view) in enumerate(drawn[: s.verify_batch])
                for e in ex.verify_examples(view, region, wrong[i], prompts["verify"], box)
            ],
            "correct": [
                (i, ex.correct_example(view, region, wrong[i], prompts["correct"], box))
                for i, (_, region, view) in enumerate(drawn[: s.correct_batch])
            ],
            "region": [
                (i, ex.region_example(view, region, prompts["region"], box))
                for i, (_, region, view) in enumerate(drawn[: s.region_batch])
            ],
        }
        return {
            task: Batch(self.inputs([e for _, e in pairs]), [i for i, _ in pairs])
            for task, pairs in examples.items()
            if pairs
        }

    def inputs(self, examples: list[ex.Example]) -> dict:
        return ex.example_inputs(self.processor, examples)

    def wrong(self, region: dict, scene: dw.Scene) -> str:
        return ex.wrong_label(region, scene, self.rng, self.settings.hard_negatives)

    def tasks(self, step: int) -> tuple[Shown | None, dict[str, Batch]]:
        """The step's drawn regions (None when no region task is trained) and the batch of
        every task it trains."""
        s = self.settings
        kind = "long" if step % s.long_every == s.long_every - 1 else "short"
        batches = {kind: self.scene(kind)} if s.scene_batch else {}
        if s.refine_batch:
            batches["refine"] = self.refine()
        regions = max(s.verify_batch, s.correct_batch, s.region_batch)
        shown = self.shown() if regions else None
        if shown and s.object_names:
            batches["object"] = self.objects(shown)
        return shown, batches | (self.region_tasks(shown) if shown else {})


def answer_loss(model, inputs: dict, features: Sequence[torch.Tensor] | None = None):
    """The model's mean cross-entropy on the labelled tokens, as ``model(**inputs).loss``,
    with the language model head run on the labelled positions only. ``features``: each
    sequence's visual tokens computed before (shared by the tasks that show one image)."""
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    if features is not None:
        del rest["pixel_values"]
        rest["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    hidden = model.model(**rest).last_hidden_state
    targets = inputs["labels"][:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def cell_loss(head, features: Sequence[torch.Tensor], shown: Shown, grids) -> torch.Tensor:
    """The tower's lesson on the drawn regions: each visual token's class, colour and share
    inside the box, through the training-only head."""
    targets = [
        ex.cell_targets(scene, region, int(g[1]) // 2, int(g[2]) // 2)
        for scene, region, g in zip(shown.scenes, shown.regions, grids, strict=True)
    ]
    logits = head(torch.cat(list(features)))
    classes, colours, inside = (
        torch.from_numpy(np.concatenate(t)) for t in zip(*targets, strict=True)
    )
    n, f = len(ex.CLASS_IDS), torch.nn.functional
    loss = f.cross_entropy(logits[:, :n], classes)
    loss = loss + f.cross_entropy(logits[:, n:-1], colours, ignore_index=-100)
    return loss + f.binary_cross_entropy_with_logits(logits[:, -1], inside)


# ---------------------------------------------------------------- vision first
def vision_head(model) -> torch.nn.Linear:
    """The tower's training-only head on a visual token: class (things, then bands), colour,
    and whether it lies in the drawn box."""
    width = model.model.visual.config.out_hidden_size
    return torch.nn.Linear(width, len(ex.CLASS_IDS) + len(ex.COLOUR_IDS) + 1)


def pretrain_vision(model, head, batches: Batches, steps: int, lr: float, log=print) -> list[dict]:
    """Teach the vision tower to see before it talks: object crops classified (class and
    colour) from the mean of their visual tokens by ``head``, used only in training, so the
    tower gets its gradient straight rather than through the language model's answers."""
    params = [*model.model.visual.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=steps // 10, num_training_steps=steps
    )
    n, history, hits = len(ex.CLASS_IDS), [], []  # crops are things: bands are never right
    for step in range(steps):
        images, picked = batches.crops()
        inputs = batches.processor.image_processor(images, return_tensors="pt")
        features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        logits = head(torch.stack([f.mean(0) for f in features.pooler_output]))
        classes = torch.tensor([ex.CLASS_IDS[o.label] for o in picked])
        colours = torch.tensor([ex.COLOUR_IDS[o.colour] for o in picked])
        loss = torch.nn.functional.cross_entropy(logits[:, :n], classes)
        loss = loss + torch.nn.functional.cross_entropy(logits[:, n:-1], colours)
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
def build_model(settings: VlmTrainSettings, prompts: dict[str, str]):
    """(model, processor): a fresh Qwen2.5-VL at the settings' sizes, its tokenizer learned
    on the stock tiny corpus, the training scenes' answers and the stages' prompts."""
    tokenizer = train_qwen_tokenizer(tokenizer_corpus(settings, prompts))
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
    # The stages' pixel limits, which the saved processor then carries too.
    processor.image_processor = Qwen2VLImageProcessor(
        min_pixels=settings.min_pixels, max_pixels=settings.max_pixels
    )
    for proc in (processor.image_processor, processor.video_processor):
        proc.patch_size = settings.patch_size
    return model, processor


def train_step(model, head, batches: Batches, step: int) -> dict[str, float]:
    """Every task's loss on its batch of the step, back-propagated together; the drawn
    regions' visual tokens are computed once and shared by the region tasks."""
    shown, tasks = batches.tasks(step)
    losses = {}
    features = None
    if shown is not None:
        pixels = batches.processor.image_processor(shown.images, return_tensors="pt")
        grids = pixels["image_grid_thw"]
        features = model.get_image_features(pixels["pixel_values"], grids).pooler_output
        if batches.settings.cell_weight:
            cells = cell_loss(head, features, shown, grids)
            losses["cells"] = batches.settings.cell_weight * cells
    for task, batch in tasks.items():
        shared = None if batch.views is None else [features[i] for i in batch.views]
        losses[task] = answer_loss(model, batch.inputs, shared)
    sum(losses.values()).backward()
    return {task: round(loss.item(), 4) for task, loss in losses.items()}


def train_vlm(
    out_dir: Path, prompts: dict[str, str], settings: VlmTrainSettings, log=print
) -> dict:
    """Train and save the model with its processor to ``out_dir``; returns the run's record.

    ``prompts`` holds every stage's prompt text by the keys of ``PROMPT_FILES``."""
    if missing := sorted(set(PROMPT_FILES) - set(prompts)):
        raise ValueError(f"prompts missing for {missing}; expected keys {list(PROMPT_FILES)}")
    started, cpu = time.perf_counter(), time.process_time()
    model, processor = build_model(settings, prompts)
    model.train()
    batches = Batches(processor, prompts, settings)
    head = vision_head(model)
    vision = pretrain_vision(model, head, batches, settings.vision_steps, settings.vision_lr, log)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay + list(head.parameters()), "weight_decay": settings.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=settings.lr,
    )
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=settings.warmup, num_training_steps=settings.steps
    )
    history = []
    for step in range(settings.steps):
        losses = train_step(model, head, batches, step)
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
        "cpu_seconds": round(time.process_time() - cpu, 1),
    }
    (out_dir / "hic_model.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return {**card, "history": vision + history}


def held_out_scenes(n: int, settings: VlmTrainSettings) -> list[dw.Scene]:
    return list(itertools.islice(scene_stream(settings.seed, EVAL_STREAM, settings), n))


def train_demo(
    out_dir: Path,
    inputs: dict[str, Path],
    *,
    seed: int = 0,
    log=print,
    settings: VlmTrainSettings | None = None,
) -> dict:
    """The workflow's entry (train_demo_model): ``inputs`` holds the VLM stages' prompt files
    by their stem (``scene_short``...), taught as the stages ask them."""
    prompts = {key: inputs[Path(name).stem].read_text() for key, name in PROMPT_FILES.items()}
    settings = settings or VlmTrainSettings(seed=seed)
    return train_vlm(out_dir, prompts, settings, log=log)
