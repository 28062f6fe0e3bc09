import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoModelForZeroShotObjectDetection,
    AutoProcessor,
)

from conftest import REPO, file_digests
from hic import models, tiny_models
from hic.decoding import Decoding
from hic.models import ModelRef, ModelUnavailableError


def scene(width: int, height: int, shade: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (shade, 255 - shade, 90))
    image.paste((20, 20, shade), (width // 4, height // 4, width // 2, height // 2))
    return image


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "tiny-qwen2_5_vl"
    tiny_models.build_tiny_vlm(out, seed=0)
    return out


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return models.load_vlm(ModelRef(str(tiny_dir)), device="cpu")


def test_model_ref_from_config():
    assert ModelRef.from_config({"id": "Qwen/Qwen2.5-VL-7B-Instruct", "revision": "abc"}) == (
        ModelRef("Qwen/Qwen2.5-VL-7B-Instruct", "abc")
    )
    assert ModelRef.from_config({"id": "resources/models/tiny"}).revision is None


def test_tiny_model_loads_through_the_auto_classes(tiny_dir):
    processor = AutoProcessor.from_pretrained(tiny_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert sum(p.stat().st_size for p in tiny_dir.iterdir()) < 5_000_000
    card = (tiny_dir / "hic_model.json").read_text()
    assert '"kind": "tiny random"' in card and '"seed": 0' in card


def test_chat_template_renders_qwen2_5_vl_format(loaded):
    _, processor = loaded
    rendered = processor.apply_chat_template(
        models.chat_messages("Describe the image."), add_generation_prompt=True, tokenize=False
    )
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "Describe the image.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = processor.apply_chat_template(
        models.chat_messages("Hi", system="Be brief."), tokenize=False
    )
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert not with_system.endswith("assistant\n")


def test_special_token_ids_agree_with_model_config(loaded):
    model, processor = loaded
    tokenizer, config = processor.tokenizer, model.config
    ids = {
        token: tokenizer.convert_tokens_to_ids(token) for token in tiny_models.QWEN_SPECIAL_TOKENS
    }
    # Contiguous after the learned vocabulary, in the real tokenizer's order.
    assert list(ids.values()) == list(range(ids["<|endoftext|>"], ids["<|endoftext|>"] + 14))
    more = [tokenizer.convert_tokens_to_ids(t) for t in tiny_models.QWEN_ADDED_TOKENS]
    assert more == list(range(ids["<|video_pad|>"] + 1, ids["<|video_pad|>"] + 9))
    # Not special, as in the real tokenizer: decoding keeps a tool call.
    call = tokenizer("<tool_call>x</tool_call>")["input_ids"]
    assert tokenizer.decode(call, skip_special_tokens=True) == "<tool_call>x</tool_call>"
    assert config.image_token_id == ids["<|image_pad|>"] == processor.image_token_id
    assert config.video_token_id == ids["<|video_pad|>"]
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.vision_end_token_id == ids["<|vision_end|>"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id
    assert config.text_config.vocab_size >= len(tokenizer)
    encoded = tokenizer("<|im_start|>user\n<|image_pad|>")["input_ids"]
    assert encoded[0] == ids["<|im_start|>"] and encoded[-1] == ids["<|image_pad|>"]


def test_tokenizer_is_a_byte_level_bpe_of_about_2000_tokens(loaded):
    tokenizer = loaded[1].tokenizer
    assert 1500 <= len(tokenizer) <= 2100
    text = "A small red car is parked next to the tall building, ünïcode 😀 included."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # Words of the built-in corpus are single tokens; unseen bytes still encode.
    assert len(tokenizer(" building")["input_ids"]) == 1
    assert tokenizer.padding_side == "left"


def test_generate_texts_batches_like_single_calls(loaded):
    model, processor = loaded
    images = [scene(64, 48, 10), scene(200, 120, 120), scene(90, 300, 240)]
    prompts = ["Describe the image.", "What objects are visible?", "Write a short caption."]
    # Different image token counts give different prompt lengths, so the batch is padded.
    grids = processor.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
    assert len({int(grid.prod()) for grid in grids}) == 3
    batch = models.generate_texts(model, processor, images, prompts, max_new_tokens=12)
    assert len(batch) == 3 and all(isinstance(g.text, str) and g.text for g in batch)
    singles = [
        models.generate_texts(model, processor, [image], [prompt], max_new_tokens=12)[0]
        for image, prompt in zip(images, prompts, strict=True)
    ]
    assert batch == singles
    assert models.generate_texts(model, processor, images, prompts, max_new_tokens=12) == batch


def test_choice_probabilities_are_first_token_mass_batched_like_single_calls(loaded):
    model, processor = loaded
    images = [scene(64, 48, 10), scene(200, 120, 120)]
    prompts = ["Is there a dog in the red box? Answer yes or no.", "Is this a cat?"]
    batch = models.choice_probabilities(model, processor, images, prompts, ("yes", "no"))
    singles = [
        models.choice_probabilities(model, processor, [image], [prompt], ("yes", "no"))[0]
        for image, prompt in zip(images, prompts, strict=True)
    ]
    for got, alone in zip(batch, singles, strict=True):
        assert set(got) == {"yes", "no"}
        assert all(0 < p for p in got.values()) and sum(got.values()) <= 1
        assert got == pytest.approx(alone, rel=1e-4)  # left padding changes nothing
    # A random model spreads its mass over the whole vocabulary: far from an answer.
    assert all(sum(p.values()) < 0.5 for p in batch)


def test_generate_texts_samples_and_checks_lengths(loaded):
    model, processor = loaded
    images, prompts = [scene(80, 80, 50)] * 2, ["Describe the image."] * 2
    torch.manual_seed(0)
    sampled = models.generate_texts(
        model,
        processor,
        images,
        prompts,
        max_new_tokens=8,
        decoding=Decoding(do_sample=True, temperature=1.5),
    )
    assert len(sampled) == 2
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        models.generate_texts(model, processor, images, prompts[:1], max_new_tokens=4)


def test_pixel_limits_bound_the_image_tokens(tiny_dir):
    _, processor = models.load_vlm(ModelRef(str(tiny_dir)), device="cpu", max_pixels=28 * 28 * 4)
    with warnings.catch_warnings():
        # Limits given at load time must not ride along on each call (a deprecated path).
        warnings.simplefilter("error")
        inputs = processor(text=["<|image_pad|>"], images=[scene(400, 300, 0)], return_tensors="pt")
    assert inputs["image_grid_thw"].prod().item() // 4 <= 4
    _, default = models.load_vlm(ModelRef(str(tiny_dir)), device="cpu")
    assert default.image_processor.size.longest_edge == tiny_models.TINY_MAX_PIXELS
    assert default.image_processor.size.shortest_edge == tiny_models.TINY_MIN_PIXELS


def test_build_is_reproducible_per_seed(tiny_dir, tmp_path):
    rng_state = torch.random.get_rng_state()
    tiny_models.build_tiny_vlm(tmp_path / "same", seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert file_digests(tmp_path / "same") == file_digests(tiny_dir)
    tiny_models.build_tiny_vlm(tmp_path / "other", seed=1)
    same, other = file_digests(tiny_dir), file_digests(tmp_path / "other")
    assert same["model.safetensors"] != other["model.safetensors"]
    assert same["tokenizer.json"] == other["tokenizer.json"]


def test_tokenizer_corpus_can_be_given():
    tokenizer = tiny_models.train_qwen_tokenizer(["zebra crossing"] * 50, vocab_size=300)
    assert len(tokenizer(" crossing")["input_ids"]) == 1
    assert tokenizer.convert_ids_to_tokens(len(tokenizer) - 1) == "<|file_sep|>"


@pytest.mark.parametrize("model_id", ["resources/models/tiny-missing", "Qwen/Not-A-Cached-Model"])
def test_missing_model_names_it_and_the_fix(model_id):
    with pytest.raises(ModelUnavailableError) as caught:
        models.load_vlm(ModelRef(model_id, "abc123"), device="cpu")
    message = str(caught.value)
    assert repr(model_id) in message
    assert f"hf download {model_id} --revision abc123" in message
    assert "build_tiny_model" in message


@pytest.fixture(scope="module")
def owlv2_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "tiny-owlv2"
    tiny_models.build_tiny_owlv2(out, seed=0)
    return out


def test_clip_tokenizer_matches_open_clip():
    from open_clip.tokenizer import SimpleTokenizer  # slow import, only here

    ours, theirs = tiny_models.clip_tokenizer(), SimpleTokenizer()
    texts = ["a photo of a cat", "Two RED double-decker buses, parked! wow !", "zebra crossing 42"]
    for text in texts:
        ids, expected = ours(text)["input_ids"], theirs(text, context_length=16)[0].tolist()
        # open_clip pads to the context length with 0; "!" inside a text stays a BPE token.
        assert expected == ids + [0] * (16 - len(ids))


def test_tiny_owlv2_detects_and_post_processes(owlv2_dir, tmp_path):
    processor = AutoProcessor.from_pretrained(owlv2_dir)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(owlv2_dir).eval()
    assert type(model).__name__ == "Owlv2ForObjectDetection"
    queries = [["a red car", "a dog"]]
    inputs = processor(text=queries, images=[scene(120, 80, 30)], return_tensors="pt")
    assert inputs["input_ids"].shape == (2, 16)
    with torch.inference_mode():
        outputs = model(**inputs)
        # Padding with the end token instead of the hub's "!" (id 0) changes nothing.
        zero_padded = torch.where(inputs["attention_mask"].bool(), inputs["input_ids"], 0)
        assert torch.equal(model(**{**inputs, "input_ids": zero_padded}).logits, outputs.logits)
    (result,) = processor.post_process_grounded_object_detection(
        outputs, threshold=0.0, target_sizes=[(80, 120)], text_labels=queries
    )
    # One box per 16x16 patch of the 64x64 input, each labelled with one of the two queries.
    assert result["boxes"].shape == (16, 4)
    assert set(result["text_labels"]) <= {"a red car", "a dog"}
    tiny_models.build_tiny_owlv2(tmp_path / "again", seed=0)
    assert file_digests(tmp_path / "again") == file_digests(owlv2_dir)


def test_paper_config_pins_every_hub_model():
    """A paper run must load the same weights next year: a 40-hex commit per hub model, or
    (SAM, published by URL) a checkpoint whose name carries the MD5 prefix load_sam checks."""
    models_section = yaml.safe_load((REPO / "configs/paper.yaml").read_text())["models"]
    assert set(models_section) == {"vlm", "detector", "sam"}
    for name, spec in models_section.items():
        pinned = re.fullmatch(r"[0-9a-f]{40}", str(spec.get("revision")))
        checked = re.search(r"_[0-9a-f]{6}\.pth$", spec.get("checkpoint", ""))
        assert pinned or checked, f"models.{name} ({spec['id']}) is not pinned"
