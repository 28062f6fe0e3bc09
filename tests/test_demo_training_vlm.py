"""The demo VLM's training: data that matches the stage, and a run that learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hic import demo_world as dw
from hic.demo_training_vlm import (
    TRAIN_STREAM,
    Batches,
    VlmTrainSettings,
    batch_inputs,
    build_model,
    held_out_loss,
    held_out_scenes,
    long_target,
    object_answer,
    object_text,
    scene_stream,
    stage_text,
    train_vlm,
)
from hic.models import ModelRef, load_vlm
from hic.text import parse_caption

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = {k: (ROOT / "prompts" / f"scene_{k}.txt").read_text() for k in ("short", "long")}
# A run small enough for a test: a few dozen steps of small batches, one thread.
SMALL = VlmTrainSettings(
    vision_steps=20,
    steps=40,
    object_batch=8,
    scene_batch=8,
    long_every=4,
    warmup=4,
    tokenizer_scenes=100,
)


@pytest.fixture(scope="module")
def small_model():
    return build_model(SMALL)


def test_training_scenes_are_not_the_demo_worlds():
    ours = next(scene_stream(0, TRAIN_STREAM, SMALL))
    theirs = [
        dw.make_scene(np.random.default_rng(s), SMALL.width, SMALL.height)
        for s in np.random.SeedSequence(0).spawn(4)
    ]
    assert all(ours != t for t in theirs)


def test_long_target_fits_the_stage_budget_and_parses(small_model):
    _, processor = small_model
    for scene in held_out_scenes(20, SMALL):
        text = long_target(scene, processor.tokenizer, SMALL.long_tokens)
        assert dw.long_caption(scene).startswith(text)
        assert len(processor.tokenizer(text)["input_ids"]) + 1 <= SMALL.long_tokens
        assert parse_caption(text, "long", (15, 120))[0] == text


def test_labels_cover_the_answer_and_its_end_token_only(small_model):
    _, processor = small_model
    scene = held_out_scenes(1, SMALL)[0]
    answer = dw.short_caption(scene)
    crop = Batches(processor, PROMPTS, SMALL).crops()[0][0]
    inputs = batch_inputs(
        processor,
        [stage_text(processor, PROMPTS["short"], answer), object_text(processor, "Red ball")],
        [dw.render(scene), crop],
    )
    for row, expected in zip(inputs["labels"], (answer, "Red ball"), strict=True):
        labelled = row[row != -100]
        assert processor.tokenizer.decode(labelled) == expected + "<|im_end|>"


def test_object_answer_is_colour_and_class():
    o = held_out_scenes(1, SMALL)[0].objects[0]
    assert object_answer(o) == f"{o.colour.capitalize()} {o.label}"


def test_training_is_deterministic(tmp_path):
    tiny = VlmTrainSettings(
        vision_steps=2, steps=2, object_batch=4, scene_batch=2, tokenizer_scenes=20
    )
    weights = []
    for name in ("a", "b"):
        train_vlm(tmp_path / name, PROMPTS, tiny, log=lambda _: None)
        weights.append((tmp_path / name / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]


def test_trained_model_beats_the_untrained_one_on_held_out_scenes(tmp_path, small_model):
    train_vlm(tmp_path / "vlm", PROMPTS, SMALL, log=lambda _: None)
    # Loaded by the stages' own path, at the stage's pixel limits.
    trained, processor = load_vlm(
        ModelRef(str(tmp_path / "vlm")), device="cpu", min_pixels=3136, max_pixels=50176
    )
    untrained, _ = build_model(SMALL)
    scenes = held_out_scenes(8, SMALL)
    after = held_out_loss(trained, processor, PROMPTS, scenes)
    before = held_out_loss(untrained.eval(), processor, PROMPTS, scenes)
    # 40 steps: 3.2 against 7.7 (untrained: the same, so skipping training fails this).
    assert after < 0.6 * before
