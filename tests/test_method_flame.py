"""FLAME (hic.methods.flame) on a tiny random Mistral: frozen LLM text side, prompt facets and
their decoupled attention, multi-positive sigmoid loss, checkpoints without the LLM."""

import math
import random

import pytest
import torch
from PIL import Image
from test_train_clip import data  # noqa: F401  (the 12-image fixture)

from hic.evaluate_clip import embed_images, embed_texts, load_run, similarity
from hic.methods import method_for
from hic.methods.base import Context, parameter_counts
from hic.methods.flame import (
    FACETS,
    clean_caption,
    facet_attention,
    multi_positive_sigmoid_loss,
)
from hic.methods.flame_tiny import build_tiny_mistral
from hic.train_clip import TrainSettings, train


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-mistral")
    build_tiny_mistral(folder)
    return str(folder)


def settings(llm, **options):
    return TrainSettings(
        arch="HIC-Tiny-CLIP",
        policy="hierarchical",
        method="flame",
        options={"llm": llm, "layer": 1, "max_text_tokens": 32, **options},
        epochs=2,
        batch_size=4,
        warmup=1,
        checkpoint_every=2,
        seed=3,
    )


@pytest.fixture(scope="module")
def built(llm):
    method = method_for(settings(llm))
    torch.manual_seed(0)
    return method, method.build()


def test_captions_are_cleaned_and_wrapped_in_flames_prompt(built):
    method, _ = built
    assert clean_caption("a red cup") == "a red cup."
    assert clean_caption('a "red" cup?') == "a 'red' cup."
    assert clean_caption('she said "hi"') == "she said 'hi'"  # ends in a quote: no period
    prompts = method.prompts("long")
    tok = method.tokenizer
    shared = prompts.shared_ids("A red cup")
    assert shared[0] == tok.bos_token_id
    assert tok.decode(shared[1:]) == (
        'Detailed Image description : "A red cup." . After thinking step by step ,'
    )
    # <s>, then the seven facet prompts; each facet ends at its closing quote.
    assert prompts.facet_ids[0] == tok.bos_token_id
    assert tok.decode(prompts.facet_ids[1:]) == "".join(FACETS)
    ends = [tok.decode(prompts.facet_ids[e : e + 1]) for e in prompts.facet_ends]
    assert len(ends) == 7 and all(e.endswith('"') for e in ends)
    raw = method.prompts("raw")
    assert raw.facet_ids[0] != tok.bos_token_id and len(raw.facet_ends) == 1
    short = tok.decode(method.prompts("short").shared_ids("x")[1:])
    assert short.startswith('Image description : "x."')
    # Captions are cut to max_text_tokens (32) before templating.
    long_caption = " ".join(["red cup"] * 100)
    assert len(prompts.shared_ids(long_caption)) < len(prompts.shared_ids("x")) + 40


def test_a_facet_embedding_is_its_last_token_state_seeing_the_caption_not_other_facets(built):
    method, model = built
    prompts = method.prompts("long")
    shared = prompts.shared_ids("A wooden bench near a lake")
    ids, lengths = prompts.batch(["A wooden bench near a lake"])
    states = model.facet_states(ids, lengths)[0]  # (7, dim)
    facets, ends = prompts.facet_ids, prompts.facet_ends
    llm = model.llm
    for k in (0, 3, 6):
        # The caption's shared part, then facet k's own tokens alone, at the positions they
        # hold in the joint sequence, with a plain causal mask.
        start = 0 if k == 0 else ends[k - 1] + 1
        alone = shared + facets[start : ends[k] + 1]
        positions = list(range(len(shared))) + [len(shared) + i for i in range(start, ends[k] + 1)]
        with torch.no_grad():
            hidden = llm(
                input_ids=torch.tensor([alone]),
                position_ids=torch.tensor([positions]),
                output_hidden_states=True,
            ).hidden_states[1]
        assert torch.allclose(states[k], hidden[0, -1], atol=1e-5), k
    # The raw template is one plain prompt: its feature is the normalised last-token state.
    full = method.tokenizer(
        'Image description : "A wooden bench near a lake." . After thinking step by step ,'
        ' this image description means in just one word:"'
    )["input_ids"]
    with torch.no_grad():
        last = llm(input_ids=torch.tensor([full]), output_hidden_states=True).hidden_states[1]
        raw = method.prompt_features(model, ["A wooden bench near a lake"], "raw")
    assert torch.allclose(raw[0], torch.nn.functional.normalize(last[0, -1], dim=-1), atol=1e-5)


def test_the_mask_hides_padding_and_other_facets():
    mask, valid = facet_attention(torch.tensor([2, 3]), 3, [1, 3], torch.float32, "cpu")
    allowed = mask[:, 0] == 0
    # Row 0 has one pad; facets occupy 3..4 (facet 0) and 5..6 (facet 1).
    assert valid.tolist() == [[False] + [True] * 6, [True] * 7]
    # Row 0, facet 1's last token (index 6) sees the shared part (1, 2) and itself (5, 6) only.
    assert allowed[0, 6].tolist() == [False, True, True, False, False, True, True]
    assert allowed[1, 4].tolist() == [True, True, True, True, True, False, False]


def test_a_captions_text_feature_does_not_depend_on_its_batch(built):
    method, model = built
    short = "A red cup."
    with torch.no_grad():
        alone = method.text_features(model, [short])
        mixed = method.text_features(model, [" ".join(["A long green field."] * 6), short])
    assert torch.allclose(alone[0], mixed[1], atol=1e-5)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)


def test_multi_positive_sigmoid_loss_by_hand():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)  # 3 per image
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    expected = 0.0
    for i in range(2):
        for j in range(6):
            sign = 1.0 if j // 3 == i else -1.0
            logit = float(scale * image[i] @ text[j] + bias)
            expected -= math.log(1 / (1 + math.exp(-sign * logit)))
    got = multi_positive_sigmoid_loss(image, text, scale, bias)
    assert got.item() == pytest.approx(expected / 6, rel=1e-5)


def test_training_steps_move_the_image_side_and_never_the_llm(built, llm):
    method, _ = built
    torch.manual_seed(1)
    model = method.build()
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    image_before = model.visual.conv1.weight.clone()
    rng = random.Random(0)
    items = [
        method.example(Image.new("RGB", (80, 60), c), f"A {c} square. Nothing else.", rng)
        for c in ("red", "green", "blue", "yellow")
    ]
    batch = torch.utils.data.default_collate(items)
    assert batch["picks"].shape == (4, 6) and batch["picks"].max() < 7
    optimizer = torch.optim.AdamW(method.parameter_groups(model, 0.5), lr=1e-3)
    model.train()
    assert not model.llm.training
    for step in range(3):
        outputs = model(**batch)
        assert outputs["text_features"].shape == (4 * 6, model.llm.config.hidden_size)
        loss, logs = method.loss(outputs, Context())
        assert torch.isfinite(loss) and logs["logit_bias"] <= -9.9
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.llm.parameters())
        for name in ("visual.conv1.weight", "projector.0.weight", "logit_bias"):
            grad = model.get_parameter(name).grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
        optimizer.step()
        method.after_step(model, step, 3)
    assert not torch.equal(model.visual.conv1.weight, image_before)
    assert all(torch.equal(v, llm_before[k]) for k, v in model.llm.state_dict().items())
    counts = parameter_counts(model)
    assert counts["frozen"] == sum(p.numel() for p in model.llm.parameters())

    state = method.saved_state(model)
    assert not any(k.startswith("llm.") for k in state["trainable"])
    assert state["llm"] == {"llm": llm, "revision": None, "layer": 1}
    fresh = method.build().eval()
    method.load_saved(fresh, state)
    pixels = batch["image"]
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(pixels), model.eval().encode_image(pixels))
    other = method_for(settings(llm, layer=2))
    with pytest.raises(ValueError, match="trained with LLM"):
        other.load_saved(fresh, state)


def test_bad_options_are_named(llm):
    with pytest.raises(ValueError, match="7 positives from the 'short' template's 3 facets"):
        method_for(settings(llm, template="short", positives=7))
    with pytest.raises(ValueError, match="template='medium'"):
        method_for(settings(llm, template="medium"))
    with pytest.raises(ValueError, match="layer 5: .* decoder layers 1..2"):
        method_for(settings(llm, layer=5)).build()


def test_resumed_flame_training_matches_an_uninterrupted_run_and_evaluates(
    data,  # noqa: F811
    llm,
    tmp_path,
):
    s = settings(llm)
    whole = train(data, tmp_path / "whole", s)
    assert whole["steps"] == 6
    train(data, tmp_path / "resumed", s, max_steps=3)
    train(data, tmp_path / "resumed", s)
    a = torch.load(tmp_path / "whole/model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed/model.pt", weights_only=False)["model"]
    assert a["llm"] == b["llm"] and not any(k.startswith("llm.") for k in a["trainable"])
    assert a["trainable"].keys() == b["trainable"].keys()
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])

    model, method, _ = load_run(tmp_path / "whole/model.pt")
    paths = []
    for i, colour in enumerate(("red", "green", "blue")):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (70, 50), colour).save(paths[-1])
    images = embed_images(model, method, paths)
    texts = embed_texts(model, method, ["A red picture.", "A green one.", "Blue.", "A cat."])
    scores = similarity(model, method, images, texts)
    assert scores.shape == (3, 4)
    with torch.inference_mode():
        classes = method.class_features(model, ["red", "green"])
    assert classes.shape == (2, model.llm.config.hidden_size)
    assert similarity(model, method, images, classes).shape == (3, 2)
    assert "frozen" in method.protocol()["text_encoder"]


def test_the_paper_configuration_builds_on_the_meta_device(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    method = method_for(TrainSettings(arch="ViT-B-16", method="flame"))
    counts = parameter_counts(method.build("meta", pretrained=False))
    # Mistral-Nemo without its LM head: 40 x 272.64M + 671.09M embeddings + final norm.
    assert counts["frozen"] == 11_576_693_760
    # ViT-B/16 without ln_post/proj (85.8M) + projector 768->5120->5120 + LN, scale, bias.
    assert counts["trainable"] == 115_964_930
