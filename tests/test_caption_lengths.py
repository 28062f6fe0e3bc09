"""Caption lengths as in the paper, in the prompts, the accepted ranges and the budgets.

The paper's samples: short captions of about 20-25 words, long captions of 120-175 words in
narrative paragraphs, region captions of 2-5 sentences and 50-90 words."""

from pathlib import Path

import pytest
import yaml

from hic.caption_regions import RegionCaptionSettings
from hic.caption_scene import CaptionSettings
from hic.text import parse_caption

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "schemas/config.schema.yaml").read_text())["properties"]
PAPER = yaml.safe_load((REPO / "configs/paper.yaml").read_text())
TOKENS_PER_WORD = 1.3  # Qwen's tokenizer on English captions, with a little headroom

# Written in the manner of the paper's samples (not copied from it).
SHORT = (
    "A young surfer in a black wetsuit rides a tall breaking wave on a white surfboard "
    "under a bright afternoon sky."
)
LONG = (
    "A young surfer in a black wetsuit rides a tall, curling wave on a white surfboard, "
    "crouching low with both arms stretched out for balance. The wave rises behind him in a "
    "deep turquoise wall, its crest breaking into white foam that sprays across the left side "
    "of the picture. Small droplets hang in the air around the board, catching the light of "
    "the late afternoon sun. Further out, the ocean is calmer and darker blue, with a few "
    "gentle swells rolling towards the shore. On the right, a second surfer sits on a yellow "
    "board, waiting for the next set. The horizon runs straight across the upper third of the "
    "image, where a pale sky with thin streaks of cloud meets the water. The scene feels "
    "energetic and bright, capturing a single moment of speed and balance on open water."
)
REGION = (
    "The surfer is a young man in a black full-length wetsuit, crouched low on a white "
    "surfboard with his knees bent and his arms spread wide for balance. He is near the centre "
    "of the image, riding along the face of a curling turquoise wave. Spray from the breaking "
    "crest falls just behind his back, and his wet hair is pushed back from his face."
)


def schema_defaults(section: str) -> dict:
    props = SCHEMA[section]["properties"]
    return {
        key: {k: v["default"] for k, v in spec["properties"].items()}
        if "properties" in spec
        else spec["default"]
        for key, spec in props.items()
        if key in ("max_new_tokens", "words")
    }


def test_samples_written_like_the_papers_have_the_papers_lengths():
    assert 20 <= len(SHORT.split()) <= 25
    assert 120 <= len(LONG.split()) <= 175
    assert 50 <= len(REGION.split()) <= 90 and REGION.count(". ") + 1 in range(2, 6)


def test_settings_defaults_are_the_schemas():
    scene, region = schema_defaults("caption_scene"), schema_defaults("caption_regions")
    assert CaptionSettings().words == scene["words"]
    assert CaptionSettings().max_new_tokens == scene["max_new_tokens"]
    assert RegionCaptionSettings().words == region["words"]
    assert RegionCaptionSettings().max_new_tokens == region["max_new_tokens"]


@pytest.mark.parametrize(
    ("kind", "text", "accepted"),
    [
        ("short", SHORT, True),
        ("short", "A surfer on a wave.", False),  # 5 words: an alt-text, not a caption
        ("long", LONG, True),
        ("long", SHORT, False),  # a 21-word "long" caption
        ("long", "A surfer rides a tall wave on a white board under a bright blue sky.", False),
        ("region", REGION, True),
        ("region", "Surfer. A man on a surfboard.", False),
    ],
)
def test_accepted_ranges_take_the_papers_lengths_and_reject_short_answers(kind, text, accepted):
    words = RegionCaptionSettings().words if kind == "region" else CaptionSettings().words[kind]
    caption, reason = parse_caption(text, kind, words)
    assert (caption is not None) == accepted, reason


@pytest.mark.parametrize("config", ["schema", "paper"])
def test_token_budgets_hold_the_longest_accepted_caption(config):
    scene, region = schema_defaults("caption_scene"), schema_defaults("caption_regions")
    refine = SCHEMA["refine_regions"]["properties"]["max_new_tokens"]["default"]
    if config == "paper":
        scene = {k: {**scene[k], **PAPER["caption_scene"].get(k, {})} for k in scene}
        region = {**region, **PAPER.get("caption_regions", {})}
        refine = PAPER.get("refine_regions", {}).get("max_new_tokens", refine)
    for kind in ("short", "long"):
        assert scene["max_new_tokens"][kind] >= TOKENS_PER_WORD * scene["words"][kind][1]
    assert region["max_new_tokens"] >= TOKENS_PER_WORD * region["words"][1]
    assert refine >= TOKENS_PER_WORD * region["words"][1] + 20  # the JSON around the caption


def test_prompts_ask_for_the_papers_lengths():
    prompts = {p.stem: p.read_text() for p in (REPO / "prompts").glob("*.txt")}
    assert "twenty to twenty-five words" in prompts["scene_short"]
    assert "120 to 175 words" in prompts["scene_long"] and "narrative" in prompts["scene_long"]
    assert "two to five sentences" in prompts["region_caption"]
    assert "50 to 90 words" in prompts["region_caption"]
