"""The demo's tiny OWLv2, trained on demo scenes of its own seed, finds the demo's regions."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hic import demo_world
from hic.demo_training_owlv2 import (
    HELD_OUT_STREAM,
    TRAIN_STREAM,
    DetectorRecipe,
    demo_scenes,
    held_out_recall,
    query_names,
    train_demo,
    train_detector,
)
from hic.tiny_models import build_tiny_owlv2
from hic.vocabulary import load_vocabulary

REPO = Path(__file__).resolve().parents[1]
VOCABULARY = {
    kind: load_vocabulary(REPO / "data" / "vocabulary" / f"{kind}.txt")
    for kind in ("things", "stuff")
}
NAMES = VOCABULARY["things"] + VOCABULARY["stuff"]
# A short run (well under a minute on one core): enough for the background bands and a start
# on the objects; the embedded default trains DetectorRecipe() in full.
SHORT = replace(DetectorRecipe(), scenes=400, steps=250, warmup=20)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("owlv2")
    return out, train_detector(out, NAMES, seed=0, recipe=SHORT, log=lambda _: None)


def test_training_scenes_are_not_the_demo_run_scenes():
    train = demo_scenes(TRAIN_STREAM, 0, 5)
    held_out = demo_scenes(HELD_OUT_STREAM, 0, 5)
    # write_world's streams for the demo seed: images, broken rows, benchmark
    rng, _, bench = (np.random.default_rng(s) for s in np.random.SeedSequence(0).spawn(3))
    demo = [demo_world.make_scene(rng, 192, 144) for _ in range(5)]
    benchmark = [demo_world.make_scene(bench, 192, 144) for _ in range(5)]
    seen = {s.texture_seed for s in train}
    assert seen.isdisjoint(s.texture_seed for s in held_out + demo + benchmark)


def test_queries_cover_the_demo_labels_and_caption_words():
    names = query_names(NAMES, demo_scenes(TRAIN_STREAM, 0, 50))
    assert names[: len(NAMES)] == NAMES
    assert set(demo_world.CLASSES) | set(demo_world.BANDS) <= set(names)
    # words of the demo's long captions that propose_regions would query, learned as negatives
    assert len(names) > len(NAMES)


def test_training_is_deterministic(tmp_path):
    tiny = replace(SHORT, scenes=32, steps=3, warmup=1)
    # through the workflow's entry, which reads the vocabulary files
    files = {kind: REPO / "data" / "vocabulary" / f"{kind}.txt" for kind in ("things", "stuff")}
    for name in ("a", "b"):
        train_demo(tmp_path / name, files, seed=0, recipe=tiny, log=lambda _: None)
    assert json.loads((tmp_path / "a" / "hic_model.json").read_text())["queries"] > len(NAMES)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_trained_detector_beats_the_random_one_through_propose_regions(trained, tmp_path):
    out, summary = trained
    assert summary["steps_done"] == SHORT.steps
    build_tiny_owlv2(tmp_path / "random")
    kwargs = {"n": 32, "select": {"max_regions": 7}}
    learned = held_out_recall(out, VOCABULARY, threshold=0.05, **kwargs)
    random = held_out_recall(tmp_path / "random", VOCABULARY, threshold=0.0, **kwargs)
    # measured at this budget: recall 0.19 vs 0.03, precision 0.38 vs 0.11, bands 0.39 vs 0
    assert learned["all"]["recall"] >= random["all"]["recall"] + 0.1
    assert learned["all"]["precision"] >= random["all"]["precision"] + 0.15
    assert learned["bg"]["recall"] >= 0.25 > random["bg"]["recall"]
