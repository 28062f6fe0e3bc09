"""The demo VLM's training examples, each built as its stage asks it.

The chat text a stage renders (``stage_text``) with labels on the answer only
(``batch_inputs``), the region tasks as one (image, prompt, answer) per example, and what
each visual token of a drawn region shows (``cell_targets``, the vision tower's
training-only lesson).

``verify_labels`` and ``caption_regions`` show the region's box drawn on the image by
``region_images.draw_box`` and fill their prompt templates by ``region_images.fill``;
``refine_regions`` asks a text-only question built by its own ``build_prompt``. Each builder
here calls that same code with the stage's settings, so what the model learns is exactly what
it is asked. Answers are what each stage accepts: "yes"/"no" for the verdict (its first token
is scored), a lowercase name for a correction (``parse_label``), "<Label>. <caption>" for a
region caption (the prompt asks that opening), and the JSON object ``parse_refined`` takes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import ProcessorMixin

from hic import demo_world as dw
from hic.models import chat_messages
from hic.refine_regions import build_prompt
from hic.region_images import draw_box, fill

#: Class ids of the tower's head: the thing classes, then the bands.
CLASS_IDS = {name: i for i, name in enumerate([*dw.CLASSES, *dw.BANDS])}
COLOUR_IDS = {colour: i for i, colour in enumerate(dw.COLOURS)}


# ---------------------------------------------------------------- what a stage sees
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


def stage_text(processor: ProcessorMixin, prompt: str, answer: str, image: bool = True) -> str:
    """The stage's chat prompt (``hic.models.chat_messages`` through the processor's
    template, as ``generate_texts`` renders it), then the answer and its end token."""
    head = processor.apply_chat_template(
        chat_messages(prompt, image=image), add_generation_prompt=True, tokenize=False
    )
    return f"{head}{answer}<|im_end|>\n"


def batch_inputs(
    processor: ProcessorMixin, texts: list[str], images: list[Image.Image] | None
) -> dict:
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


def example_inputs(processor: ProcessorMixin, examples: list[ex.Example]) -> dict:
    """One batch of examples that all have an image, or all none."""
    text_only = examples[0].image is None
    texts = [stage_text(processor, e.prompt, e.answer, image=not text_only) for e in examples]
    return batch_inputs(processor, texts, None if text_only else [e.image for e in examples])


#: The per-object question of the crop-naming aid: short, and asked without a system turn, so
#: it costs a few tokens.
OBJECT_PROMPT = "What is this?"


def object_answer(o: dw.SceneObject) -> str:
    """ "Red ball": the colour capitalised as a caption starts, one token each for the demo."""
    return f"{o.colour.capitalize()} {o.label}"


def object_text(answer: str) -> str:
    """A user turn holding the crop and ``OBJECT_PROMPT``, then the answer: no system turn."""
    return (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        f"{OBJECT_PROMPT}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
    )


# ---------------------------------------------------------------- region tasks


@dataclass(frozen=True)
class Example:
    """One training example: the image (None for a text-only question), the user turn's text
    as the stage fills it, and the answer to learn."""

    image: Image.Image | None
    prompt: str
    answer: str


@dataclass(frozen=True)
class Box:
    """How the region stages draw a region's box (config ``verify_labels`` and
    ``caption_regions``: ``box_colour``, ``box_width``; the schema's defaults)."""

    colour: str = "red"
    width: int = 3


def drawn_view(image: Image.Image, region: dict, box: Box) -> Image.Image:
    """The stage's view of a region: its box drawn on the stored image. The demo world stores
    images at their original size, so the scale is one."""
    return draw_box(image, region["bbox"], (1.0, 1.0), box.colour, box.width)


def shown_elsewhere(region: dict, scene: dw.Scene) -> list[str]:
    """Names of the region's kind (thing classes, or bands) that the image shows outside
    the region, other than its own."""
    names = dw.CLASSES if region["kind"] == "foreground" else dw.BANDS
    shown = [o.label for o in scene.objects] + [scene.upper, scene.lower]
    return sorted({n for n in shown if n in names and n != region["label"]})


def wrong_label(region: dict, scene: dw.Scene, rng: np.random.Generator, hard: float) -> str:
    """A label that is not the region's: another thing class for an object, another band
    name for a band. With probability ``hard`` it is one that the same image shows elsewhere
    (when there is one), so a yes must come from inside the box, not from the whole image."""
    names = dw.CLASSES if region["kind"] == "foreground" else dw.BANDS
    elsewhere = shown_elsewhere(region, scene)
    pool = (
        elsewhere
        if elsewhere and rng.random() < hard
        else [n for n in names if n != region["label"]]
    )
    return pool[int(rng.integers(len(pool)))]


def verify_examples(view: Image.Image, region: dict, wrong: str, prompt: str, box: Box):
    """The same drawn region asked about its true label (yes) and a wrong one (no): a pair,
    so a batch is balanced and only the label tells the two apart."""
    return [
        Example(view, fill(prompt, label=label, colour=box.colour), answer)
        for label, answer in ((region["label"], "yes"), (wrong, "no"))
    ]


def correct_example(view: Image.Image, region: dict, wrong: str, prompt: str, box: Box):
    """A rejected label's correction: the region's true name, lowercase as ``parse_label``
    returns names."""
    return Example(view, fill(prompt, label=wrong, colour=box.colour), region["label"])


def region_caption_answer(region: dict) -> str:
    """The reference caption opened with "<Label>." as the region prompt asks."""
    return f"{region['label'].capitalize()}. {region['caption']}"


def region_example(view: Image.Image, region: dict, prompt: str, box: Box) -> Example:
    return Example(
        view, fill(prompt, label=region["label"], colour=box.colour), region_caption_answer(region)
    )


#: How a region captioner that saw the drawn box mentions it: phrases from the refinement
#: prompt's own list, with the words that attach them. ``refine_regions.remove_box_phrases``
#: removes each of them exactly (tests/test_demo_vlm_examples.py), so the clean caption is
#: the reference caption.
BOX_MENTIONS = (
    "within the {c} bounding box",
    "inside the {c} bounding box",
    "in the {c} bounding box",
    "inside the {c} border",
    "outlined by the {c} border",
    "marked by the {c} bounding box",
    "framed by a {c} border",
    "highlighted by the {c} bounding box",
    "within the bounding box",
    "inside the border",
)


def raw_region_caption(region: dict, rng: np.random.Generator, box: Box) -> str:
    """The region caption as ``caption_regions`` stores it ("<Label>. ..." opening), with the
    box mentioned the ways a VLM does: after the caption's first phrase, opening it ("Inside
    the red bounding box is ..."), as a closing sentence, or (one in four) not at all."""
    caption = region["caption"]
    form = int(rng.integers(4))
    if form == 0:
        head, rest = caption.split(",", 1)
        mention = BOX_MENTIONS[int(rng.integers(len(BOX_MENTIONS)))].format(c=box.colour)
        caption = f"{head} {mention},{rest}"
    elif form == 1:
        caption = f"Inside the {box.colour} bounding box is {caption[0].lower()}{caption[1:]}"
    elif form == 2:
        caption = f"{caption} The {box.colour} border surrounds it."
    return f"{region['label'].capitalize()}. {caption}"


def refine_answer(region: dict) -> str:
    """The JSON the refinement prompt asks for, spelled as its example: the label as given and
    the reference caption, which has no box mention and no label opening."""
    return json.dumps({"label": region["label"], "caption": region["caption"]})


def refine_example(region: dict, raw: str, template: str) -> Example:
    return Example(None, build_prompt(template, region["label"], raw), refine_answer(region))


# ---------------------------------------------------------------- the tower's lesson
def cell_targets(
    scene: dw.Scene, region: dict, rows: int, cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What each visual token shows (its cell of the image, rows x cols in raster order):
    the class id of the top-most object whose box covers a quarter of the cell, else of the
    band covering most of it; that object's colour id (-100 for a band); and the share of the
    cell inside the region's box."""
    h, w = scene.height, scene.width
    owner = np.where(np.arange(h)[:, None] < scene.split, 0, 1) * np.ones((1, w), int)
    for k, o in enumerate(scene.objects):  # drawing order: later objects cover earlier ones
        x, y, bw, bh = o.bbox
        owner[y : y + bh, x : x + bw] = 2 + k
    ys, xs = np.linspace(0, h, rows + 1), np.linspace(0, w, cols + 1)
    bands = (scene.upper, scene.lower)
    classes, colours, inside = [], [], []
    bx, by, bw, bh = region["bbox"]
    for r in range(rows):
        for c in range(cols):
            cell = owner[round(ys[r]) : round(ys[r + 1]), round(xs[c]) : round(xs[c + 1])]
            counts = np.bincount(cell.ravel(), minlength=2 + len(scene.objects))
            k = int(counts[2:].argmax()) if len(counts) > 2 else 0
            if len(counts) > 2 and counts[2 + k] >= cell.size / 4:
                o = scene.objects[k]
                classes.append(CLASS_IDS[o.label])
                colours.append(COLOUR_IDS[o.colour])
            else:
                classes.append(CLASS_IDS[bands[int(counts[1] > counts[0])]])
                colours.append(-100)
            across = max(0.0, min(bx + bw, xs[c + 1]) - max(bx, xs[c]))
            down = max(0.0, min(by + bh, ys[r + 1]) - max(by, ys[r]))
            inside.append(across * down / ((xs[c + 1] - xs[c]) * (ys[r + 1] - ys[r])))
    return np.array(classes), np.array(colours), np.array(inside, dtype=np.float32)
