"""FLAIR (hic.methods.flair): sub-caption sampling, text-conditioned pooling, the
multi-positive sigmoid losses, training and resuming through train_clip, and its inference."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import write_clip_shard
from hic.evaluate_clip import embed_images, embed_texts, similarity
from hic.methods import method_for
from hic.methods.base import Context, parameter_counts
from hic.methods.flair import (
    TextConditionedPool,
    flair_loss,
    sample_subcaptions,
    split_sentences,
    text_choices,
)
from hic.train_clip import TrainSettings, train, write_job

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

TINY = {"arch": "HIC-Tiny-CLIP", "policy": "long", "method": "flair"}
CAPTION = "A red cup. It sits on a table! The table is oak? Light falls from the left.\nA cat."


def tiny(**options):
    torch.manual_seed(0)
    method = method_for(TrainSettings(**TINY, options=options))
    return method, method.build()


# ------------------------------------------------------------------ sub-captions
def test_subcaptions_merge_one_to_s_sentences_and_follow_the_rng():
    sentences = split_sentences(CAPTION)
    assert sentences == [
        "A red cup.",
        "It sits on a table!",
        "The table is oak?",
        "Light falls from the left.",
        "A cat.",
    ]
    assert split_sentences("Version 3.5 of e.g.x runs.") == ["Version 3.5 of e.g.x runs."]
    draws = [sample_subcaptions(CAPTION, 8, 3, random.Random(seed)) for seed in range(40)]
    assert draws[0] == sample_subcaptions(CAPTION, 8, 3, random.Random(0))
    assert draws[0] != draws[1]
    lengths, runs = set(), 0
    for caption in (c for draw in draws for c in draw):
        parts = split_sentences(caption)
        assert set(parts) <= set(sentences) and len(set(parts)) == len(parts)
        lengths.add(len(parts))
        at = [sentences.index(p) for p in parts]
        runs += len(parts) > 1 and at == list(range(at[0], at[0] + len(at)))
    assert lengths == {1, 2, 3}  # s ranges over 1..S and never beyond
    assert runs > 0  # consecutive runs are drawn (and random picks: the distinctness above)
    assert all(len(c) == 8 for c in draws)


def test_a_one_sentence_alt_text_gives_k_copies_and_an_empty_one_is_an_error():
    assert sample_subcaptions("a dog on grass", 4, 3, random.Random(1)) == ["a dog on grass"] * 4
    with pytest.raises(ValueError, match="no sentence"):
        sample_subcaptions(" \n ", 4, 3, random.Random(1))
    with pytest.raises(ValueError, match="num_captions >= 1"):
        method_for(TrainSettings(**TINY, options={"num_captions": 0}))


# ------------------------------------------------------------------ pooling
def test_the_pooling_is_multihead_attention_with_a_zero_slot_and_attends_to_the_text():
    torch.manual_seed(0)
    pool = TextConditionedPool(16, 4)
    queries, tokens = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    out, weights = pool(queries, tokens, weights=True)
    reference, ref_weights = pool.attn(
        pool.ln_q(queries), pool.ln_k(tokens), pool.ln_v(tokens), need_weights=True
    )
    assert torch.allclose(out, reference, atol=1e-5)
    assert torch.allclose(weights, ref_weights[..., :-1], atol=1e-6)  # last: the zero slot
    assert (weights.sum(-1) < 1).all()
    # Another text query gives another image embedding and other attention weights.
    other, other_weights = pool(queries.flip(1), tokens, weights=True)
    assert not torch.allclose(other[:, 0], out[:, 0], atol=1e-3)
    assert not torch.allclose(other_weights[:, 0], weights[:, 0], atol=1e-3)
    assert torch.allclose(other[:, 1], out[:, 1], atol=1e-6)  # the same query: the same


# ------------------------------------------------------------------ the loss
def test_each_image_is_pooled_with_its_k_texts_and_one_of_every_other_image():
    chosen = text_choices(torch.tensor([0, 2]), 4, 3, (0, 1))
    assert chosen.shape == (2, 4 + 3 - 1)
    assert chosen[0, :3].tolist() == [0, 1, 2] and chosen[1, :3].tolist() == [6, 7, 8]
    assert (chosen[0, 3:] // 3).tolist() == [1, 2, 3]
    assert (chosen[1, 3:] // 3).tolist() == [0, 1, 3]
    # A row's draw depends on (seed, row) alone: the same on any rank, new at every step.
    assert torch.equal(text_choices(torch.tensor([2]), 4, 3, (0, 1)), chosen[1:])
    steps = {tuple(text_choices(torch.tensor([0]), 9, 3, (0, s))[0].tolist()) for s in range(5)}
    assert len(steps) > 1


def _outputs(texts_of, b=4, k=3, d=16):
    """Outputs whose pooling ignores the text (each image's own embedding), so both losses
    depend on which texts point to which image."""
    images = F.normalize(torch.eye(b, d) + 0.01, dim=-1)
    texts = F.normalize(torch.stack([images[i] for i in texts_of]), dim=-1)
    return {
        "image_features": images,
        "image_tokens": images[:, None].expand(b, 2, d),
        "text_features": texts,
        "logit_scale": torch.tensor(10.0),
        "logit_bias": torch.tensor(-5.0),
        "pool": lambda q, tokens: tokens[:, :1].expand_as(q),
    }


def test_all_k_subcaptions_of_an_image_are_its_positives():
    def loss(texts_of):
        value, logs = flair_loss(_outputs(texts_of), 3, Context(), (0, 0))
        return value.item(), logs

    matched, logs = loss([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    assert matched == pytest.approx((logs["loss_tcs"] + logs["loss_mps"]) / 2)
    # The second and third text of each image are positives too: pointing them elsewhere
    # costs, in both losses.
    half, half_logs = loss([0, 1, 2, 1, 2, 3, 2, 3, 0, 3, 0, 1])
    assert matched < half
    assert logs["loss_tcs"] < half_logs["loss_tcs"] and logs["loss_mps"] < half_logs["loss_mps"]
    shuffled, _ = loss([1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0, 0])
    assert half < shuffled


# ------------------------------------------------------------------ training
def test_a_training_step_is_finite_and_reaches_every_part():
    method, model = tiny(num_captions=3)
    image = Image.new("RGB", (80, 60), "red")
    texts = ["A red cup. On a table.", "A blue kite", "Two dogs. They run. Grass."]
    items = [method.example(image, t, random.Random(i)) for i, t in enumerate(texts)]
    batch = torch.utils.data.default_collate(items)
    assert batch["text"].shape == (3, 3, 77)
    loss, logs = method.loss(model(**batch), Context())
    assert torch.isfinite(loss) and set(logs) == {"loss_tcs", "loss_mps"}
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    for part in (model.pool.attn.in_proj_weight, model.clip.logit_bias, model.visual.conv1.weight):
        assert part.grad.abs().sum() > 0
    assert parameter_counts(model)["frozen"] == 0


def test_the_paper_model_builds_on_the_meta_device():
    method = method_for(TrainSettings(**{**TINY, "arch": "ViT-B-16"}))
    model = method.build(device="meta", pretrained=False)
    counts = parameter_counts(model)
    # open_clip ViT-B-16 (149.6M) + the pooling layer (3 LayerNorms, 512-wide attention).
    assert counts["trainable"] == 150_674_434 and parameter_counts(model.pool)["total"] == 1_053_696


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 images in a download-style tar and their annotations (as tests/test_train_clip)."""
    samples = []
    for i, colour in enumerate(["red", "green", "blue", "yellow"] * 3):
        image = Image.new("RGB", (48, 32), colour)
        image.paste("black", (4 * i % 40, 0, 4 * i % 40 + 8, 16))
        square = {
            "label": "square",
            "bbox": [0.0, 0.0, 48.0, 32.0],
            "caption": f"A {colour} square.",
            "kind": "foreground",
            "score": 1.0,
        }
        long = f"A plain {colour} picture. A black bar at {i}. Nothing else."
        samples.append((image, f"A {colour} picture.", long, [square]))
    return write_clip_shard(tmp_path_factory.mktemp("flairdata"), samples, alt_texts=True)


SETTINGS = TrainSettings(
    arch="HIC-Tiny-CLIP",
    method="flair",
    options={"num_captions": 3},
    policy="hierarchical",
    epochs=2,
    batch_size=4,
    warmup=1,
    checkpoint_every=2,
    seed=3,
)


def test_resumed_training_matches_an_uninterrupted_run(data, tmp_path):
    whole = train(data, tmp_path / "whole", SETTINGS)
    assert whole["steps"] == 6
    part = train(data, tmp_path / "resumed", SETTINGS, max_steps=3)
    assert part["steps"] == 3 and not (tmp_path / "resumed/model.pt").exists()
    train(data, tmp_path / "resumed", SETTINGS)
    a = torch.load(tmp_path / "whole/model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed/model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("pool.") for k in a)
    init = tiny(num_captions=3)[1].state_dict()
    assert not torch.equal(a["pool.attn.in_proj_weight"], init["pool.attn.in_proj_weight"])


def test_two_ranks_under_torchrun_train_as_one_process(data, tmp_path):
    """torchrun, 2 CPU processes (gloo): texts are gathered, each rank pools its images with
    the whole batch's texts, and the loss and weights are those of one process."""
    settings = TrainSettings(**{**SETTINGS.__dict__, "epochs": 1})
    train(data, tmp_path / "one", settings)
    write_job(tmp_path / "job.json", data, tmp_path / "two", settings)
    env = {**os.environ, "PYTHONPATH": str(SCRIPTS), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", "-m", "hic.train_clip", str(tmp_path / "job.json")]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr

    def logged(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [[m["loss"], m["loss_tcs"], m["loss_mps"]] for m in map(json.loads, lines)]

    one, two = logged(tmp_path / "one"), logged(tmp_path / "two")
    assert len(one) == 3 and [v for r in two for v in r] == pytest.approx(
        [v for r in one for v in r], abs=1e-4
    )
    a = torch.load(tmp_path / "one/model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "two/model.pt", weights_only=False)["model"]
    for key in a:
        x, y = a[key], b[key]
        if key.endswith("attn.in_proj_bias"):
            # The key bias shifts every attention logit of a query alike: softmax cancels it,
            # its gradient is rounding noise, and AdamW at eps 1e-8 turns noise into steps.
            # Only the query and value thirds are determined by the data.
            q, _, v = x.chunk(3)
            q2, _, v2 = y.chunk(3)
            x, y = torch.cat([q, v]), torch.cat([q2, v2])
        assert torch.allclose(x, y, atol=1e-4), key


# ------------------------------------------------------------------ evaluation
def test_evaluation_scores_every_image_with_every_text(tmp_path):
    method, model = tiny()
    model.eval()
    paths = []
    for i, colour in enumerate(["red", "green", "blue"]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (70, 50), colour).save(paths[-1])
    images = embed_images(model, method, paths, batch_size=2)
    assert images.shape == (3, 1 + 8 * 8, 64)
    texts = embed_texts(model, method, ["a red square", "green", "blue. sky.", "a cat", "x"])
    scores = similarity(model, method, images, texts)
    assert scores.shape == (3, 5)
    # Blockwise scoring equals pooling each pair at once.
    with torch.no_grad():
        small = method.similarity(model, images, texts, pairs_per_block=2).numpy()
        pooled = model.pool(texts.expand(3, -1, -1), images[:, 1:])
        direct = (F.normalize(pooled, dim=-1) * texts).sum(-1)
    assert small == pytest.approx(scores, abs=1e-5)
    assert direct.numpy() == pytest.approx(scores, abs=1e-5)
    with torch.no_grad():
        classes = method.class_features(model, ["cat", "dog"])
    assert similarity(model, method, images, classes).shape == (3, 2)
    assert "text-conditioned" in method.protocol()["similarity"]
    glob, _ = tiny(inference="global")
    assert similarity(model, glob, images, texts) == pytest.approx(
        (F.normalize(images[:, 0], dim=-1) @ texts.T).numpy(), abs=1e-6
    )
