"""COSMOS (hic.methods.cosmos) on the tiny open_clip model: its EMA teacher, its image and text
crops, its cross-attention distillation, resume and evaluation."""

import json
import random

import pytest
import torch
from PIL import Image

from conftest import write_clip_shard
from hic.evaluate_clip import embed_images, embed_texts, similarity
from hic.methods import method_for
from hic.methods.base import Context, parameter_counts
from hic.methods.cosmos import (
    encode_image_tokens,
    encode_text_tokens,
    momentum_at,
    split_sentences,
    text_crops,
    trim,
)
from hic.train_clip import TrainSettings, train

# The demo's cheap multi-crop: 2 local image crops of 32 px on the 64-px model, 4 text crops.
TINY = {"local_crops": 2, "local_size": 32, "text_crops": 4}
CAPTION = "A red cup on a table. It has a handle. A spoon lies beside it. The wall is white."


def make(**options):
    settings = TrainSettings(
        arch="HIC-Tiny-CLIP", policy="long", method="cosmos", options={**TINY, **options}
    )
    method = method_for(settings)
    torch.manual_seed(0)
    return method, method.build()


def picture(i=0):
    image = Image.new("RGB", (80, 60), ["red", "green", "blue", "yellow"][i % 4])
    image.paste("black", (6 * i % 60, 0, 6 * i % 60 + 12, 20))
    return image


def batch_of(method, n=4, seed=0):
    items = []
    for i in range(n):
        torch.manual_seed(seed + i)
        items.append(method.example(picture(i), f"{CAPTION} Item {i}.", random.Random(seed + i)))
    return torch.utils.data.default_collate(items)


def test_crops_are_seeded_and_text_crops_are_sentence_subsets():
    method, _ = make()
    sentences = split_sentences(CAPTION)
    assert sentences == [
        "A red cup on a table",
        "It has a handle",
        "A spoon lies beside it",
        "The wall is white",
    ]

    def draw(seed):
        torch.manual_seed(seed)
        return method.example(picture(), CAPTION, random.Random(seed))

    a, b, c = draw(1), draw(1), draw(2)
    assert a["global_images"].shape == (2, 3, 64, 64)
    assert a["local_images"].shape == (2, 3, 32, 32)
    assert a["texts"].shape == (4, 248)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["global_images"], c["global_images"])
    assert not torch.equal(a["local_images"], c["local_images"])
    # The two global image crops are different views, not copies.
    assert not torch.equal(a["global_images"][0], a["global_images"][1])

    seen = set()
    for seed in range(20):
        crops = text_crops(CAPTION, 8, 5, random.Random(seed))
        assert len(crops) == 8
        for crop in crops[:2]:  # global: 1..4 distinct sentences of the caption
            parts = crop.split(". ")
            assert set(parts) <= set(sentences) and len(set(parts)) == len(parts)
            seen.add(len(parts))
        # local: single sentences, each sentence once before any repeats (4 of 6 distinct)
        assert set(crops[2:]) <= set(sentences) and len(set(crops[2:])) == 4
    assert seen == {1, 2, 3, 4}
    assert text_crops(CAPTION, 8, 5, random.Random(3)) == text_crops(
        CAPTION, 8, 5, random.Random(3)
    )
    # A one-sentence alt-text: every crop is that sentence.
    assert text_crops("a red cup", 8, 5, random.Random(0)) == ["a red cup"] * 8
    tokens = method.example(picture(), "a red cup", random.Random(0))["texts"]
    assert all(torch.equal(tokens[0], row) for row in tokens)


def test_the_encoders_match_open_clip_and_local_crops_resample_positions():
    method, model = make()
    clip = model.student.clip
    pixels = torch.randn(3, 3, 64, 64)
    full = method.tokenizer(["a cup", "a red cup on a table"])
    tokens = trim(full)
    assert tokens.shape == (2, 8)
    with torch.no_grad():
        pooled, patch = encode_image_tokens(clip.visual, pixels)
        assert torch.allclose(pooled, clip.encode_image(pixels), atol=1e-5)
        assert patch.shape == (3, 64, 128)  # 8 x 8 patches, vision width 128
        text, states = encode_text_tokens(clip, tokens)
        assert torch.allclose(text, clip.encode_text(full), atol=1e-5)
        assert states.shape == (2, tokens.shape[1], 64)
        crops = torch.randn(3, 3, 32, 32)
        small, small_patch = encode_image_tokens(clip.visual, crops)
        assert small.shape == (3, 64) and small_patch.shape == (3, 16, 128)
        # The 8 x 8 grid's positions, resampled to the local crop's 4 x 4, are used.
        clip.visual.positional_embedding.mul_(10)
        assert not torch.allclose(encode_image_tokens(clip.visual, crops)[0], small, atol=1e-3)


def test_distillation_trains_the_student_cross_attention_and_never_the_teacher():
    method, model = make()
    batch = batch_of(method)
    out = model(**batch)
    assert not out["teacher_image"].requires_grad and not out["teacher_text"].requires_grad
    clip_loss, distill = method.losses(out, Context())
    assert torch.isfinite(clip_loss) and torch.isfinite(distill) and distill > 0
    cross = [*model.student.image_cross.parameters(), *model.student.text_cross.parameters()]
    # The contrastive loss alone never reaches the cross-attention modules ...
    grads = torch.autograd.grad(clip_loss, cross, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)
    # ... the distillation loss does, and the distillation temperature.
    distill.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cross)
    assert model.student.distill_logit_scale.grad != 0
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())


def test_a_step_trains_every_student_parameter_and_the_teacher_follows_by_ema():
    method, model = make(momentum=0.9, momentum_schedule="cosine")
    assert all(
        torch.equal(s, t)
        for s, t in zip(model.student.parameters(), model.teacher.parameters(), strict=True)
    )
    optimizer = torch.optim.AdamW(method.parameter_groups(model, 0.2), lr=1e-3)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(
        list(model.student.parameters())
    )  # the teacher is not optimised
    loss, logs = method.loss(model(**batch_of(method)), Context())
    assert set(logs) == {"clip_loss", "distill_loss"}
    loss.backward()
    for name, param in model.student.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    old = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    optimizer.step()
    method.after_step(model, 3, 10)
    m = momentum_at(method.options, 3, 10)
    assert 0.9 < m < 1 and m == pytest.approx(1 - 0.5 * (1 + 0.5878) * 0.1, abs=1e-4)
    student = dict(model.student.named_parameters())
    moved = 0
    for name, param in model.teacher.named_parameters():
        expected = m * old[name] + (1 - m) * student[name].detach()
        assert torch.allclose(param, expected, atol=1e-6), name
        moved += not torch.equal(param, old[name])
        assert torch.isfinite(param).all()
    assert moved > 0.9 * len(student)
    assert momentum_at(make()[0].options, 7, 10) == 0.99  # the scripts' fixed momentum


def test_the_options_are_checked():
    with pytest.raises(ValueError, match="local_size 36 must be a multiple of the patch size 8"):
        make(local_size=36)
    with pytest.raises(ValueError, match="momentum_schedule 'linear'"):
        make(momentum_schedule="linear")
    with pytest.raises(ValueError, match="method 'cosmos' has no option.*'tau'"):
        make(tau=1)


def test_the_paper_model_builds_on_the_meta_device():
    settings = TrainSettings(arch="ViT-B-16", policy="long", method="cosmos")
    model = method_for(settings).build(device="meta", pretrained=False)
    counts = parameter_counts(model)
    # ViT-B/16 CLIP with 248 text positions, + token mappings and two 512-d cross-attentions.
    assert counts["trainable"] == counts["frozen"] == 152_470_018
    added = sum(p.numel() for n, p in model.student.named_parameters() if "clip." not in n)
    assert added == 2 * (4 * 512 * 512 + 4 * 512 + 2 * 1024) + 768 * 512 + 512 * 513 + 512 + 1


# ------------------------------------------------------------------ train() and evaluation
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 images in a download-style tar with long captions in the HIC release format."""
    samples = [(picture(i), f"Picture {i}.", f"{CAPTION} It is number {i}.", []) for i in range(8)]
    return write_clip_shard(tmp_path_factory.mktemp("cosmosdata"), samples, size=(80, 60))


SETTINGS = TrainSettings(
    arch="HIC-Tiny-CLIP",
    policy="long",
    method="cosmos",
    options={**TINY, "momentum_schedule": "cosine"},
    epochs=2,
    batch_size=4,
    warmup=1,
    checkpoint_every=1,
    seed=5,
)


def test_resumed_training_matches_an_uninterrupted_run_teacher_included(data, tmp_path):
    whole = train(data, tmp_path / "whole", SETTINGS)
    assert whole["steps"] == whole["total_steps"] == 4
    part = train(data, tmp_path / "resumed", SETTINGS, max_steps=1)
    assert part["steps"] == 1 and not (tmp_path / "resumed/model.pt").exists()
    train(data, tmp_path / "resumed", SETTINGS, workers=2)  # resumes at step 1, 2 workers
    a = torch.load(tmp_path / "whole/model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed/model.pt", weights_only=False)["model"]
    assert any(k.startswith("teacher.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(x) for x in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert all(m["distill_loss"] > 0 and m["clip_loss"] > 0 for m in logged)
    # The teacher trailed the student: neither equal to it nor to the initial weights.
    key = "clip.visual.conv1.weight"
    assert not torch.equal(a[f"student.{key}"], a[f"teacher.{key}"])
    _, fresh = make()
    assert not torch.equal(fresh.teacher.clip.visual.conv1.weight, a[f"teacher.{key}"])


def test_evaluation_scores_images_against_texts(tmp_path):
    method, model = make()
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        picture(i).save(paths[-1])
    texts = ["a red cup", "a green cup. It has a handle", "a blue cup", "a yellow kite"]
    model.eval()
    with torch.no_grad():
        images = embed_images(model, method, paths)
        embedded = embed_texts(model, method, texts)
        scores = similarity(model, method, images, embedded)
        classes = method.class_features(model, ["cup", "kite"])
    assert scores.shape == (3, 4) and torch.isfinite(torch.as_tensor(scores)).all()
    assert torch.allclose(embedded.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert classes.shape == (2, 64) and torch.isfinite(classes).all()
    assert method.protocol()["encoders"].startswith("COSMOS student")
    # inference: teacher scores with the teacher's encoders
    teacher, _ = make(inference="teacher")
    with torch.no_grad():
        model.teacher.clip.visual.conv1.weight.mul_(2)
        pixels = torch.randn(2, 3, 64, 64)
        own = teacher.image_features(model, pixels)
        assert torch.allclose(own, model.teacher.clip.encode_image(pixels, normalize=True))
        assert not torch.allclose(own, method.image_features(model, pixels))
