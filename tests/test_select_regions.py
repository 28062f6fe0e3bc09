import copy
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hic.boxes import clip_box, iou
from hic.region_tables import PROPOSAL_SCHEMA, SELECTED_SCHEMA
from hic.select_regions import (
    SelectSettings,
    match_regions,
    nms,
    recall_precision,
    select,
    select_shard,
)

W, H = 200, 100  # image area 20,000 px


def region(label, bbox, score=0.9, kind="foreground", source="detector"):
    return {
        "label": label,
        "bbox": list(bbox),
        "score": score,
        "source": source,
        "mask_area": None,
        "kind": kind,
    }


def labels(regions):
    return [r["label"] for r in regions]


# iou


def test_iou_identical_and_disjoint():
    assert iou([10, 10, 20, 30], [10, 10, 20, 30]) == 1.0
    assert iou([0, 0, 10, 10], [50, 50, 10, 10]) == 0.0


def test_iou_half_overlap_exact_value():
    # 10x10 boxes shifted by 5 px: intersection 50, union 150.
    assert iou([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(1 / 3)
    # Contained box: intersection 25, union 100.
    assert iou([0, 0, 10, 10], [0, 0, 5, 5]) == pytest.approx(0.25)


def test_iou_touching_edges_and_degenerate_boxes_are_zero():
    assert iou([0, 0, 10, 10], [10, 0, 10, 10]) == 0.0
    assert iou([0, 0, 10, 10], [0, 10, 10, 10]) == 0.0
    assert iou([0, 0, 0, 10], [0, 0, 0, 10]) == 0.0
    assert iou([0, 0, 10, -5], [0, 0, 10, 10]) == 0.0
    assert iou([0, 0, math.nan, 10], [0, 0, 10, 10]) == 0.0


def test_clip_box():
    assert clip_box([-10, -5, 50, 20], W, H) == [0.0, 0.0, 40.0, 15.0]
    assert clip_box([180, 90, 50, 50], W, H) == [180.0, 90.0, 20.0, 10.0]
    assert clip_box([250, 0, 10, 10], W, H) is None
    assert clip_box([0, 0, math.inf, 10], W, H) is None


# nms


def test_nms_keeps_best_of_overlapping_and_both_distant():
    weak = region("cat", [0, 0, 10, 10], score=0.4)
    strong = region("dog", [1, 0, 10, 10], score=0.8)
    far = region("car", [100, 50, 10, 10], score=0.1)
    assert nms([weak, strong, far], 0.5) == [strong, far]


def test_nms_runs_per_kind():
    obj = region("boat", [0, 0, 50, 50], score=0.9)
    bg = region("water", [0, 0, 50, 50], score=0.2, kind="background")
    bg_weaker = region("sea", [2, 2, 50, 50], score=0.1, kind="background")
    assert nms([obj, bg, bg_weaker], 0.5) == [obj, bg]


def test_nms_threshold_is_strict():
    a = region("a", [0, 0, 10, 10], score=0.9)
    b = region("b", [5, 0, 10, 10], score=0.8)  # IoU exactly 1/3
    assert nms([a, b], 1 / 3) == [a, b]
    assert nms([a, b], 0.3) == [a]


def test_nms_ties_prefer_larger_box_then_input_order():
    small = region("a", [0, 0, 10, 10], score=0.5)
    large = region("b", [0, 0, 11, 11], score=0.5)
    assert nms([small, large], 0.5) == [large]
    first = region("a", [0, 0, 10, 10], score=0.5)
    second = region("b", [0, 0, 10, 10], score=0.5)
    assert nms([first, second], 0.5) == [first]


def test_nms_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown region kind"):
        nms([region("a", [0, 0, 10, 10], kind="object")], 0.5)


# select: filters


def test_area_fraction_filter_bounds_are_inclusive():
    settings = SelectSettings(max_regions=10, background_slot=False)
    tiny = region("tiny", [0, 0, 10, 10])  # 0.5 %
    at_min = region("at_min", [20, 0, 20, 10])  # exactly 1 %
    nearly_all = region("nearly_all", [0, 0, 200, 96])  # 96 %
    at_max = region("at_max", [0, 0, 190, 100], kind="background")  # exactly 95 %
    chosen = select([tiny, at_min, nearly_all, at_max], W, H, settings)
    assert labels(chosen) == ["at_min", "at_max"]


def test_area_fraction_uses_clipped_box():
    # 100x100 boxes are 5 % of the image, but only their visible part counts: 10x5 is 0.25 %
    # (dropped), 20x10 is exactly 1 % (kept).
    outside = region("edge", [190, 95, 100, 100])
    assert select([outside], W, H, SelectSettings(min_area_fraction=0.01)) == []
    peeking = region("peek", [180, 90, 100, 100])
    (chosen,) = select([peeking], W, H, SelectSettings())
    assert chosen["bbox"] == [180.0, 90.0, 20.0, 10.0]


def test_score_filter_keeps_zero_and_tiny_scores_by_default():
    zero = region("zero", [0, 0, 50, 50], score=0.0)
    tiny = region("tiny", [100, 0, 50, 50], score=1e-19)
    negative = region("negative", [0, 50, 50, 50], score=-0.1)
    chosen = select([zero, tiny, negative], W, H, SelectSettings())
    assert labels(chosen) == ["tiny", "zero"]


def test_min_score_is_inclusive():
    settings = SelectSettings(min_score=0.3)
    kept = region("kept", [0, 0, 50, 50], score=0.3)
    dropped = region("dropped", [100, 0, 50, 50], score=0.29)
    assert labels(select([kept, dropped], W, H, settings)) == ["kept"]


def test_invalid_proposals_are_dropped():
    good = region("good", [0, 0, 50, 50])
    bad = [
        region("nan box", [math.nan, 0, 50, 50]),
        region("zero width", [0, 0, 0, 50]),
        region("negative height", [0, 0, 50, -5]),
        region("outside", [300, 0, 50, 50]),
        region("nan score", [0, 0, 50, 50], score=math.nan),
        region("   ", [0, 0, 50, 50]),
    ]
    assert labels(select([*bad, good], W, H, SelectSettings())) == ["good"]


# select: dedup, ranking, slots


def test_label_dedup_is_case_and_whitespace_insensitive_per_kind():
    settings = SelectSettings(max_regions=10)
    weak_dog = region("Dog", [0, 0, 40, 40], score=0.5)
    strong_dog = region("  dog ", [100, 0, 40, 40], score=0.8)
    hot_dog = region("hot  dog", [0, 50, 40, 40], score=0.4)
    hot_dog_again = region("Hot Dog", [100, 50, 40, 40], score=0.3)
    dog_bg = region("DOG", [0, 0, 200, 90], score=0.1, kind="background")
    chosen = select([weak_dog, strong_dog, hot_dog, hot_dog_again, dog_bg], W, H, settings)
    assert labels(chosen) == ["  dog ", "hot  dog", "DOG"]


def test_foreground_ranked_by_score_then_area():
    settings = SelectSettings(max_regions=10)
    small = region("small", [0, 0, 20, 20], score=0.5)
    large = region("large", [50, 0, 40, 40], score=0.5)
    best = region("best", [100, 0, 20, 20], score=0.9)
    chosen = select([small, large, best], W, H, settings)
    assert labels(chosen) == ["best", "large", "small"]
    assert [r["rank"] for r in chosen] == [0, 1, 2]


def test_background_ranked_by_score_times_area():
    settings = SelectSettings(max_regions=10)
    confident_sliver = region("sky", [0, 0, 200, 10], score=0.9, kind="background")  # 1,800
    broad = region("sea", [0, 20, 200, 70], score=0.5, kind="background")  # 7,000
    chosen = select([confident_sliver, broad], W, H, settings)
    assert labels(chosen) == ["sea", "sky"]


def test_background_with_zero_scores_prefers_largest():
    settings = SelectSettings(max_regions=1)
    small = region("road", [0, 0, 50, 50], score=0.0, kind="background")
    big = region("grass", [60, 0, 100, 100], score=0.0, kind="background")
    assert labels(select([small, big], W, H, settings)) == ["grass"]


def five_strong_foreground_one_weak_background():
    fg = [region(f"obj{i}", [40 * i, 0, 30, 30], score=0.9 - 0.1 * i) for i in range(5)]
    bg = region("lake", [0, 40, 200, 60], score=0.01, kind="background")
    return [*fg, bg]


def test_background_slot_reserved():
    chosen = select(five_strong_foreground_one_weak_background(), W, H, SelectSettings())
    assert labels(chosen) == ["obj0", "obj1", "lake"]
    assert [r["rank"] for r in chosen] == [0, 1, 2]


def test_without_background_slot_foreground_fills_all():
    settings = SelectSettings(background_slot=False)
    chosen = select(five_strong_foreground_one_weak_background(), W, H, settings)
    assert labels(chosen) == ["obj0", "obj1", "obj2"]


def test_background_fills_slots_foreground_leaves_empty():
    settings = SelectSettings(background_slot=False)
    man = region("man", [0, 0, 30, 30])
    sea = region("sea", [0, 40, 200, 60], score=0.5, kind="background")
    sky = region("sky", [0, 0, 200, 30], score=0.5, kind="background")
    assert labels(select([sky, man, sea], W, H, settings)) == ["man", "sea", "sky"]


def test_fewer_proposals_than_max_and_empty_input():
    only = region("cabin", [0, 0, 50, 50])
    assert labels(select([only], W, H, SelectSettings())) == ["cabin"]
    assert select([], W, H, SelectSettings()) == []


def test_max_regions_zero_selects_nothing():
    props = five_strong_foreground_one_weak_background()
    assert select(props, W, H, SelectSettings(max_regions=0)) == []


def test_output_is_copy_with_clipped_box_and_inputs_untouched():
    props = [
        region("artist", [-20, -10, 60, 50]),
        region("lake", [0, 50, 250, 80], kind="background"),
    ]
    before = copy.deepcopy(props)
    chosen = select(props, W, H, SelectSettings())
    assert props == before
    assert chosen[0]["bbox"] == [0.0, 0.0, 40.0, 40.0]
    assert chosen[1]["bbox"] == [0.0, 50.0, 200.0, 50.0]
    chosen[0]["bbox"][0] = 99.0  # the output must not share lists with the input
    chosen[1]["label"] = "pond"
    assert props == before
    assert {k: v for k, v in chosen[0].items() if k not in ("rank", "bbox")} == {
        k: v for k, v in props[0].items() if k != "bbox"
    }


def test_ties_are_deterministic_and_follow_input_order():
    # Identical scores and areas: the earlier proposal wins in NMS and in ranking.
    props = [region(f"r{i}", [40 * i, 0, 30, 30], score=0.5) for i in range(5)]
    props.append(region("r_overlap", [1, 0, 30, 30], score=0.5))
    settings = SelectSettings(background_slot=False)
    first = select(props, W, H, settings)
    assert labels(first) == ["r0", "r1", "r2"]
    assert select(props, W, H, settings) == first


def test_settings_and_image_size_validated():
    with pytest.raises(ValueError):
        SelectSettings(max_regions=-1)
    with pytest.raises(ValueError):
        SelectSettings(min_area_fraction=0.5, max_area_fraction=0.4)
    with pytest.raises(ValueError):
        SelectSettings(nms_iou=1.5)
    with pytest.raises(ValueError):
        select([], 0, 10, SelectSettings())


# evaluation


def test_match_regions_is_one_to_one():
    ref = [[0, 0, 10, 10]]
    two_predictions = [[0, 0, 10, 10], [1, 0, 10, 10]]
    assert match_regions(two_predictions, ref) == 1
    assert match_regions(ref, two_predictions) == 1


def test_match_regions_greedy_by_iou_and_threshold():
    ref = [[0, 0, 10, 10], [100, 0, 10, 10]]
    pred = [[1, 0, 10, 10], [100, 0, 10, 10], [50, 50, 10, 10]]
    assert match_regions(pred, ref) == 2
    # IoU of a 5 px shift is exactly 1/3: matches at threshold 1/3, not at 0.5.
    assert match_regions([[5, 0, 10, 10]], [[0, 0, 10, 10]], iou_threshold=1 / 3) == 1
    assert match_regions([[5, 0, 10, 10]], [[0, 0, 10, 10]]) == 0
    assert match_regions([], ref) == 0
    with pytest.raises(ValueError):
        match_regions(pred, ref, iou_threshold=0.0)


def test_match_regions_prefers_best_pair_first():
    # pred0 clears the threshold with both refs (0.67 with ref0, 1.0 with ref1); pred1 only with
    # ref0. Matching pred0 to its first ref would leave pred1 unmatched; best pair first does not.
    ref = [[0, 0, 10, 10], [2, 0, 10, 10]]
    pred = [[2, 0, 10, 10], [-2, 0, 10, 10]]
    assert match_regions(pred, ref) == 2


def test_recall_precision():
    assert recall_precision(2, 4, 5) == (0.4, 0.5)
    assert recall_precision(0, 0, 3) == (0.0, None)
    assert recall_precision(0, 3, 0) == (None, 0.0)
    assert recall_precision(0, 0, 0) == (None, None)
    with pytest.raises(ValueError):
        recall_precision(3, 2, 5)


# select_shard


def test_select_shard_selects_each_image_as_select_does(tmp_path):
    proposals = [
        {**region("dog", [10, 10, 50, 50], 0.9), "key": "a"},
        {**region("cat", [100, 10, 50, 50], 0.8), "key": "a"},
        {**region("sky", [0, 0, 200, 40], 0.5, kind="background"), "key": "a"},
        {**region("cup", [0, 0, 20, 20], 0.7), "key": "b"},
    ]
    pq.write_table(pa.Table.from_pylist(proposals, schema=PROPOSAL_SCHEMA), tmp_path / "p.parquet")
    size = {"width": W, "height": H, "original_width": W, "original_height": H}
    sizes = [{"key": k, **size} for k in ("a", "b", "c")]
    pq.write_table(pa.Table.from_pylist(sizes), tmp_path / "s.parquet")
    settings = SelectSettings(max_regions=2)
    summary = select_shard(
        tmp_path / "p.parquet", tmp_path / "s.parquet", tmp_path / "o.parquet", settings
    )
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    expected = select(proposals[:3], W, H, settings) + select(proposals[3:], W, H, settings)
    assert summary == {"images": 2, "regions": 3}
    assert [(r["key"], r["label"], r["rank"]) for r in rows] == [
        (r["key"], r["label"], r["rank"]) for r in expected
    ]
    assert pq.read_schema(tmp_path / "o.parquet") == SELECTED_SCHEMA
