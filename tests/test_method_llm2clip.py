"""LLM2CLIP (hic.methods.llm2clip): stage 1 fine-tunes the LLM's LoRA on caption pairs, stage 2
trains the vision tower and adapter against the frozen LLM; on a tiny random Llama."""

import random

import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from conftest import write_clip_shard
from hic.evaluate_clip import embed_images, embed_texts, load_run, similarity
from hic.methods import method_for
from hic.methods.base import Context, parameter_counts
from hic.methods.llm2clip import (
    EOT,
    INSTRUCTIONS,
    LLAMA3_8B_CONFIG,
    LoraLinear,
    caption_views,
)
from hic.train_clip import TrainSettings, train

TINY = {"llm": "tiny-llama", "max_length": 48, "embed_dim": 32}
STAGE1 = {**TINY, "stage": "caption_contrastive"}
COLOURS = ["red", "green", "blue", "yellow"]


def settings(options, **kw):
    base = {"arch": "HIC-Tiny-CLIP", "policy": "long", "method": "llm2clip", "lr": 1e-3}
    return TrainSettings(**{**base, **kw}, options=options)


def run_settings(options):
    return settings(
        options, policy="hierarchical", epochs=2, batch_size=4, warmup=1, checkpoint_every=2
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 images in a download-style tar, annotations in the HIC release format (as in
    tests/test_train_clip.py), long captions of two sentences."""
    samples = []
    for i in range(12):
        colour = COLOURS[i % 4]
        image = Image.new("RGB", (48, 32), colour)
        image.paste("black", (4 * i % 40, 0, 4 * i % 40 + 8, 16))
        bar = {
            "label": "bar",
            "bbox": [0.0, 0.0, 48.0, 32.0],
            "caption": f"A black bar on {colour}.",
            "kind": "foreground",
            "score": 1.0,
        }
        long = f"A plain {colour} picture. A black bar sits at {4 * i}."
        samples.append((image, f"A {colour} picture.", long, [bar]))
    return write_clip_shard(tmp_path_factory.mktemp("llm2clip"), samples)


@pytest.fixture(scope="module")
def stage1_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    train(data, out, run_settings(STAGE1))
    return out


def batch_of(method, texts, seed=0):
    image = Image.new("RGB", (80, 60), "red")
    items = [method.example(image, t, random.Random(seed + i)) for i, t in enumerate(texts)]
    return torch.utils.data.default_collate(items)


TEXTS = [
    "A red cup stands on a table. A blue kite hangs above it.",
    "A dog runs on a beach.",
    "A man waits at a station. It rains. A train arrives.",
    "Two cats sleep on a sofa.",
]


# ------------------------------------------------------------------ text side
def test_one_caption_gives_a_short_and_a_long_caption_of_the_image():
    seen = set()
    for seed in range(20):
        query, doc, which = caption_views(TEXTS[2], random.Random(seed))
        short, long = (doc, query) if which else (query, doc)
        sentences = TEXTS[2].split(". ")
        assert short.rstrip(".") in [s.rstrip(".") for s in sentences]
        assert short not in long and len(long.split(". ")) == 2  # disjoint: the other two
        seen.add(which)
    assert seen == {0, 1}  # the query is the short or the long caption
    query, doc, _ = caption_views("  a dog on a beach ", random.Random(0))
    assert query == doc == "a dog on a beach"  # one sentence: its own positive (SimCSE)


def test_tokens_pool_the_caption_and_end_token_not_the_prompt():
    method = method_for(settings(STAGE1))
    method.build()
    tok = method.tokenizer
    t = method.tokens("a dog on a beach", INSTRUCTIONS[0])
    n = int(t["mask"].sum())
    ids = t["ids"][:n].tolist()
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.convert_tokens_to_ids(EOT)
    pooled = [i for i, e in zip(ids, t["embed"][:n].tolist(), strict=True) if e]
    assert tok.decode(pooled) == "a dog on a beach" + EOT
    assert INSTRUCTIONS[0] in tok.decode(ids)  # in the input, outside the pool
    assert t["mask"][n:].sum() == 0 and t["embed"][n:].sum() == 0 and len(t["ids"]) == 48
    long = method.tokens("word " * 200)
    assert long["mask"].all() and long["ids"][-1] == tok.convert_tokens_to_ids(EOT)
    with pytest.raises(ValueError, match="max_length 4 leaves no room"):
        short = method_for(settings({**STAGE1, "max_length": 4}))
        short.build()
        short.tokens("x")


def test_the_llm_attends_both_ways():
    method = method_for(settings(TINY))
    model = method.build().eval()
    a, b = method.tokens("a red cup on a table"), method.tokens("a red cup on a chair")
    ids = torch.stack([a["ids"], b["ids"]])
    with torch.no_grad():
        hidden = model.encoder.llm(
            input_ids=ids, attention_mask=torch.stack([a["mask"], b["mask"]])
        ).last_hidden_state
    # Only the last word differs: the first tokens see it only with bidirectional attention.
    assert not torch.allclose(hidden[0, :3], hidden[1, :3])
    # The embedding is the mean over the caption's tokens (embed_mask), not the prompt's.
    with torch.no_grad():
        pooled = model.encoder(ids[:1], a["mask"][None], a["embed"][None])
    assert torch.allclose(pooled[0], hidden[0][a["embed"].bool()].mean(0), atol=1e-6)


# ------------------------------------------------------------------ stage 1
def test_stage1_trains_the_lora_alone_with_the_caption_contrastive_loss():
    method = method_for(settings(STAGE1))
    torch.manual_seed(0)
    model = method.build().train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 2 * 7
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(method.parameter_groups(model, 0.0), lr=1e-2)
    batch = batch_of(method, TEXTS)
    outputs = model(**batch)
    loss, logs = method.loss(outputs, Context())
    # The loss by its definition: row i of 50 x cos(query, positives) should pick column i.
    q, d = outputs["query"].detach(), outputs["doc"].detach()
    rows = [
        -F.log_softmax(torch.stack([50 * F.cosine_similarity(q[i], d[j], 0) for j in range(4)]), 0)[
            i
        ]
        for i in range(4)
    ]
    assert loss.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-5)
    assert 0 <= logs["pair_accuracy"] <= 1
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any(".lora_B" in n for n in changed)  # B starts at zero: it moves first


def test_stage1_dropout_comes_from_the_batch_and_repeats():
    method = method_for(settings(STAGE1))
    torch.manual_seed(0)
    model = method.build().train()
    for p in model.parameters():  # B != 0, so that dropout reaches the output
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    batch = batch_of(method, ["a dog on a beach"] * 2)
    first = model(**batch)
    torch.manual_seed(123)  # the global RNG does not matter
    again = model(**batch)
    assert torch.equal(first["query"], again["query"])
    # One sentence: both views are the same text; dropout alone tells them apart.
    assert not torch.allclose(first["query"], first["doc"])


def test_a_stage1_run_cannot_be_evaluated_as_a_clip():
    method = method_for(settings(STAGE1))
    model = method.build()
    with pytest.raises(ValueError, match="caption_contrastive run trains the LLM alone"):
        method.text_features(model, ["a dog"])


# ------------------------------------------------------------------ stage 2
def test_stage2_trains_vision_and_adapter_against_the_frozen_llm():
    method = method_for(settings(TINY))
    torch.manual_seed(0)
    model = method.build().train()
    assert not model.encoder.training  # train() leaves the frozen LLM in eval mode
    assert not any(p.requires_grad for p in model.encoder.parameters())
    llm = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.") for n in trained)
    assert any(n.startswith("adapter.") for n in trained) and "logit_scale" in trained
    optimizer = torch.optim.AdamW(method.parameter_groups(model, 0.05), lr=1e-3)
    batch = batch_of(method, TEXTS)
    for _ in range(2):
        loss, _ = method.loss(model(**batch), Context())
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.encoder.parameters())
        optimizer.step()
    assert all(torch.equal(p, llm[n]) for n, p in model.encoder.named_parameters())
    assert not torch.equal(model.visual.proj, trained["visual.proj"])
    assert not torch.equal(model.adapter[-1].weight, trained["adapter.4.weight"])
    assert model.visual.proj.shape == (128, 32)  # a new projection to embed_dim


def test_stage2_merges_the_stage1_lora_and_saves_no_llm(stage1_run, tmp_path):
    saved = torch.load(stage1_run / "model.pt", weights_only=False)["model"]
    assert saved and all(".lora_" in k for k in saved)  # stage 1 saves its LoRA alone
    raw = method_for(settings(TINY)).build()
    method = method_for(settings({**TINY, "llm_checkpoint": str(stage1_run / "model.pt")}))
    model = method.build()
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    name = "llm.layers.1.mlp.down_proj"
    a, b = saved[f"encoder.{name}.lora_A"], saved[f"encoder.{name}.lora_B"]
    base = raw.encoder.get_submodule(name).weight
    assert torch.allclose(model.encoder.get_submodule(name).weight, base + 32 / 16 * b @ a)
    assert not torch.equal(b, torch.zeros_like(b))
    state = method.saved_state(model)
    assert state and not any(k.startswith("encoder.") for k in state)
    with pytest.raises(ValueError, match="not a caption_contrastive run"):
        torch.save({"model": state, "settings": {"options": TINY}}, tmp_path / "x.pt")
        method_for(settings({**TINY, "llm_checkpoint": str(tmp_path / "x.pt")})).build()


# ------------------------------------------------------------------ the loop
@pytest.mark.parametrize("options", [STAGE1, TINY], ids=["stage1", "stage2"])
def test_resumed_training_matches_an_uninterrupted_run(data, tmp_path, options):
    s = run_settings(options)
    whole = train(data, tmp_path / "whole", s)
    assert whole["steps"] == 6
    train(data, tmp_path / "resumed", s, max_steps=3)
    train(data, tmp_path / "resumed", s)
    a = torch.load(tmp_path / "whole/model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed/model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("encoder.") and ".lora_" not in k for k in a)


def test_evaluation_scores_images_against_texts(data, stage1_run, tmp_path):
    options = {**TINY, "llm_checkpoint": str(stage1_run / "model.pt")}
    train(data, tmp_path / "clip", run_settings(options))
    model, method, _ = load_run(tmp_path / "clip/model.pt")
    paths = []
    for i, colour in enumerate(COLOURS[:3]):
        Image.new("RGB", (70, 50), colour).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    images = embed_images(model, method, paths)
    texts = embed_texts(model, method, TEXTS + ["A green picture."])
    scores = similarity(model, method, images, texts)
    assert scores.shape == (3, 5)
    classes = method.class_features(model, ["dog", "cat"])
    assert similarity(model, method, images, classes).shape == (3, 2)
    assert torch.allclose(classes.norm(dim=-1), torch.ones(2))
    # The rebuilt model (LLM from its source + stage-1 LoRA, the rest from model.pt) is the
    # trained one: a fresh build without the checkpoint scores differently.
    fresh = method_for(settings(options)).build()
    assert not torch.allclose(
        method.image_features(fresh.eval(), torch.zeros(1, 3, 64, 64)),
        method.image_features(model, torch.zeros(1, 3, 64, 64)),
    )


def test_the_paper_configuration_builds_on_the_meta_device():
    paper = {"arch": "ViT-L-14", "pretrained": "openai", "policy": "long", "method": "llm2clip"}
    stage1 = method_for(TrainSettings(**paper, options={"stage": "caption_contrastive"}))
    counts = parameter_counts(stage1.build("meta", pretrained=False))
    assert counts["trainable"] == 41_943_040  # LoRA r 16 on Llama-3-8B's 7 projections
    c = LLAMA3_8B_CONFIG
    lm_head = c["vocab_size"] * c["hidden_size"]
    assert counts["frozen"] + lm_head == 8_030_261_248  # Llama-3-8B, 8.03B with its LM head
    stage2 = parameter_counts(method_for(TrainSettings(**paper)).build("meta", pretrained=False))
    assert stage2["frozen"] == counts["frozen"]
    adapter = 4 * (2 * 4096 * 8192 + 8192 + 4096 + 2 * 4096) + 2 * 4096 + 4096 * 1280 + 1280
    vision = 303_966_208 - 1024 * 768 + 1024 * 1280  # open_clip ViT-L/14, new 1280-d head
    assert stage2["trainable"] == adapter + vision + 1  # + the temperature
    eva = method_for(TrainSettings(**{**paper, "arch": "EVA02-L-14"})).build("meta", False)
    assert eva.visual.trunk.head.out_features == 1280
