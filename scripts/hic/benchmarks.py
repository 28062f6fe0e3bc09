"""Long-text retrieval and zero-shot classification benchmarks: loaders and metrics.

Each loader reads one published layout and returns the same in-memory form, so the
evaluation stage scores Urban-1k, ShareGPT4V-1k/10k and DCI alike. A benchmark whose root
is absent raises BenchmarkMissing (skippable when optional); one that is present but broken
(missing images, empty captions, unpaired files) always raises, so scores never come from a
silently shrunken set.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class BenchmarkMissing(FileNotFoundError):
    """A benchmark's root folder or file does not exist; the message gives the layout expected."""


@dataclass(frozen=True)
class RetrievalSet:
    name: str
    images: list[Path]
    captions: list[str]  # captions[i] describes images[i]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.captions):
            raise ValueError(
                f"benchmark {self.name!r}: {len(self.images)} images "
                f"but {len(self.captions)} captions"
            )
        if not self.images:
            raise ValueError(f"benchmark {self.name!r} has no image-caption pairs")


@dataclass(frozen=True)
class ClassificationSet:
    name: str
    images: list[Path]
    labels: list[int]  # index into classnames
    classnames: list[str]


# ---------------------------------------------------------------- shared checks
def _require_root(name: str, root: Path, layout: str) -> None:
    if not root.exists():
        raise BenchmarkMissing(f"benchmark {name!r}: {root} does not exist\n  expected {layout}")


def _wrong_layout(name: str, root: Path, layout: str) -> ValueError:
    return ValueError(f"benchmark {name!r}: {root} does not match the layout\n  expected {layout}")


def _require_images(name: str, images: list[Path]) -> None:
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"benchmark {name!r}: {len(missing)} of {len(images)} images missing, "
            f"first {missing[0]}"
        )


def _read_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _json_list(path: Path) -> list[dict]:
    records = _read_json(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def _field(record: dict, key: str, where: str) -> Any:
    if key not in record:
        raise ValueError(f"{where}: record lacks {key!r} (has {sorted(record)})")
    return record[key]


def _nonempty(caption: str, where: str) -> str:
    if not caption.strip():
        raise ValueError(f"{where}: empty caption")
    return caption.strip()


def _first_line(path: Path) -> str:
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0] if lines else ""


# ---------------------------------------------------------------- retrieval loaders
def rejoin_sentences(text: str) -> str:
    """``text`` split at line breaks, "</s>" and full stops, and its parts joined by ". ".

    How FLAIR's evaluation builds the ShareGPT4V and DCI captions (and FLAME follows it):
    paragraph breaks become sentence breaks, so scores compare with the published ones."""
    parts = (part.strip() for part in re.split(r"\n|</s>|\.", text))
    return ". ".join(part for part in parts if part)


def load_urban1k(root: Path, *, name: str = "urban1k") -> RetrievalSet:
    """Urban-1k in either published layout.

    FLAIR's: ``annotations/annotations.json`` holding ``{"annotations": [{"image_id", "image",
    "caption"}]}`` with the images under ``images/``, in file order. Long-CLIP's (the Hugging
    Face release): ``image/*.jpg`` and ``caption/*.txt`` paired by stem, sorted by stem, the
    caption being the txt's first line. Captions are used as written.
    """
    root = Path(root)
    layout = (
        f"{root}/annotations/annotations.json with the images in {root}/images/ (FLAIR's), "
        f"or {root}/image/*.jpg with {root}/caption/*.txt of the same stems (Long-CLIP's)"
    )
    _require_root(name, root, layout)
    annotations = root / "annotations" / "annotations.json"
    if annotations.is_file():
        document = _read_json(annotations)
        records = document.get("annotations") if isinstance(document, dict) else None
        if not isinstance(records, list):
            raise ValueError(f'{annotations}: expected {{"annotations": [records]}}')
        where = [f"{annotations} record {i}" for i in range(len(records))]
        images = [
            root / "images" / _field(r, "image", w) for r, w in zip(records, where, strict=True)
        ]
        captions = [
            _nonempty(_field(r, "caption", w), w) for r, w in zip(records, where, strict=True)
        ]
    elif (root / "image").is_dir() and (root / "caption").is_dir():
        texts = {p.stem: p for p in sorted((root / "caption").glob("*.txt"))}
        stray = sorted(p.name for p in (root / "image").glob("*.jpg") if p.stem not in texts)
        if stray:
            raise ValueError(
                f"benchmark {name!r}: {len(stray)} images in {root / 'image'} have no caption "
                f"txt, first {stray[0]}"
            )
        images = [root / "image" / f"{stem}.jpg" for stem in texts]
        captions = [_nonempty(_first_line(p), str(p)) for p in texts.values()]
    else:
        raise _wrong_layout(name, root, layout)
    _require_images(name, images)
    return RetrievalSet(name, images, captions)


def load_sharegpt4v(
    json_path: Path, image_root: Path, n: int, *, name: str = "sharegpt4v"
) -> RetrievalSet:
    """The first n records of a ShareGPT4V JSON list: the share-captioner file, or FLAIR's
    ``share4v_sam_10k.json`` (its first 10k SAM records, in the same form). The caption is the
    gpt (second) turn, its sentences rejoined (:func:`rejoin_sentences`)."""
    json_path, image_root = Path(json_path), Path(image_root)
    layout = (
        f"{json_path}, a ShareGPT4V JSON list, with its relative 'image' paths under {image_root}/"
    )
    _require_root(name, json_path, layout)
    _require_root(name, image_root, layout)
    if n < 1:
        raise ValueError(f"benchmark {name!r}: n must be >= 1, got {n}")
    records = _json_list(json_path)
    if len(records) < n:
        raise ValueError(f"benchmark {name!r}: {json_path} has {len(records)} records, needs {n}")
    images, captions = [], []
    for i, record in enumerate(records[:n]):
        where = f"{json_path} record {i}"
        turns = _field(record, "conversations", where)
        if len(turns) < 2:
            raise ValueError(f"{where}: {len(turns)} conversation turns, expected 2")
        images.append(image_root / _field(record, "image", where))
        captions.append(_nonempty(rejoin_sentences(_field(turns[1], "value", where)), where))
    _require_images(name, images)
    return RetrievalSet(name, images, captions)


def load_dci(root: Path, *, name: str = "dci") -> RetrievalSet:
    """Every DCI image of every split in ``splits.json``, in its order (as FLAIR loads it).

    The caption is short_caption and extra_caption on two lines, its sentences rejoined
    (:func:`rejoin_sentences`), as the FLAIR and FLAME evaluations build it.
    """
    root = Path(root)
    layout = (
        f"{root}/splits.json naming the files of {root}/annotations/, with the images they "
        f"name in {root}/photos/"
    )
    _require_root(name, root, layout)
    splits_file = root / "splits.json"
    if not splits_file.is_file() or not (root / "annotations").is_dir():
        raise _wrong_layout(name, root, layout)
    splits = _read_json(splits_file)
    if not isinstance(splits, dict):
        raise ValueError(f"{splits_file}: expected {{split: [annotation files]}}")
    images, captions = [], []
    for file_name in (f for files in splits.values() for f in files):
        path = root / "annotations" / file_name
        if not path.is_file():
            raise FileNotFoundError(f"benchmark {name!r}: {splits_file} names {path}, absent")
        record = _read_json(path)
        text = f"{record.get('short_caption') or ''}\n{record.get('extra_caption') or ''}"
        images.append(root / "photos" / _field(record, "image", str(path)))
        captions.append(_nonempty(rejoin_sentences(text), str(path)))
    _require_images(name, images)
    return RetrievalSet(name, images, captions)


LOADERS: dict[str, Callable[[str, Mapping[str, Any]], RetrievalSet]] = {
    "urban1k": lambda name, spec: load_urban1k(Path(spec["path"]), name=name),
    "sharegpt4v": lambda name, spec: load_sharegpt4v(
        Path(spec["path"]), Path(spec["images"]), int(spec["n"]), name=name
    ),
    "dci": lambda name, spec: load_dci(Path(spec["path"]), name=name),
}


def load_benchmark(name: str, spec: Mapping[str, Any]) -> RetrievalSet | None:
    """Load by spec["format"]; an absent optional benchmark gives None, a broken one raises."""
    if spec["format"] not in LOADERS:
        raise ValueError(
            f"benchmark {name!r}: unknown format {spec['format']!r}; expected one of "
            f"{sorted(LOADERS)}"
        )
    try:
        data = LOADERS[spec["format"]](name, spec)
    except BenchmarkMissing:
        if spec.get("optional", False):
            return None
        raise
    if spec.get("size") and len(data.images) != spec["size"]:
        raise ValueError(
            f"benchmark {name!r} at {spec['path']}: {len(data.images)} image-caption pairs, "
            f"expected {spec['size']}: an incomplete or different copy (fix it, or change size)"
        )
    return data


# ---------------------------------------------------------------- classification loader
def load_imagefolder(
    root: Path, *, name: str | None = None, classnames: str = "folders"
) -> ClassificationSet:
    """ImageFolder layout root/<class>/*.{jpg,jpeg,png}; classes in sorted folder order.

    ``classnames``: "folders" names each class after its folder ("_" read as a space);
    "imagenet" takes open_clip's ImageNet class names (for val/<wnid>/ folders, whose sorted
    order is the standard class order); anything else is a text file, one name per line in
    sorted folder order."""
    root = Path(root)
    name = name or root.name
    layout = f"{root}/<class>/*.jpg or *.png, one folder per class"
    _require_root(name, root, layout)
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise _wrong_layout(name, root, layout)
    images, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"benchmark {name!r}: class folder {folder} holds no images")
        images += files
        labels += [label] * len(files)
    if classnames == "folders":
        names = [p.name.replace("_", " ") for p in folders]
    elif classnames == "imagenet":
        names = list(IMAGENET_CLASSNAMES)
    else:
        names = [line.strip() for line in Path(classnames).read_text().splitlines()]
        names = [n for n in names if n]
    if len(names) != len(folders):
        raise ValueError(
            f"benchmark {name!r}: {len(folders)} class folders under {root} but {len(names)} "
            f"class names from {classnames!r}"
        )
    return ClassificationSet(name, images, labels, names)


# ---------------------------------------------------------------- metrics
def _pessimistic_ranks(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """0-based rank of each row's positive: candidates scoring >= it, other than itself.

    A tie counts against the positive, so a model that scores everything alike earns
    nothing; ordering ties by index instead would reward it for the benchmark's order.
    """
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")  # NaN compares False: would rank 0
    positive = scores[np.arange(len(scores)), positives]
    return (scores >= positive[:, None]).sum(axis=1) - 1


def _check_ks(ks: Sequence[int]) -> None:
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")


def recall_at_k(similarity: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Share of rows whose positive (column i of row i) ranks within the top k.

    Rows are queries: pass image x text similarities for image->text, the transpose for
    text->image. Ties rank pessimistically: the positive ranks after every other candidate
    scoring >= it, so a constant n x n matrix has recall 0 for every k < n (and 1 from k = n).
    """
    similarity = np.asarray(similarity)
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be a square matrix, got shape {similarity.shape}")
    _check_ks(ks)
    ranks = _pessimistic_ranks(similarity, np.arange(len(similarity)))
    return {f"R@{k}": float((ranks < k).mean()) for k in ks}


def topk_accuracy(
    logits: np.ndarray, labels: Sequence[int] | np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Share of samples whose label ranks within the top k classes, ties pessimistic."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (len(logits),):
        raise ValueError(f"logits {logits.shape} need one label each, got labels {labels.shape}")
    if not labels.size or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty integer array, got {labels.dtype}")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {logits.shape[1]}), got {labels.min()}..{labels.max()}"
        )
    _check_ks(ks)
    ranks = _pessimistic_ranks(logits, labels)
    return {f"top{k}": float((ranks < k).mean()) for k in ks}
