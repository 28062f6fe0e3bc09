"""Region proposals: the caption's objects, found by an open-vocabulary detector, tightened by SAM.

Method, per image:

1. Candidates: the things the scene's long caption (short caption if the long one is
   missing) names: names from a curated vocabulary (``data/vocabulary/things.txt`` for
   objects, ``stuff.txt`` for background) matched on whole words after lemmatisation by
   lemminflect (irregular plurals included), multi-word names first; then the head noun of
   every other noun phrase, found by a small rule set over lemminflect's part-of-speech
   lexicon (no tagger model: none installs offline from the package index), so names outside
   the list ("artist", "surfer") are candidates too. When the caption names nothing (or did
   not parse), the whole vocabulary is queried instead (``fallback: vocabulary``), so an
   image is never skipped silently; the ``query_source`` column says which happened.
2. Boxes: OWLv2 (``AutoModelForZeroShotObjectDetection``) scores every candidate name; the
   ``top_k`` best boxes per name above ``detector_threshold`` are kept.
3. Masks: SAM, prompted with each object box, gives a tight box and the mask area. SAM's
   automatic masks that object boxes do not cover become background regions, labelled with the
   background name whose detected box overlaps them most (unlabelled masks are dropped).

Boxes are [x, y, w, h] in pixels of the ORIGINAL image (the download stage may have resized
it; the status table keeps both sizes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import lemminflect
import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from hic.boxes import iou
from hic.images import read_images
from hic.parts import PartStore, file_identity, fingerprint, resumable_map, settings_identity
from hic.region_tables import PROPOSAL_SCHEMA, image_sizes, write_rows


@dataclass(frozen=True)
class ProposeSettings:
    """The config's ``propose_regions`` section."""

    detector_threshold: float = 0.1
    top_k: int = 2
    fallback: str = "vocabulary"
    batch_size: int = 8
    points_per_side: int = 16
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    min_background_fraction: float = 0.05
    background_iou: float = 0.3


# Closed-class words: they end or open a noun phrase and are never names. A finite list, so
# hand-written; everything open-class (nouns, adjectives, verbs) is looked up in lemminflect.
_SINGULAR_DETERMINERS = frozenset("a an one this that each every another either".split())
_PLURAL_DETERMINERS = frozenset(
    "two three four five six seven eight nine ten dozens several many few these those "
    "multiple numerous various both".split()
)
_DETERMINERS = (
    _SINGULAR_DETERMINERS
    | _PLURAL_DETERMINERS
    | frozenset("the some any no his her its their our my your whose".split())
)
_CLOSED = _DETERMINERS | frozenset(
    """and or but nor so yet if than then as of in on at to by for from with without within
    into onto inside outside over under above below near beside behind between among around
    along across through against toward towards past beyond upon via while where when which
    who whom what that there here it they them he she him we us you i me is are was were be
    been being am has have had having do does did can could will would may might shall should
    must not very also just only too quite rather almost partly mostly slightly more most less
    least other others such same own all both each either neither""".split()
)
# Nouns a caption uses to talk about the picture rather than name something in it.
_FRAMING = frozenset(
    """image picture photo photograph scene view frame shot setting composition left right
    side top bottom middle centre center front foreground distance corner edge part portion
    area section half detail colour color shade tone hue shape size texture pattern style
    atmosphere mood feeling sense impression moment time day lot variety number kind type
    sort bit piece couple pair group row line series""".split()
)
_TOKEN = re.compile(r"[a-z]+(?:-[a-z]+)*|[^\sa-z]")


@lru_cache(maxsize=65536)
def _lemmas(word: str) -> dict[str, tuple[str, ...]]:
    """lemminflect's lemmas by part of speech. An unknown hyphenated word takes its last
    part's parts of speech ("paint-stained" is a participle); other unknown words are nouns."""
    if found := lemminflect.getAllLemmas(word):
        return found
    *_, last = word.split("-")
    if last != word and (parts := lemminflect.getAllLemmas(last)):
        return {pos: (word,) for pos in parts}
    return {"NOUN": (word,)}


def noun_lemmas(word: str) -> tuple[str, ...]:
    """The noun lemmas of ``word`` ("women" -> woman, "leaves" -> leave, leaf), else itself."""
    return _lemmas(word).get("NOUN") or (word,)


def _is_plural(word: str) -> bool:
    return word not in noun_lemmas(word)


def _verb_form(word: str) -> bool:
    """An inflected verb ("rides", "sitting", "parked", "fallen"): after a noun it ends the
    noun phrase; before one it is a participle modifying it ("a parked car")."""
    *_, last = word.split("-")
    verbs = _lemmas(last).get("VERB", (last,))
    return last not in verbs and last.endswith(("s", "ing", "ed", "en"))


def _phrase_head(words: list[str], opener: str | None) -> int | None:
    """Index in ``words`` (a run after ``opener``) of the noun phrase's head noun, or None.

    The run ends at its first word that cannot modify or name (a verb, an adverb), after a
    plural noun, and at an inflected verb after a noun ("a surfer rides", "a man sitting").
    After a singular determiner a plural form is a verb; after a plural one, the first plural
    noun is the head ("two women walk")."""
    head = None
    for i, word in enumerate(words):
        pos = _lemmas(word)
        if not {"NOUN", "ADJ"} & pos.keys() and not _verb_form(word):
            break
        if head is not None and "VERB" in pos and _is_plural(words[head]):
            break  # "the dogs bark"
        if (
            head is not None
            and _verb_form(word)
            and (
                opener in _SINGULAR_DETERMINERS
                or not word.endswith("s")
                or not _is_plural(word)
                or opener not in _PLURAL_DETERMINERS
            )
        ):
            break
        # without a determiner, a leading "-ing"/"-ed" form is a verb: "holding kites"
        participle = _verb_form(word) and not word.endswith("s")
        if "NOUN" in pos and not (opener is None and head is None and participle):
            head = i
            if _is_plural(word) and (opener is None or opener in _PLURAL_DETERMINERS):
                break
    return head


def _phrase_heads(words: list[str]) -> list[tuple[int, str]]:
    """(position, name) of each noun phrase's head in ``words`` (tokens, lower case).

    A phrase opens after a determiner ("a surfer", "the ocean", "two women"), or after a
    preposition or at the start with a plural ("Surfers ride", "with leaves"). The name is
    the head's noun lemma, with a noun-only modifier kept ("a fire hydrant", "a tennis
    racket"); picture-framing nouns ("the left side of the image") and closed-class words
    are not names."""
    heads, in_phrase = [], set()
    for i, word in enumerate(words):
        # a bare plural may also follow a verb ("surfers ride waves", "holding flowers"), but
        # not a noun that could be one ("a bus drives": "bus" heads a phrase already)
        previous = words[i - 1] if i else "."
        starts = (
            not previous[0].isalpha()
            or previous in _CLOSED
            or ("VERB" in _lemmas(previous) and i - 1 not in in_phrase)
        )
        if word in _CLOSED or not word[0].isalpha() or not starts:
            continue
        opener = words[i - 1] if i and words[i - 1] in _DETERMINERS else None
        run = []
        for w in words[i:]:
            if w in _CLOSED or not w[0].isalpha():
                break
            run.append(w)
        h = _phrase_head(run, opener)
        if h is None:
            continue
        in_phrase.update(range(i, i + h + 1))
        if opener is None and not _is_plural(run[h]):
            continue
        lemma = noun_lemmas(run[h])[-1]
        if lemma in _FRAMING or lemma in _CLOSED or len(lemma) < 3:
            continue
        modifier = run[h - 1] if h else None
        if (
            modifier
            and "NOUN" in (pos := _lemmas(modifier))
            and "ADJ" not in pos
            and not _verb_form(modifier)
            and not _is_plural(modifier)
        ):
            lemma = f"{modifier} {lemma}"
        heads.append((i + h, lemma))
    return heads


def caption_objects(text: str | None, vocabulary: list[str]) -> list[str]:
    """Names of the things ``text`` mentions, in order of first mention, each once.

    Vocabulary names are matched first, on whole words with the last word lemmatised by
    lemminflect ("women" -> woman, "knives" -> knife, "teddy bears" -> teddy bear), longer
    names first and claiming their words, so "night sky" is not also "sky". Then the head of
    every other noun phrase (:func:`_phrase_heads`) becomes a name of its own, so "artist" or
    "surfer" is a candidate although no curated list holds it."""
    if not text:
        return []
    words = _TOKEN.findall(normalise_words(text))
    lemmas = [set(noun_lemmas(w)) | {w} if w[0].isalpha() else set() for w in words]
    found: dict[str, int] = {}
    taken = [False] * len(words)
    for name in sorted(vocabulary, key=lambda n: -len(n.split())):
        *first, last = name.split()
        n = len(first) + 1
        for i in range(len(words) - n + 1):
            if (
                words[i : i + n - 1] == first
                and last in lemmas[i + n - 1]
                and not any(taken[i : i + n])
            ):
                found.setdefault(name, i)
                taken[i : i + n] = [True] * n
    for i, name in _phrase_heads(words):
        if not taken[i]:
            found.setdefault(name, i)
    return sorted(found, key=found.get)


def normalise_words(text: str) -> str:
    """Lower case, possessives dropped ("the surfer's board" -> "the surfer board")."""
    return re.sub(r"['’]s\b", "", text.lower())


def to_original(bbox: list[float], scale_x: float, scale_y: float) -> list[float]:
    x, y, w, h = bbox
    return [x * scale_x, y * scale_y, w * scale_x, h * scale_y]


class Detector:
    """OWLv2 through transformers' zero-shot detection classes (real and tiny alike)."""

    def __init__(self, ref, device: str | None = None):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        from hic.models import default_device, unavailable_error

        self.device = device or default_device()
        try:
            self.processor = AutoProcessor.from_pretrained(ref.id, revision=ref.revision)
            model = AutoModelForZeroShotObjectDetection.from_pretrained(
                ref.id, revision=ref.revision
            )
        except OSError as err:
            raise unavailable_error(ref, err) from err
        self.model = model.to(self.device).eval()

    def detect(
        self, images: list[Image.Image], queries: list[list[str]], threshold: float, top_k: int
    ) -> list[list[dict]]:
        """Per image: up to ``top_k`` boxes per query, [x, y, w, h] in that image's pixels."""
        # Every image needs as many queries, of one token length: repeating a query adds no
        # label (post-processing names boxes by query), and OWL's text encoder is fixed-length.
        longest = max(len(q) for q in queries)
        queries = [q + [q[0]] * (longest - len(q)) for q in queries]
        inputs = self.processor(
            text=queries,
            images=images,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
        )
        with torch.inference_mode():
            outputs = self.model(**inputs.to(self.device))
        # OWLv2 pads images to a square before resizing: boxes are relative to that square.
        sides = [(max(im.size), max(im.size)) for im in images]
        results = self.processor.post_process_grounded_object_detection(
            outputs, threshold=threshold, target_sizes=sides, text_labels=queries
        )
        detections = []
        for image, result in zip(images, results, strict=True):
            width, height = image.size
            per_label: dict[str, list[dict]] = {}
            for box, score, label in zip(
                result["boxes"].tolist(),
                result["scores"].tolist(),
                result["text_labels"],
                strict=True,
            ):
                x0, y0 = max(0.0, box[0]), max(0.0, box[1])
                x1, y1 = min(float(width), box[2]), min(float(height), box[3])
                if x1 - x0 >= 1 and y1 - y0 >= 1:
                    per_label.setdefault(label, []).append(
                        {"label": label, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
                    )
            detections.append(
                [
                    d
                    for found in per_label.values()
                    for d in sorted(found, key=lambda d: -d["score"])[:top_k]
                ]
            )
        return detections


def image_proposals(
    image: Image.Image,
    detections: list[dict],
    stuff: set[str],
    sam,
    settings: ProposeSettings,
) -> list[dict]:
    """Detector boxes → SAM-tightened foreground boxes, detected and SAM-found backgrounds."""
    from hic.segment import EncodeOnce, background_masks, box_masks

    pixels = np.asarray(image)
    predictor = EncodeOnce(sam)  # box prompts and automatic masks share one encoding
    things = [d for d in detections if d["label"] not in stuff]
    backgrounds = [d for d in detections if d["label"] in stuff]
    proposals = []
    masks = box_masks(predictor, pixels, [d["bbox"] for d in things]) if things else []
    for d, (tight, area) in zip(things, masks, strict=True):
        proposals.append(
            {
                **d,
                "bbox": tight,
                "mask_area": float(area),
                "kind": "foreground",
                "source": "detector",
            }
        )
    for d in backgrounds:
        proposals.append({**d, "mask_area": None, "kind": "background", "source": "detector"})
    auto = (
        background_masks(
            predictor,
            pixels,
            points_per_side=settings.points_per_side,
            pred_iou_thresh=settings.pred_iou_thresh,
            stability_score_thresh=settings.stability_score_thresh,
            min_area_fraction=settings.min_background_fraction,
            covered=[p["bbox"] for p in proposals if p["kind"] == "foreground"],
        )
        if backgrounds
        else []
    )
    for bbox, area in auto:
        best = max(backgrounds, key=lambda d: iou(d["bbox"], bbox))
        if iou(best["bbox"], bbox) >= settings.background_iou:
            proposals.append(
                {
                    "label": best["label"],
                    "bbox": list(bbox),
                    "score": best["score"],
                    "mask_area": float(area),
                    "kind": "background",
                    "source": "sam_auto",
                }
            )
    return proposals


def query_source(caption: str | None, names: list[str], fallback: str) -> tuple[str, list[str]]:
    """(where the detector's queries come from, the queries) for an image's caption."""
    found = caption_objects(caption, names)
    if found:
        return "caption", found
    return fallback, names if fallback == "vocabulary" else []


def propose_shard(
    tar: Path,
    status: Path,
    scene: Path,
    out: Path,
    vocabulary: dict[str, list[str]],
    detector: Detector,
    sam,
    settings: ProposeSettings,
    identity: dict,
    flush_every: int = 8,
) -> dict:
    """Proposals for every downloaded image of a shard; ``vocabulary`` has things and stuff.

    Resumable (``hic.parts``): a unit is a decodable image, by key; ``identity`` (the
    detector's and SAM's references), the settings, the vocabulary and the inputs fingerprint
    the flushed parts."""
    sizes = image_sizes(status)
    captions = {
        r["key"]: r["long_caption"] or r["short_caption"]
        for r in pq.read_table(scene, columns=["key", "short_caption", "long_caption"]).to_pylist()
    }
    names = vocabulary["things"] + vocabulary["stuff"]
    stuff = set(vocabulary["stuff"])
    job = fingerprint(
        identity, settings_identity(settings), vocabulary, file_identity([tar, status, scene])
    )
    store = PartStore.beside(out, job, PROPOSAL_SCHEMA)

    def propose(batch: list[tuple[str, Image.Image]]) -> list[list[dict]]:
        queries = {
            key: query_source(captions.get(key), names, settings.fallback) for key, _ in batch
        }
        work = [(key, image) for key, image in batch if queries[key][0] != "none"]
        found = (
            detector.detect(
                [image for _, image in work],
                [queries[key][1] for key, _ in work],
                settings.detector_threshold,
                settings.top_k,
            )
            if work
            else []
        )
        detections = dict(zip([key for key, _ in work], found, strict=True))
        args = (stuff, sam, settings)
        return [
            _image_rows(key, image, detections[key], queries[key][0], sizes[key], *args)
            if key in detections
            else []  # no query: no proposal
            for key, image in batch
        ]

    # An image that does not decode is no unit: it has no proposals, and is tried again on
    # a restart at the cost of a decode.
    mapped = resumable_map(
        store,
        lambda done: (
            (key, image) for key, image, _ in read_images(tar, skip=done) if image is not None
        ),
        lambda item: item[0],
        propose,
        settings.batch_size,
        flush_every,
    )
    write_rows(mapped.rows, PROPOSAL_SCHEMA, out)
    store.remove()
    by_source = {"caption": 0, "vocabulary": 0, "none": 0}
    for key in mapped.units:
        by_source[query_source(captions.get(key), names, settings.fallback)[0]] += 1
    return {
        "images": len(mapped.units),
        "proposals": len(mapped.rows),
        "query_source": by_source,
        "resumed_images": mapped.resumed_units,
    }


def _image_rows(
    key: str,
    image: Image.Image,
    detections: list[dict],
    source: str,
    size: dict,
    stuff: set[str],
    sam,
    settings: ProposeSettings,
) -> list[dict]:
    """An image's proposals, boxes and mask areas in pixels of the original image."""
    sx = (size["original_width"] or image.width) / image.width
    sy = (size["original_height"] or image.height) / image.height
    return [
        {
            **p,
            "key": key,
            "bbox": to_original(p["bbox"], sx, sy),
            "mask_area": None if p["mask_area"] is None else p["mask_area"] * sx * sy,
            "query_source": source,
        }
        for p in image_proposals(image, detections, stuff, sam, settings)
    ]
