"""Tests for the embedded demo world (scene generator, texts, written files)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, UnidentifiedImageError

from hic import demo_world as dw

W, H = 96, 72


def url_key(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()[:16]


def write(out: Path, **overrides) -> dict:
    args = {"n_images": 12, "n_benchmark_pairs": 3, "width": W, "height": H, "seed": 7}
    return dw.write_world(out, **(args | overrides), url_key=url_key)


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def scenes(n: int, seed: int = 0, objects: tuple[int, int] = (2, 5)) -> list[dw.Scene]:
    rng = np.random.default_rng(seed)
    return [dw.make_scene(rng, W, H, objects) for _ in range(n)]


def overlaps(a: tuple, b: tuple) -> bool:
    (ax, ay, aw, ah), (bx, by, bw, bh) = a, b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


def path_of(url: str) -> Path:
    return Path(url.removeprefix("file://"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world")
    return out, write(out)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    write(tmp_path / "a", n_images=5, n_benchmark_pairs=2)
    first = digests(tmp_path / "a")
    write(tmp_path / "a", n_images=5, n_benchmark_pairs=2)
    assert digests(tmp_path / "a") == first
    write(tmp_path / "b", n_images=5, n_benchmark_pairs=2, seed=8)
    other = digests(tmp_path / "b")
    assert other.keys() == first.keys()
    images = [k for k in first if k.startswith("images/")]
    assert all(first[k] != other[k] for k in images)


def test_benchmark_is_a_separate_stream_from_training_images(tmp_path: Path) -> None:
    write(tmp_path / "small", n_images=2, n_benchmark_pairs=2)
    write(tmp_path / "large", n_images=6, n_benchmark_pairs=2)
    small, large = digests(tmp_path / "small"), digests(tmp_path / "large")
    bench = [k for k in small if k.startswith("benchmark/")]
    assert len(bench) == 8 and all(small[k] == large[k] for k in bench)
    train = {v for k, v in large.items() if k.startswith("images/")}
    assert train.isdisjoint(v for k, v in large.items() if k.startswith("benchmark/image/"))


def test_vocabulary_is_rich_enough() -> None:
    assert len(dw.CLASSES) >= 16 and 8 <= len(dw.COLOURS) <= 10
    assert all(re.fullmatch(r"[a-z]+", name) for name in dw.CLASSES)
    assert {b.tier for b in dw.BANDS.values()} == {"upper", "lower"}


@pytest.mark.parametrize("label", sorted(dw.CLASSES))
def test_each_class_is_drawn_exactly_inside_its_bbox(label: str) -> None:
    base = scenes(1)[0]
    obj = dw.SceneObject(label, "purple", "large", (20, 10, 40, 36), "center")
    plain = np.asarray(dw.render(replace(base, objects=())), dtype=int)
    drawn = np.asarray(dw.render(replace(base, objects=(obj,))), dtype=int)
    ys, xs = np.nonzero((plain != drawn).any(axis=2))
    assert (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == obj.bbox
    purple = (np.abs(drawn - dw.COLOURS["purple"]).max(axis=2) == 0)[10:46, 20:60]
    assert purple.mean() > 0.15, f"{label} barely shows its colour"


@pytest.mark.parametrize("label", sorted(dw.CLASSES))
def test_a_lone_objects_mask_is_exactly_what_render_draws(label: str) -> None:
    base = scenes(1)[0]
    obj = dw.SceneObject(label, "purple", "large", (20, 10, 40, 36), "center")
    alone = replace(base, objects=(obj,))
    plain = np.asarray(dw.render(replace(base, objects=())))
    drawn = (np.asarray(dw.render(alone)) != plain).any(axis=2)
    (mask,) = dw.object_masks(alone)
    assert np.array_equal(mask, drawn)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == obj.bbox


def test_object_masks_are_the_visible_pixels_in_drawing_order() -> None:
    for s in scenes(30):
        masks, bands = dw.object_masks(s), dw.band_masks(s)
        assert [m.shape for m in masks + bands] == [(H, W)] * (len(s.objects) + 2)
        image = np.asarray(dw.render(s))
        for i in range(len(s.objects)):
            without = replace(s, objects=s.objects[:i] + s.objects[i + 1 :])
            changed = (np.asarray(dw.render(without)) != image).any(axis=2)
            # Nothing outside its visible pixels changes; inside, only pixels over an object
            # drawn before it (it may share the colour) can stay the same.
            under = np.zeros((H, W), dtype=bool)
            for m in dw.object_masks(replace(s, objects=s.objects[:i])):
                under |= m
            assert not (changed & ~masks[i]).any()
            assert not (masks[i] & ~changed & ~under).any()
        # Objects, then the bands around them, cover every pixel exactly once.
        assert np.array_equal(np.sum(masks + bands, axis=0), np.ones((H, W)))


def test_objects_stay_visible_against_their_background() -> None:
    for s in scenes(200):
        clashes = dw.BANDS[s.upper].clashes + dw.BANDS[s.lower].clashes
        assert 2 <= len(s.objects) <= 5
        assert all(o.colour not in clashes for o in s.objects)
        assert len({(o.colour, o.label) for o in s.objects}) == len(s.objects)
        for o in s.objects:
            x, y, w, h = o.bbox
            assert 0 <= x and 0 <= y and x + w <= W and y + h <= H


def test_long_caption_mentions_every_object_and_both_bands() -> None:
    openings = set()
    for s in scenes(120, objects=(3, 4)):
        text = dw.long_caption(s)
        openings.add(" ".join(text.split()[:2]))
        for o in s.objects:
            assert f"{dw.SIZE_PHRASE[o.size]} {o.colour} {o.label}" in text
            assert f"in the {o.position}" in text.lower()
        for band in (s.upper, s.lower):
            assert dw.BANDS[band].description in text.lower()
        assert re.search(r"left of|right of|above|below|in front of|covers|behind", text)
        assert 50 <= len(text.split()) <= 170
    assert len(openings) >= 3, "all captions share one template"


def test_occlusion_is_described_in_drawing_order() -> None:
    for s in scenes(150):
        for k, front in enumerate(s.objects):
            if any(overlaps(front.bbox, o.bbox) for o in s.objects[:k]):
                ref = f"the {front.colour} {front.label}"
                pattern = rf"{ref} (is in front of|partly covers)|behind {ref}"
                assert re.search(pattern, dw.long_caption(s), re.IGNORECASE)


def test_short_caption_is_one_short_sentence() -> None:
    for s in scenes(200, objects=(1, 9)):
        text = dw.short_caption(s)
        assert len(text.split()) < 25 and text.count(".") == 1 and text.endswith(".")
        assert s.lower in text or dw.BANDS[s.lower].short in text
        biggest = max(s.objects, key=lambda o: o.bbox[2] * o.bbox[3])
        assert f"{biggest.colour} {biggest.label}" in text.lower()


def test_alt_text_is_short_and_noisy() -> None:
    rng = np.random.default_rng(1)
    texts = [dw.alt_text(s, rng) for s in scenes(300)]
    assert all(len(t.split()) <= 12 for t in texts)
    assert "" in texts
    assert any(re.fullmatch(r"(IMG_\d{4}\.JPG|DSC\d{5}\.jpg|photo_\d{4}\.jpeg)", t) for t in texts)
    assert any("|" in t for t in texts)
    assert any(re.fullmatch(rf"({'|'.join(dw.COLOURS)}) [a-z]+ on [a-z]+", t) for t in texts)
    assert len(set(texts)) > 100


def test_region_captions_focus_on_their_region() -> None:
    for s in scenes(60):
        n = len(s.objects)
        for i, o in enumerate(s.objects):
            text = dw.region_caption(s, i)
            assert f"{o.colour} {o.label}" in text and not text.lower().startswith(f"{o.label}.")
            assert len(re.findall(r"\.(\s|$)", text)) in (1, 2)
            others = {dw.CLASSES[p.label].shape for p in s.objects if p.label != o.label}
            assert not any(shape in text for shape in others)
            if any(overlaps(o.bbox, p.bbox) for p in s.objects[i + 1 :]):
                assert "hidden behind" in text
        upper, lower = dw.region_caption(s, n), dw.region_caption(s, n + 1)
        assert upper.lower().startswith(dw.BANDS[s.upper].description) and "top" in upper
        assert lower.lower().startswith(dw.BANDS[s.lower].description) and "bottom" in lower


def _vocabulary(before: dw.Scene, after: dw.Scene) -> set[str]:
    """Words that may legitimately differ between the captions of a perturbed pair."""
    words: set[str] = set()
    for a, b in zip(before.objects, after.objects, strict=True):
        if a != b:
            words |= {a.colour, b.colour, a.label, b.label}
            words |= set(dw.CLASSES[a.label].shape.split()) | set(dw.CLASSES[b.label].shape.split())
    for name in {before.upper, before.lower} ^ {after.upper, after.lower}:
        words |= set(dw.BANDS[name].description.split())
    return words


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z-]+", text.lower()))


def test_perturbation_changes_exactly_one_attribute() -> None:
    rng, kinds = np.random.default_rng(5), set()
    for s in scenes(150):
        p, change = dw.perturb(s, rng)
        pairs = zip(s.objects, p.objects, strict=True)
        diffs = [(a.colour != b.colour) + (a.label != b.label) for a, b in pairs]
        diffs += [s.upper != p.upper, s.lower != p.lower]
        assert sum(diffs) == 1, change
        assert [o.bbox for o in s.objects] == [o.bbox for o in p.objects] and s.split == p.split
        kinds.add(change.split()[0])
        clashes = dw.BANDS[p.upper].clashes + dw.BANDS[p.lower].clashes
        assert all(o.colour not in clashes for o in p.objects)
        before, after = dw.long_caption(s), dw.long_caption(p)
        assert before != after
        assert _tokens(before) ^ _tokens(after) <= _vocabulary(s, p), change
    assert kinds == {"colour", "label", "upper", "lower"}


def test_planned_rows_match_written_urls(world: tuple[Path, dict], tmp_path: Path) -> None:
    out, summary = world
    written = pq.read_table(out / "urls.parquet").num_rows
    assert written == dw.planned_url_rows(12, None) == summary["url_rows"]
    custom = {"missing": 0, "not_image": 3, "truncated": 1}
    for n_images, broken in ((0, {"missing": 1}), (3, custom)):
        write(tmp_path / str(n_images), n_images=n_images, n_broken=broken, n_benchmark_pairs=0)
        rows = pq.read_table(tmp_path / str(n_images) / "urls.parquet").num_rows
        assert rows == dw.planned_url_rows(n_images, broken)
    empty = pq.read_table(tmp_path / "0" / "reference.parquet")
    assert empty.num_rows == 0 and empty.schema.equals(dw.REFERENCE_SCHEMA)


def _kind(url: str) -> str:
    if not url.startswith("file://"):
        return "invalid"
    path = path_of(url)
    if not path.exists():
        return "missing"
    try:
        with Image.open(path) as img:
            img.load()
    except UnidentifiedImageError:
        return "not_image"
    except OSError:
        return "truncated"
    return "good"


def test_urls_hold_good_broken_and_invalid_rows(world: tuple[Path, dict]) -> None:
    out, _ = world
    table = pq.read_table(out / "urls.parquet")
    assert [f.name for f in table.schema] == ["url", "caption", "width", "height"]
    assert str(table.schema.field("width").type) == "int64"
    rows = table.to_pylist()
    kinds = [_kind(r["url"]) for r in rows]
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "good": 13,
        "missing": 2,
        "not_image": 2,
        "truncated": 2,
        "invalid": 2,
    }
    assert sorted(r["url"] for r in rows if not r["url"].startswith("file://")) == [
        "",
        "ftp://example.invalid/a.jpg",
    ]
    urls = [r["url"] for r in rows]
    dup = next(u for u in urls if urls.count(u) > 1)
    first, second = (r for r in rows if r["url"] == dup)
    assert first["caption"] != second["caption"]
    assert all(path_of(u).is_absolute() for u in urls if u.startswith("file://"))
    assert kinds[:12] != ["good"] * 12, "rows are not shuffled"


def test_reference_rows_describe_the_good_images(world: tuple[Path, dict]) -> None:
    out, _ = world
    ref = pq.read_table(out / "reference.parquet")
    assert ref.schema.equals(dw.REFERENCE_SCHEMA)
    rows = ref.to_pylist()
    urls = pq.read_table(out / "urls.parquet").column("url").to_pylist()
    good = {u for u in urls if _kind(u) == "good"}
    assert len(rows) == 12 and {r["url"] for r in rows} == good
    for row in rows:
        assert row["key"] == url_key(row["url"])
        assert row["source"] == "demo_world" and row["seed"] == 7
        fg = [r for r in row["regions"] if r["kind"] == "foreground"]
        bg = [r for r in row["regions"] if r["kind"] == "background"]
        assert 2 <= len(fg) <= 5 and all(r["label"] in dw.CLASSES for r in fg)
        assert {r["label"] for r in bg} <= set(dw.BANDS) and len(bg) == 2
        assert sum(r["bbox"][3] for r in bg) == H and all(r["bbox"][2] == W for r in bg)
        for r in row["regions"]:
            x, y, w, h = r["bbox"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= W and y + h <= H
            assert r["score"] == 1.0 and r["caption"]
        for r in fg:
            assert f" {r['label']}" in row["long_caption"]


def test_region_bboxes_cover_pixels_of_the_object_colour(world: tuple[Path, dict]) -> None:
    out, _ = world
    checked = 0
    for row in pq.read_table(out / "reference.parquet").to_pylist():
        pixels = np.asarray(Image.open(path_of(row["url"])).convert("RGB"), dtype=int)
        fg = [r for r in row["regions"] if r["kind"] == "foreground"]
        for k, r in enumerate(fg):
            if any(overlaps(r["bbox"], q["bbox"]) for q in fg[k + 1 :]):
                continue  # partly hidden, its colour may be covered
            colour = re.search(rf"({'|'.join(dw.COLOURS)}) {r['label']}", r["caption"]).group(1)
            x, y, w, h = map(int, r["bbox"])
            close = np.abs(pixels[y : y + h, x : x + w] - dw.COLOURS[colour]).max(axis=2) <= 48
            assert close.mean() > 0.1, (row["url"], r["label"], colour)
            checked += 1
    assert checked >= 12


def test_benchmark_layout_pairs_adjacent_ids(world: tuple[Path, dict]) -> None:
    out, summary = world
    images = sorted(p.stem for p in (out / "benchmark" / "image").glob("*.jpg"))
    captions = sorted(p.stem for p in (out / "benchmark" / "caption").glob("*.txt"))
    assert images == captions == [f"{j:05d}" for j in range(6)] and summary["benchmark_images"] == 6
    texts = [(out / "benchmark" / "caption" / f"{j:05d}.txt").read_text() for j in range(6)]
    assert all(t.endswith("\n") and t.count("\n") == 1 and len(t.split()) > 30 for t in texts)
    assert all(texts[2 * j] != texts[2 * j + 1] for j in range(3))
    pixels = [(out / "benchmark" / "image" / f"{j:05d}.jpg").read_bytes() for j in range(6)]
    assert all(pixels[2 * j] != pixels[2 * j + 1] for j in range(3))
    for j in range(6):
        with Image.open(out / "benchmark" / "image" / f"{j:05d}.jpg") as img:
            assert img.format == "JPEG" and img.size == (W, H)


def test_written_images_are_valid_jpegs(world: tuple[Path, dict]) -> None:
    out, _ = world
    files = sorted((out / "images").glob("*.jpg"))
    assert [p.name for p in files] == [f"{i:06d}.jpg" for i in range(12)]
    with Image.open(files[0]) as img:
        assert img.format == "JPEG" and img.size == (W, H)


# ---------------------------------------------------------------- classification set
def test_classification_set_has_every_class_in_imagefolder_layout(tmp_path: Path) -> None:
    summary = dw.write_classification_set(tmp_path, per_class=2, width=W, height=H, seed=3)
    assert summary == {"classes": len(dw.CLASSES), "per_class": 2, "images": 2 * len(dw.CLASSES)}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(dw.CLASSES)
    for label in dw.CLASSES:
        files = sorted((tmp_path / label).iterdir())
        assert [p.name for p in files] == ["0000.jpg", "0001.jpg"]
        with Image.open(files[0]) as img:
            assert img.format == "JPEG" and img.size == (W, H)


def test_classification_set_is_seeded_per_class(tmp_path: Path) -> None:
    for name, per_class, seed in (("a", 2, 3), ("again", 2, 3), ("more", 3, 3), ("other", 2, 4)):
        dw.write_classification_set(
            tmp_path / name, per_class=per_class, width=W, height=H, seed=seed
        )
    a, again, more, other = (digests(tmp_path / n) for n in ("a", "again", "more", "other"))
    assert a == again
    assert a.items() <= more.items() and len(more) == len(a) * 3 // 2
    assert all(a[k] != other[k] for k in a)
    assert len(set(a.values())) == len(a)


def test_single_object_scenes_show_their_class_in_a_visible_colour() -> None:
    rng = np.random.default_rng(0)
    for label in dw.CLASSES:
        for _ in range(20):
            s = dw._single_object_scene(rng, label, W, H)
            (o,) = s.objects
            clashes = dw.BANDS[s.upper].clashes + dw.BANDS[s.lower].clashes
            assert o.label == label and o.colour not in clashes
            x, y, w, h = o.bbox
            assert 0 <= x and 0 <= y and x + w <= W and y + h <= H


def test_world_writes_classification_set_only_when_asked(tmp_path: Path) -> None:
    # One folder for both runs: the parquet files hold absolute file:// URLs.
    plain = write(tmp_path, n_images=2, n_benchmark_pairs=1)
    assert "classify_images" not in plain and not (tmp_path / "classify").exists()
    before = digests(tmp_path)
    assert write(tmp_path, n_images=2, n_benchmark_pairs=1, classify_per_class=1) == plain | {
        "classify_images": len(dw.CLASSES)
    }
    after = digests(tmp_path)
    classify = {k: v for k, v in after.items() if k.startswith("classify/")}
    assert len(classify) == len(dw.CLASSES)
    assert {k: v for k, v in after.items() if k not in classify} == before
    standalone = tmp_path / "standalone"
    dw.write_classification_set(standalone, per_class=1, width=W, height=H, seed=7)
    assert {f"classify/{k}": v for k, v in digests(standalone).items()} == classify


def test_relative_world_has_relative_urls_that_open(tmp_path, monkeypatch):
    import urllib.request

    monkeypatch.chdir(tmp_path)
    dw.write_world(
        Path("results/demo"),
        n_images=2,
        n_benchmark_pairs=1,
        width=64,
        height=48,
        seed=0,
        n_broken={},
        url_key=url_key,
    )
    urls = pq.read_table(tmp_path / "results/demo/urls.parquet").column("url").to_pylist()
    good = [u for u in urls if u.startswith("file:results/demo/images/")]
    assert len(set(good)) == 2  # their keys do not depend on where the checkout is
    with urllib.request.urlopen(good[0]) as response:
        assert response.read()[:2] == b"\xff\xd8"  # a JPEG
