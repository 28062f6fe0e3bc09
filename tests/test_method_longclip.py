"""Long-CLIP (hic.methods.longclip): kept positions, primary component matching, 248 tokens,
training, resuming and evaluation on the tiny architecture."""

import random

import pytest
import torch
from PIL import Image

from conftest import write_clip_shard
from hic.evaluate_clip import embed_images, embed_texts, load_run, similarity
from hic.methods import method_for
from hic.methods.base import Context, parameter_counts
from hic.methods.longclip import SmoothedClipLoss, first_sentence, pca_reconstruct
from hic.train_clip import TrainSettings, train

TINY = {"arch": "HIC-Tiny-CLIP", "policy": "long", "method": "longclip"}
COLOURS = ["red", "green", "blue", "yellow"]


def tiny(**options):
    method = method_for(TrainSettings(**TINY, options=options))
    torch.manual_seed(0)
    return method, method.build()


def picture(i):
    image = Image.new("RGB", (48, 32), COLOURS[i % 4])
    image.paste("black", (4 * i % 40, 0, 4 * i % 40 + 8, 16))
    return image


def batch_of(method, captions):
    items = [method.example(picture(i), c, random.Random(i)) for i, c in enumerate(captions)]
    return torch.utils.data.default_collate(items)


CAPTIONS = [f"A {c} picture. It shows a square at {i}. No more." for i, c in enumerate(COLOURS)]


def test_the_short_caption_is_the_first_sentence_as_long_clip_cuts_it():
    assert first_sentence("A red cup. On a table.\nIn a room.") == "A red cup"
    assert first_sentence("A red cup on a table.") == "A red cup on a table."  # alt-text
    assert first_sentence("Mr.Smith's cup. Red.") == "Mr.Smith's cup"
    method, _ = tiny()
    item = method.example(picture(0), CAPTIONS[0], random.Random(0))
    assert torch.equal(item["short_text"], method.tokenizer(["A red picture"])[0])
    assert torch.equal(item["text"], method.tokenizer([CAPTIONS[0]])[0])


def test_pca_keeps_the_top_k_components():
    torch.manual_seed(0)
    features = torch.randn(40, 64) @ torch.randn(64, 64)
    for k in (1, 8, 32):
        out = pca_reconstruct(features, k)
        mean = features.mean(0, keepdim=True)
        assert torch.linalg.matrix_rank(out - mean) == k
        # The residual is what the discarded components hold (Eckart-Young).
        s = torch.linalg.svdvals(features - mean)
        assert (features - out).norm() == pytest.approx(s[k:].norm().item(), rel=1e-3)
    # k at or above the batch's rank: nothing is discarded.
    assert torch.allclose(pca_reconstruct(features[:8], 32), features[:8], atol=1e-3)


def test_the_short_caption_is_matched_to_the_pca_features():
    method, model = tiny(pca_dim=2)
    batch = batch_of(method, CAPTIONS)
    out = model(**batch)
    loss, logs = method.loss(out, Context())
    # The short loss is the contrastive loss of the rank-2 image features and short captions.
    smoothed = SmoothedClipLoss(0.1)
    primary = pca_reconstruct(out["image_features"], 2)
    expected = smoothed(primary, out["short_text_features"], out["logit_scale"])
    assert logs["loss_short"] == pytest.approx(expected.item(), rel=1e-5)
    assert logs["loss_short"] != pytest.approx(
        smoothed(out["image_features"], out["short_text_features"], out["logit_scale"]).item()
    )
    assert loss.item() == pytest.approx(logs["loss_long"] + logs["loss_short"], rel=1e-5)
    # Other short captions change the short loss, not the long one.
    swapped = dict(batch, short_text=batch["short_text"].roll(1, 0))
    _, other = method.loss(model(**swapped), Context())
    assert other["loss_long"] == pytest.approx(logs["loss_long"])
    assert other["loss_short"] != pytest.approx(logs["loss_short"], rel=1e-3)
    # Long-CLIP smooths its labels: by hand, without smoothing, the long loss differs.
    labels = torch.arange(4)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    plain = (
        torch.nn.functional.cross_entropy(logits, labels)
        + torch.nn.functional.cross_entropy(logits.T, labels)
    ) / 2
    smooth = (
        torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
        + torch.nn.functional.cross_entropy(logits.T, labels, label_smoothing=0.1)
    ) / 2
    assert logs["loss_long"] == pytest.approx(smooth.item(), rel=1e-5)
    assert plain.item() != pytest.approx(smooth.item(), rel=1e-3)


def test_the_stretched_model_reads_248_tokens():
    method, model = tiny()
    assert model.context_length == 248
    assert model.clip.positional_embedding.shape == (248, 64)
    words = " ".join(["a red cup on a table"] * 60)
    tokens = method.tokenizer([words])
    assert tokens.shape == (1, 248) and tokens[0, -1] == tokens.max()  # truncated, EOT last
    # A token at position 200 changes the feature: positions past CLIP's 77 are read.
    late = tokens.clone()
    late[0, 200] = method.tokenizer(["banana"])[0, 1]
    with torch.no_grad():
        a, b = model.encode_text(torch.cat([tokens, late]), normalize=True)
    assert not torch.allclose(a, b, atol=1e-4)


def train_step(method, model, lr=1e-2):
    groups = method.parameter_groups(model, weight_decay=0.01)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    loss, logs = method.loss(model(**batch_of(method, CAPTIONS)), Context())
    loss.backward()
    optimizer.step()
    method.after_step(model, 0, 1)
    return loss, groups


def test_a_step_trains_everything_but_the_kept_positions():
    method, model = tiny()
    clip = model.clip
    before = clip.positional_embedding.detach().clone()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, groups = train_step(method, model)
    assert torch.isfinite(loss)
    kept = clip.parametrizations.positional_embedding[0].kept
    assert kept.shape == (20, 64) and not kept.requires_grad and kept.grad is None
    assert all(p is not kept for g in groups for p in g["params"])
    after = clip.positional_embedding.detach()
    assert torch.equal(after[:20], before[:20])  # what the text encoder reads at 0..19
    assert not torch.allclose(after[20:], before[20:])
    trained = clip.parametrizations.positional_embedding.original
    assert torch.count_nonzero(trained.grad[:20]) == 0  # masked, as Long-CLIP's mask1/mask2
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert torch.isfinite(param).all(), name
            assert not torch.equal(param, weights[name]), name
    # No clamp: Long-CLIP's temperature starts at log(100) and is free to move.
    assert model.logit_scale.item() != pytest.approx(4.6052, abs=1e-4)


def test_the_kept_positions_are_what_stretching_preserved():
    method, model = tiny()
    from hic.clip_model import create_long_clip

    torch.manual_seed(0)
    plain, *_ = create_long_clip("HIC-Tiny-CLIP", pretrained=None, keep=20, factor=4)
    assert torch.equal(model.clip.positional_embedding, plain.positional_embedding.detach())
    assert model.logit_scale.item() == pytest.approx(4.6052)
    _, native = tiny(logit_scale=None)
    assert native.logit_scale.item() == pytest.approx(plain.logit_scale.item())


def test_the_paper_model_builds_on_the_meta_device():
    settings = TrainSettings(
        arch="ViT-B-16-quickgelu", pretrained="openai", policy="long", method="longclip"
    )
    model = method_for(settings).build("meta", pretrained=False)
    counts = parameter_counts(model)
    # OpenAI CLIP ViT-B/16: 149,620,737; + 171 x 512 stretched positions; 20 x 512 kept.
    assert counts == {"trainable": 149_708_289, "frozen": 10_240, "total": 149_718_529}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 images in a download-style tar, their status table and two-sentence captions."""
    samples = [
        (
            picture(i),
            f"A {COLOURS[i % 4]} picture.",
            f"A {COLOURS[i % 4]} picture. A black square sits at {4 * i % 40}.",
            [],
        )
        for i in range(12)
    ]
    return write_clip_shard(tmp_path_factory.mktemp("longclip"), samples)


SETTINGS = TrainSettings(
    **TINY,
    options={"pca_dim": 2},
    epochs=2,
    batch_size=4,
    warmup=1,
    checkpoint_every=2,
    seed=3,
)


def test_resumed_training_matches_an_uninterrupted_run_and_evaluates(data, tmp_path):
    whole = train(data, tmp_path / "whole", SETTINGS)
    assert whole["steps"] == 6
    train(data, tmp_path / "resumed", SETTINGS, max_steps=3)
    assert not (tmp_path / "resumed/model.pt").exists()
    train(data, tmp_path / "resumed", SETTINGS)
    a = torch.load(tmp_path / "whole/model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed/model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kept = "clip.parametrizations.positional_embedding.0.kept"
    torch.manual_seed(SETTINGS.seed)  # as train() builds its model
    fresh = method_for(SETTINGS).build()
    assert torch.equal(a[kept], fresh.state_dict()[kept])  # six steps later, unmoved

    model, method, _ = load_run(tmp_path / "whole/model.pt")
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        picture(i).save(path)
    images = embed_images(model, method, paths)
    texts = embed_texts(model, method, CAPTIONS)
    scores = similarity(model, method, images, texts)
    assert scores.shape == (3, 4)
    with torch.no_grad():
        classes = method.class_features(model, ["cup", "kite"])
    assert classes.shape == (2, 64) and torch.isfinite(classes).all()
    assert similarity(model, method, images, classes).shape == (3, 2)
