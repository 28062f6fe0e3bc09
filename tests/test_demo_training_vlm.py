"""The demo VLM's training: data that matches each stage, and a run that learns every task."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hic import demo_world as dw
from hic.caption_scene import CaptionSettings
from hic.demo_training_vlm import (
    EVAL_STREAM,
    PROMPT_FILES,
    TRAIN_STREAM,
    Batches,
    VlmTrainSettings,
    answer_loss,
    build_model,
    held_out_scenes,
    scene_stream,
    train_demo,
    train_vlm,
)
from hic.demo_vlm_eval import evaluate_verification, held_out_losses, stage_backend
from hic.demo_vlm_examples import batch_inputs, long_target, stage_text
from hic.models import ModelRef, load_vlm
from hic.text import parse_caption
from hic.tiny_models import build_tiny_vlm
from hic.verify_labels import VerifySettings

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = {k: (ROOT / "prompts" / f).read_text() for k, f in PROMPT_FILES.items()}
# A run small enough for a test: a few dozen steps of small batches, one thread.
SMALL = VlmTrainSettings(
    vision_steps=20,
    object_batch=16,
    steps=40,
    scene_batch=4,
    verify_batch=4,
    correct_batch=4,
    region_batch=4,
    refine_batch=4,
    warmup=4,
    tokenizer_scenes=100,
)


@pytest.fixture(scope="module")
def small_model():
    return build_model(SMALL, PROMPTS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm")
    train_vlm(out, PROMPTS, SMALL, log=lambda _: None)
    return out


def test_training_scenes_are_not_the_demo_worlds():
    ours = next(scene_stream(0, TRAIN_STREAM, SMALL))
    theirs = [
        dw.make_scene(np.random.default_rng(s), SMALL.width, SMALL.height)
        for s in np.random.SeedSequence(0).spawn(4)
    ]
    assert all(ours != t for t in theirs)


def test_every_stage_prompt_is_required(tmp_path):
    with pytest.raises(ValueError, match="refine"):
        train_vlm(tmp_path, {k: v for k, v in PROMPTS.items() if k != "refine"}, SMALL)


def test_long_target_fits_the_stage_budget_and_parses(small_model):
    _, processor = small_model
    for scene in held_out_scenes(20, SMALL):
        text = long_target(scene, processor.tokenizer, SMALL.long_tokens)
        assert dw.long_caption(scene).startswith(text)
        assert len(processor.tokenizer(text)["input_ids"]) + 1 <= SMALL.long_tokens
        assert parse_caption(text, "long", (15, 120))[0] == text


def test_verdicts_are_one_token_each(small_model):
    # choice_probabilities reads P(yes) and P(no) at the answer's first token.
    tokenizer = small_model[1].tokenizer
    assert all(len(tokenizer(word)["input_ids"]) == 1 for word in ("yes", "no"))


def test_labels_cover_the_answer_and_its_end_token_only(small_model):
    _, processor = small_model
    scene = held_out_scenes(1, SMALL)[0]
    answer = dw.short_caption(scene)
    inputs = batch_inputs(
        processor,
        [stage_text(processor, PROMPTS["short"], answer), stage_text(processor, "Q?", "yes")],
        [dw.render(scene), dw.render(scene)],
    )
    for row, expected in zip(inputs["labels"], (answer, "yes"), strict=True):
        labelled = row[row != -100]
        assert processor.tokenizer.decode(labelled) == expected + "<|im_end|>"


def test_every_task_asks_what_its_stage_asks_and_labels_its_answer(small_model):
    _, processor = small_model
    tok = processor.tokenizer
    shown, tasks = Batches(processor, PROMPTS, SMALL).tasks(SMALL.long_every - 1)
    assert set(tasks) == {"long", "object", "verify", "correct", "region", "refine"}
    for task, batch in tasks.items():
        inputs = batch.inputs
        text = tok.decode(inputs["input_ids"][0])
        # Every stage's prompt has the template's system turn; the crop-naming aid has none.
        assert ("You are a helpful assistant." in text) == (task != "object")
        assert ("<|image_pad|>" in text) == (task != "refine")
        assert (batch.views is None) == (task in ("long", "object", "refine"))
        labels = inputs["labels"]
        answers = tok.batch_decode(
            torch.where(labels == -100, tok.pad_token_id, labels), skip_special_tokens=True
        )
        if task == "verify":  # balanced pairs: the true label, then a wrong one
            assert answers == ["yes", "no"] * SMALL.verify_batch
        if task == "refine":
            assert all(a.startswith('{"label": "') for a in answers)


def test_answer_loss_is_the_models_loss_with_visual_tokens_shared(small_model):
    model, processor = small_model
    shown, tasks = Batches(processor, PROMPTS, SMALL).tasks(0)
    pixels = processor.image_processor(shown.images, return_tensors="pt")
    with torch.inference_mode():
        features = model.get_image_features(
            pixels["pixel_values"], pixels["image_grid_thw"]
        ).pooler_output
        for batch in tasks.values():
            loss = float(model(**batch.inputs).loss)
            assert float(answer_loss(model, batch.inputs)) == pytest.approx(loss, rel=1e-4)
            if batch.views is not None:
                shared = [features[i] for i in batch.views]
                assert float(answer_loss(model, batch.inputs, shared)) == pytest.approx(
                    loss, rel=1e-4
                )


def test_training_is_deterministic(tmp_path):
    tiny = replace(
        SMALL, vision_steps=2, steps=2, object_batch=4, scene_batch=2, tokenizer_scenes=20
    )
    weights = []
    # through the workflow's entry, which reads the stages' prompt files
    files = {Path(f).stem: ROOT / "prompts" / f for f in PROMPT_FILES.values()}
    for name in ("a", "b"):
        train_demo(tmp_path / name, files, settings=tiny, log=lambda _: None)
        weights.append((tmp_path / name / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]


def test_trained_model_beats_the_untrained_one_on_every_task(trained):
    # Loaded by the stages' own path, at the stage's pixel limits.
    model, processor = load_vlm(
        ModelRef(str(trained)), device="cpu", min_pixels=3136, max_pixels=50176
    )
    untrained, _ = build_model(SMALL, PROMPTS)
    held_out = Batches(processor, PROMPTS, SMALL, stream=EVAL_STREAM)
    after = held_out_losses(model, held_out)
    before = held_out_losses(untrained.eval(), Batches(processor, PROMPTS, SMALL, EVAL_STREAM))
    assert set(after) == {"short", "object", "verify", "correct", "region", "refine"}
    # 40 steps: every task's loss well under the untrained model's 7.7.
    assert all(after[task] < 0.6 * before[task] for task in after), (after, before)


def test_trained_model_answers_the_verification_stage(trained, tmp_path):
    # Through verify_batch: the random model's P(yes) + P(no) is near zero, so every region
    # is unparsed; a short training answers them all, yes and no both.
    scenes = held_out_scenes(3, SMALL)
    build_tiny_vlm(tmp_path / "random")
    caption = CaptionSettings(max_pixels=50176)
    scores = {
        name: evaluate_verification(stage_backend(path, caption), PROMPTS, scenes, VerifySettings())
        for name, path in (("trained", trained), ("random", tmp_path / "random"))
    }
    assert scores["random"]["answered"] < 0.1
    assert scores["trained"]["answered"] > 0.9
