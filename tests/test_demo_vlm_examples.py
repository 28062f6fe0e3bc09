"""The demo VLM's region-task examples: asked as the stages ask, answered as they accept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hic import demo_vlm_examples as ex
from hic import demo_world as dw
from hic.caption_regions import RegionCaptionSettings, judge_caption, shape_caption
from hic.refine_regions import parse_refined, remove_box_phrases, split_label
from hic.region_images import draw_box
from hic.verify_labels import VerifySettings, parse_label

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = {
    "verify": (ROOT / "prompts" / "verify_label.txt").read_text(),
    "correct": (ROOT / "prompts" / "correct_label.txt").read_text(),
    "region": (ROOT / "prompts" / "region_caption.txt").read_text(),
    "refine": (ROOT / "prompts" / "region_refine.txt").read_text(),
}


def scenes(n: int, seed: int = 3) -> list[dw.Scene]:
    rng = np.random.default_rng(seed)
    return [dw.make_scene(rng, 192, 144) for _ in range(n)]


def test_the_box_is_the_region_stages_default():
    for stage in (VerifySettings(), RegionCaptionSettings()):
        assert (ex.Box().colour, ex.Box().width) == (stage.box_colour, stage.box_width)


def test_a_view_is_the_stored_image_with_the_box_drawn_as_the_stage_draws_it():
    scene = scenes(1)[0]
    image = dw.render(scene)
    region = dw.regions(scene)[0]
    view = ex.drawn_view(image, region, ex.Box())
    assert view.tobytes() == draw_box(image, region["bbox"], (1.0, 1.0), "red", 3).tobytes()
    assert view.tobytes() != image.tobytes()


def test_verification_pairs_ask_the_true_and_a_wrong_label_of_the_same_kind():
    rng = np.random.default_rng(0)
    for scene in scenes(20):
        for region in dw.regions(scene):
            wrong = ex.wrong_label(region, scene, rng, hard=0.5)
            names = dw.CLASSES if region["kind"] == "foreground" else dw.BANDS
            assert wrong != region["label"] and wrong in names
            yes, no = ex.verify_examples(None, region, wrong, PROMPTS["verify"], ex.Box())
            assert (yes.answer, no.answer) == ("yes", "no")
            assert f'"{region["label"]}"' in yes.prompt and f'"{wrong}"' in no.prompt
            assert "{" not in yes.prompt
            correction = ex.correct_example(None, region, wrong, PROMPTS["correct"], ex.Box())
            assert parse_label(correction.answer, 4) == region["label"]


def test_hard_wrong_labels_are_shown_elsewhere_in_the_image():
    rng = np.random.default_rng(0)
    scene = next(s for s in scenes(20) if len({o.label for o in s.objects}) > 1)
    region = dw.regions(scene)[0]
    shown = {o.label for o in scene.objects}
    assert all(ex.wrong_label(region, scene, rng, hard=1.0) in shown for _ in range(20))


def test_region_caption_answers_are_ok_for_the_stage_and_keep_their_shape():
    settings = RegionCaptionSettings(max_new_tokens=48, words=[4, 60])  # config.yaml
    for scene in scenes(10):
        for region in dw.regions(scene):
            answer = ex.region_example(None, region, PROMPTS["region"], ex.Box()).answer
            caption, status, _ = judge_caption(answer, False, settings.words)
            assert status == "ok"
            assert shape_caption(caption, region["label"]) == answer


@pytest.mark.parametrize("seed", range(3))
def test_raw_captions_mention_the_box_and_refine_to_the_reference(seed):
    rng = np.random.default_rng(seed)
    mentioned = 0
    for scene in scenes(30, seed):
        for region in dw.regions(scene):
            raw = ex.raw_region_caption(region, rng, ex.Box())
            example = ex.refine_example(region, raw, PROMPTS["refine"])
            mentioned += raw != ex.region_caption_answer(region)
            # The stage's fallback removes the mention exactly: the clean caption is the
            # reference, and the reference JSON passes the LLM path's validator.
            assert remove_box_phrases(split_label(raw, region["label"])[1]) == region["caption"]
            refined, reason = parse_refined(example.answer, region["label"], raw)
            assert reason is None and refined == json.loads(example.answer)
            assert raw in example.prompt and example.image is None
    assert mentioned > 0.6 * sum(len(dw.regions(s)) for s in scenes(30, seed))
