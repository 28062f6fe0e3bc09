"""Embedded demo world: seeded drawn scenes that stand in for LAION images.

Every scene is fully known (objects, colours, boxes, background bands), so one
generator yields images, noisy alt-texts, reference dense captions and
fine-grained benchmark pairs without a GPU, network access or model weights.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

T = TypeVar("T")
RGB = tuple[int, int, int]
XYWH = tuple[int, int, int, int]

COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 215, 40),
    "green": (50, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (245, 130, 180),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "brown": (130, 80, 40),
}
SIZES = {"small": 0.25, "medium": 0.38, "large": 0.52}  # of the shorter image side
SIZE_PHRASE = {"small": "small", "medium": "medium-sized", "large": "large"}
DARK: RGB = (30, 30, 30)
BROKEN_KINDS = ("missing", "not_image", "truncated")
DEFAULT_BROKEN = {"missing": 2, "not_image": 2, "truncated": 2}
NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()


# ---------------------------------------------------------------- object classes
def _unit(points: list[tuple[float, float]]) -> tuple[float, ...]:
    """Flattened points rescaled to span the unit square, so the shape touches every bbox edge."""
    (u0, v0), (u1, v1) = np.min(points, axis=0), np.max(points, axis=0)
    return tuple(float(c) for u, v in points for c in ((u - u0) / (u1 - u0), (v - v0) / (v1 - v0)))


_STAR = _unit(
    [
        (r * math.cos(math.radians(-90 + 36 * k)), r * math.sin(math.radians(-90 + 36 * k)))
        for k, r in enumerate([1.0, 0.45] * 5)
    ]
)
_ARC = [math.pi / 2 + math.pi * k / 23 for k in range(24)]
# Crescent "(": an outer half-ellipse bulging left, then a flatter inner one back.
_MOON = _unit(
    [(1 + math.cos(t), -math.sin(t)) for t in _ARC]
    + [(1 + 0.45 * math.cos(t), -math.sin(t)) for t in reversed(_ARC)]
)


def _ring(d: ImageDraw.ImageDraw, xy: list[float], fill: RGB) -> None:
    d.ellipse(xy, outline=fill, width=max(2, round(min(xy[2] - xy[0], xy[3] - xy[1]) / 4)))


# A part is (primitive, flat x, y pairs as bbox fractions, paint); paint "c" is the object colour.
Part = tuple[str, tuple[float, ...], str]
_PRIMITIVES: dict[str, Callable[[ImageDraw.ImageDraw, list[float], RGB], None]] = {
    "rect": lambda d, xy, fill: d.rectangle(xy, fill=fill),
    "ellipse": lambda d, xy, fill: d.ellipse(xy, fill=fill),
    "ring": _ring,
    "pie": lambda d, xy, fill: d.pieslice(xy, 180, 360, fill=fill),  # upper half
    "arc": lambda d, xy, fill: d.arc(xy, 0, 180, fill=fill),  # lower half
    "line": lambda d, xy, fill: d.line(xy, fill=fill),
    "poly": lambda d, xy, fill: d.polygon(xy, fill=fill),
}


@dataclass(frozen=True)
class ObjectClass:
    aspect: float  # bbox width / height
    shape: str  # what the drawing looks like, for captions
    parts: tuple[Part, ...]  # painted in order


def _cls(aspect: float, shape: str, *parts: Part) -> ObjectClass:
    return ObjectClass(aspect, shape, parts)


CLASSES: dict[str, ObjectClass] = {
    "ball": _cls(
        1.0,
        "a circle with a white highlight",
        ("ellipse", (0, 0, 1, 1), "c"),
        ("ellipse", (0.25, 0.2, 0.4, 0.35), "white"),
    ),
    "box": _cls(
        1.0,
        "a square with a darker lid line",
        ("rect", (0, 0, 1, 1), "c"),
        ("rect", (0, 0.2, 1, 0.27), "shade"),
    ),
    "pyramid": _cls(
        1.2,
        "a triangle standing on its base",
        ("poly", (0, 1, 1, 1, 0.5, 0), "c"),
        ("poly", (0.5, 0, 1, 1, 0.6, 1), "shade"),
    ),
    "star": _cls(1.0, "a five-pointed star", ("poly", _STAR, "c")),
    "ring": _cls(1.0, "a thick round band with a hole in the middle", ("ring", (0, 0, 1, 1), "c")),
    "cross": _cls(
        1.0,
        "a plus sign with equal arms",
        ("rect", (1 / 3, 0, 2 / 3, 1), "c"),
        ("rect", (0, 1 / 3, 1, 2 / 3), "c"),
    ),
    "kite": _cls(
        0.8,
        "a diamond trailing a thin tail",
        ("line", (0.35, 0.7, 1, 1), "dark"),
        ("poly", (0.35, 0, 0.7, 0.3, 0.35, 0.7, 0, 0.3), "c"),
    ),
    "house": _cls(
        0.9,
        "a square front under a triangular roof with a dark door",
        ("rect", (0.1, 0.4, 0.9, 1), "c"),
        ("poly", (0, 0.4, 1, 0.4, 0.5, 0), "shade"),
        ("rect", (0.42, 0.7, 0.58, 1), "dark"),
    ),
    "car": _cls(
        1.8,
        "a long body and cabin on two black wheels",
        ("poly", (0.2, 0.4, 0.29, 0, 0.65, 0, 0.8, 0.4), "c"),
        ("rect", (0, 0.4, 1, 0.8), "c"),
        ("ellipse", (0.12, 0.6, 0.36, 1), "dark"),
        ("ellipse", (0.64, 0.6, 0.88, 1), "dark"),
    ),
    "tree": _cls(
        0.7,
        "a pointed crown on a brown trunk",
        ("rect", (0.4, 0.6, 0.6, 1), "brown"),
        ("poly", (0, 0.7, 1, 0.7, 0.5, 0), "c"),
    ),
    "mushroom": _cls(
        0.9,
        "a domed cap with white spots on a pale stem",
        ("rect", (0.35, 0.45, 0.65, 1), "stem"),
        ("pie", (0, 0, 1, 0.9), "c"),
        ("ellipse", (0.25, 0.2, 0.37, 0.3), "white"),
        ("ellipse", (0.6, 0.2, 0.72, 0.3), "white"),
    ),
    "umbrella": _cls(
        1.1,
        "an open half-round canopy on a hooked handle",
        ("pie", (0, 0, 1, 1.1), "c"),
        ("line", (0.5, 0.55, 0.5, 0.9), "dark"),
        ("arc", (0.3, 0.8, 0.5, 1), "dark"),
    ),
    "fish": _cls(
        1.6,
        "an oval body with a triangular tail and a small eye",
        ("poly", (0.62, 0.5, 1, 0, 1, 1), "shade"),
        ("ellipse", (0, 0.1, 0.72, 0.9), "c"),
        ("ellipse", (0.14, 0.35, 0.22, 0.45), "dark"),
    ),
    "cup": _cls(
        1.0,
        "a tapered mug with a round handle",
        ("ring", (0.55, 0.2, 1, 0.7), "c"),
        ("poly", (0, 0, 0.75, 0, 0.65, 1, 0.1, 1), "c"),
    ),
    "flag": _cls(
        1.0,
        "a rectangle flying from a dark pole",
        ("rect", (0, 0, 0.08, 1), "dark"),
        ("rect", (0.08, 0, 1, 0.55), "c"),
    ),
    "sailboat": _cls(
        0.9,
        "a hull with triangular sails on a mast",
        ("rect", (0.47, 0, 0.53, 0.72), "dark"),
        ("poly", (0.55, 0, 0.55, 0.65, 0.95, 0.65), "c"),
        ("poly", (0.45, 0.15, 0.45, 0.65, 0.1, 0.65), "shade"),
        ("poly", (0, 0.72, 1, 0.72, 0.8, 1, 0.2, 1), "c"),
    ),
    "clock": _cls(
        1.0,
        "a round rim around a white dial with two black hands",
        ("ellipse", (0, 0, 1, 1), "c"),
        ("ellipse", (0.17, 0.17, 0.83, 0.83), "white"),
        ("line", (0.5, 0.25, 0.5, 0.5), "dark"),
        ("line", (0.5, 0.5, 0.72, 0.5), "dark"),
    ),
    "moon": _cls(0.6, "a thin crescent", ("poly", _MOON, "c")),
}


def _draw_object(
    d: ImageDraw.ImageDraw,
    bbox: XYWH,
    colour: RGB,
    parts: tuple[Part, ...],
    ink: int | None = None,
) -> None:
    """Paint the parts in order; ``ink`` paints every part in that one value (a mask canvas)."""
    x0, y0, w, h = bbox[0], bbox[1], bbox[2] - 1, bbox[3] - 1  # PIL corners are inclusive
    paints = {
        "c": colour,
        "shade": tuple(int(v * 0.65) for v in colour),
        "dark": DARK,
        "white": (255, 255, 255),
        "brown": COLOURS["brown"],
        "stem": (235, 225, 200),
    }
    for primitive, geometry, paint in parts:
        xy = [x0 + g * w if k % 2 == 0 else y0 + g * h for k, g in enumerate(geometry)]
        _PRIMITIVES[primitive](d, xy, paints[paint] if ink is None else ink)


# ---------------------------------------------------------------- background bands
@dataclass(frozen=True)
class BandStyle:
    tier: str  # "upper" or "lower"
    rgb: RGB
    clashes: tuple[str, ...]  # object colours that would vanish against this band
    description: str
    short: str  # setting phrase for the short caption


BANDS: dict[str, BandStyle] = {
    "sky": BandStyle(
        "upper",
        (110, 170, 235),
        ("blue",),
        "a clear blue sky that gets lighter toward the horizon",
        "under a blue sky",
    ),
    "wall": BandStyle(
        "upper",
        (170, 70, 50),
        ("red", "brown"),
        "a red brick wall with pale mortar lines",
        "by a brick wall",
    ),
    "night sky": BandStyle(
        "upper",
        (15, 20, 45),
        ("black",),
        "a dark night sky dotted with tiny white stars",
        "under a night sky",
    ),
    "grass": BandStyle(
        "lower", (70, 150, 60), ("green",), "green grass with short darker blades", "on grass"
    ),
    "water": BandStyle(
        "lower",
        (40, 100, 180),
        ("blue",),
        "blue water with light rippling wave lines",
        "over water",
    ),
    "sand": BandStyle(
        "lower", (225, 200, 140), ("yellow",), "pale yellow sand with small brown specks", "on sand"
    ),
    "road": BandStyle(
        "lower",
        (80, 80, 85),
        ("black",),
        "a grey asphalt road with white dashed stripes",
        "on a road",
    ),
    "snow": BandStyle(
        "lower", (240, 242, 248), ("white",), "smooth white snow with faint blue shadows", "on snow"
    ),
}
_MARKS = {
    "night sky": (250, 250, 250),
    "grass": (40, 110, 35),
    "sand": (170, 140, 90),
    "snow": (200, 210, 235),
}
_MORTAR = (205, 195, 180)


def _texture(d: ImageDraw.ImageDraw, name: str, bbox: XYWH, rng: np.random.Generator) -> None:
    x0, y0, w, h = bbox
    x1, y1, c = x0 + w - 1, y0 + h - 1, BANDS[name].rgb
    step = max(3, h // 6)
    d.rectangle((x0, y0, x1, y1), fill=c)
    if name == "sky":  # fade toward a pale horizon
        for y in range(y0, y1 + 1):
            t = 0.5 * (y - y0) / max(1, h - 1)
            d.line((x0, y, x1, y), fill=tuple(int(v + (250 - v) * t) for v in c))
    elif name == "wall":  # staggered bricks
        for k, y in enumerate(range(y0, y1 + 1, step)):
            d.line((x0, y, x1, y), fill=_MORTAR)
            for x in range(x0 + (k % 2) * step, x1 + 1, 2 * step):
                d.line((x, y, x, min(y + step, y1)), fill=_MORTAR)
    elif name == "water":
        for y in range(y0 + step // 2, y1, step):
            for x in range(x0, x1, 2 * step):
                d.arc((x, y, x + 2 * step, y + step), 200, 340, fill=(150, 190, 235))
    elif name == "road":  # dashed centre line
        ym = y0 + h // 2
        for x in range(x0, x1, max(4, w // 5)):
            d.line((x, ym, x + max(2, w // 10), ym), fill=(240, 240, 240), width=max(1, h // 20))
    else:  # scattered stars, grass blades, sand specks or snow shadows
        n, tall = max(1, w * h // 40), 2 if name == "grass" else 0
        xs, ys = rng.integers(x0, x1 + 1, n).tolist(), rng.integers(y0, y1 + 1, n).tolist()
        for x, y in zip(xs, ys, strict=True):
            d.line((x, y, x, min(y + tall, y1)), fill=_MARKS[name])


# ---------------------------------------------------------------- scenes
@dataclass(frozen=True)
class SceneObject:
    label: str
    colour: str
    size: str
    bbox: XYWH  # x, y, w, h in pixels
    position: str  # 3x3 grid cell of the bbox centre, e.g. "upper left"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    upper: str
    lower: str
    split: int  # first pixel row of the lower band
    objects: tuple[SceneObject, ...]  # drawing order: later objects are in front
    variant: int  # caption template family, kept by perturb so pairs share phrasing
    texture_seed: int

    def band_bbox(self, tier: str) -> XYWH:
        if tier == "upper":
            return (0, 0, self.width, self.split)
        return (0, self.split, self.width, self.height - self.split)


_GRID = (
    ("upper left", "upper middle", "upper right"),
    ("middle left", "center", "middle right"),
    ("lower left", "lower middle", "lower right"),
)


def _centre(bbox: XYWH) -> tuple[float, float]:
    return bbox[0] + bbox[2] / 2, bbox[1] + bbox[3] / 2


def _allowed_colours(upper: str, lower: str) -> list[str]:
    return [c for c in COLOURS if c not in BANDS[upper].clashes + BANDS[lower].clashes]


def _pick(rng: np.random.Generator, seq: Sequence[T]) -> T:
    return seq[int(rng.integers(len(seq)))]


def make_scene(
    rng: np.random.Generator, width: int, height: int, objects_per_image: tuple[int, int] = (2, 5)
) -> Scene:
    lo, hi = objects_per_image
    if not 1 <= lo <= hi:
        raise ValueError(f"objects_per_image must satisfy 1 <= lo <= hi, got {objects_per_image}")
    upper = _pick(rng, [n for n, b in BANDS.items() if b.tier == "upper"])
    lower = _pick(rng, [n for n, b in BANDS.items() if b.tier == "lower"])
    split = int(rng.integers(int(0.3 * height), int(0.65 * height) + 1))
    colours, objects = _allowed_colours(upper, lower), []
    for _ in range(int(rng.integers(lo, hi + 1))):
        # Unique (colour, label) pairs, so "the red ball" always names exactly one object.
        label, colour = _pick(rng, list(CLASSES)), _pick(rng, colours)
        while any(o.label == label and o.colour == colour for o in objects):
            label, colour = _pick(rng, list(CLASSES)), _pick(rng, colours)
        size, aspect = _pick(rng, list(SIZES)), CLASSES[label].aspect
        side = SIZES[size] * min(width, height) * float(rng.uniform(0.9, 1.1))
        w, h = (side, side / aspect) if aspect > 1 else (side * aspect, side)
        w, h = max(4, min(width, round(w))), max(4, min(height, round(h)))
        bbox = (int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h)
        cx, cy = _centre(bbox)
        position = _GRID[min(2, int(3 * cy / height))][min(2, int(3 * cx / width))]
        objects.append(SceneObject(label, colour, size, bbox, position))
    return Scene(
        width,
        height,
        upper,
        lower,
        split,
        tuple(objects),
        variant=int(rng.integers(3)),
        texture_seed=int(rng.integers(2**31)),
    )


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.width, scene.height))
    d = ImageDraw.Draw(img)
    for k, (tier, name) in enumerate((("upper", scene.upper), ("lower", scene.lower))):
        # Per-band texture streams: changing one band leaves the other's pixels alone.
        _texture(d, name, scene.band_bbox(tier), np.random.default_rng([scene.texture_seed, k]))
    for o in scene.objects:
        _draw_object(d, o.bbox, COLOURS[o.colour], CLASSES[o.label].parts)
    return img


def _silhouette(scene: Scene, o: SceneObject) -> np.ndarray:
    """Boolean H x W: every pixel ``render`` paints for the object, whatever the paint."""
    canvas = Image.new("L", (scene.width, scene.height))
    _draw_object(ImageDraw.Draw(canvas), o.bbox, (255, 255, 255), CLASSES[o.label].parts, ink=255)
    return np.asarray(canvas) > 0


def object_masks(scene: Scene) -> list[np.ndarray]:
    """Each object's visible pixels (boolean H x W, in ``scene.objects`` order): its
    silhouette minus the pixels of the objects drawn after it."""
    masks, in_front = [], np.zeros((scene.height, scene.width), dtype=bool)
    for o in reversed(scene.objects):
        silhouette = _silhouette(scene, o)
        masks.append(silhouette & ~in_front)
        in_front |= silhouette
    return masks[::-1]


def band_masks(scene: Scene) -> list[np.ndarray]:
    """The upper and the lower band's visible pixels (boolean H x W): the band minus objects."""
    objects = np.zeros((scene.height, scene.width), dtype=bool)
    for mask in object_masks(scene):
        objects |= mask
    bands = []
    for tier in ("upper", "lower"):
        x, y, w, h = scene.band_bbox(tier)
        band = np.zeros_like(objects)
        band[y : y + h, x : x + w] = True
        bands.append(band & ~objects)
    return bands


# ---------------------------------------------------------------- text
def _ref(o: SceneObject) -> str:
    return f"the {o.colour} {o.label}"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _overlap(a: XYWH, b: XYWH) -> int:
    return max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])) * max(
        0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    )


def _direction(a: SceneObject, b: SceneObject) -> str:
    """Where a lies relative to b, along the dominant axis between their centres."""
    (ax, ay), (bx, by) = _centre(a.bbox), _centre(b.bbox)
    if abs(ax - bx) >= abs(ay - by):
        return "to the right of" if ax > bx else "to the left of"
    return "below" if ay > by else "above"


def _nearest(scene: Scene, i: int, candidates: Sequence[int]) -> SceneObject:
    here = _centre(scene.objects[i].bbox)
    best = min(candidates, key=lambda j: math.dist(here, _centre(scene.objects[j].bbox)))
    return scene.objects[best]


def _percent(scene: Scene) -> int:
    return 5 * round(20 * scene.split / scene.height)


_SETTINGS = (
    "The upper {p}% of the picture shows {u}, and {l} lies below.",
    "{U} fills the top {p}% of the image above {l}.",
    "The scene is set against {u} over {l}, split about {p}% down.",
)
_COUNTS = (
    "{N} objects are drawn in front.",
    "There are {n} objects.",
    "{N} objects stand out against it.",
)
_OBJECT_SENTENCES = (
    "There is a {s} {c} {l} {w}, drawn as {shape}.",
    "{W} is a {s} {c} {l}, {shape}.",
    "A {s} {c} {l}, {shape}, sits {w}.",
    "A {s} {c} {l} {w} shows {shape}.",
)
_IN_FRONT = (
    "{A} is in front of {b}.",
    "{A} partly covers {b}.",
    "{B} is partly hidden behind {a}.",
)
_BESIDE = ("{A} is {r} {b}.", "Seen together, {a} lies {r} {b}.", "{A} sits {r} {b}.")


def long_caption(scene: Scene) -> str:
    """Dense paragraph: both bands, each object's size, colour, shape and place, then relations."""
    v, n = scene.variant, len(scene.objects)
    u, lo = BANDS[scene.upper].description, BANDS[scene.lower].description
    count = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    parts = [
        _SETTINGS[v].format(u=u, U=_cap(u), l=lo, p=_percent(scene)),
        _COUNTS[v].format(n=count, N=_cap(count)),
    ]
    for k, o in enumerate(scene.objects):
        where = f"in the {o.position}"
        parts.append(
            _OBJECT_SENTENCES[(v + k) % 4].format(
                s=SIZE_PHRASE[o.size],
                c=o.colour,
                l=o.label,
                w=where,
                W=_cap(where),
                shape=CLASSES[o.label].shape,
            )
        )
    for k in range(1, n):
        a = scene.objects[k]
        covered = [j for j in range(k) if _overlap(a.bbox, scene.objects[j].bbox)]
        if covered:  # drawn later, so it is the one in front
            b = scene.objects[max(covered, key=lambda j: _overlap(a.bbox, scene.objects[j].bbox))]
            template, r = _IN_FRONT[(v + k) % 3], ""
        else:
            b = _nearest(scene, k, range(k))
            template, r = _BESIDE[(v + k) % 3], _direction(a, b)
        parts.append(template.format(a=_ref(a), A=_cap(_ref(a)), b=_ref(b), B=_cap(_ref(b)), r=r))
    return " ".join(parts)


def short_caption(scene: Scene) -> str:
    """One sentence naming up to three of the largest objects and the setting."""
    by_area = sorted(scene.objects, key=lambda o: -o.bbox[2] * o.bbox[3])[:3]
    names = [f"{o.colour} {o.label}" for o in scene.objects if o in by_area]
    if len(scene.objects) > 3:
        rest = len(scene.objects) - 3
        names.append(f"{rest} other shape{'s' if rest > 1 else ''}")
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{_cap(listed)} {BANDS[scene.lower].short} {BANDS[scene.upper].short}."


_MARKETING = (
    "Buy cheap {l} toys online | Free shipping",
    "{L} stock photo - royalty free image",
    "Best {l} deals | Shop now",
    "{l} wallpaper HD download",
)
_FILENAMES = ("IMG_{:04d}.JPG", "DSC{:05d}.jpg", "photo_{:04d}.jpeg")


def alt_text(scene: Scene, rng: np.random.Generator) -> str:
    """LAION-like noisy alt-text: partial, camera filename, spam, incomplete or empty."""
    kind = int(rng.choice(5, p=[0.35, 0.15, 0.15, 0.25, 0.10]))
    o = _pick(rng, scene.objects)
    if kind == 0:
        return f"{o.colour} {o.label} on {scene.lower}"
    if kind == 1:
        return _pick(rng, _FILENAMES).format(int(rng.integers(10000)))
    if kind == 2:
        return _pick(rng, _MARKETING).format(l=o.label, L=_cap(o.label))
    if kind == 3:
        labels = " and ".join(sorted({x.label for x in scene.objects})[:3])
        return _pick(
            rng,
            (f"{o.label} picture", f"cute {o.label}", f"{o.label} in the {scene.upper}", labels),
        )
    return ""


def _band_caption(scene: Scene, tier: str) -> str:
    name = scene.upper if tier == "upper" else scene.lower
    pct = _percent(scene) if tier == "upper" else 100 - _percent(scene)
    side = "top" if tier == "upper" else "bottom"
    text = f"{_cap(BANDS[name].description)}, covering the {side} {pct}% of the image"
    front = [_ref(o) for o in scene.objects if _overlap(o.bbox, scene.band_bbox(tier))]
    if not front:
        return text + ", with nothing in front of it."
    if len(front) > 2:
        more = len(front) - 2
        front = [f"{front[0]}, {front[1]}", f"{more} more object{'s' if more > 1 else ''}"]
    return f"{text}, partly covered by {' and '.join(front)}."


def region_caption(scene: Scene, i: int) -> str:
    """Caption of region i: the objects in drawing order, then the upper and the lower band."""
    n = len(scene.objects)
    if i >= n:
        return _band_caption(scene, "upper" if i == n else "lower")
    o = scene.objects[i]
    backdrop = scene.upper if _centre(o.bbox)[1] < scene.split else scene.lower
    first = (
        f"A {SIZE_PHRASE[o.size]} {o.colour} {o.label}, {CLASSES[o.label].shape}, "
        f"in the {o.position}, set against the {backdrop}."
    )
    behind = [j for j in range(i + 1, n) if _overlap(o.bbox, scene.objects[j].bbox)]
    covers = [j for j in range(i) if _overlap(o.bbox, scene.objects[j].bbox)]
    if behind:
        return f"{first} It is partly hidden behind {_ref(scene.objects[behind[0]])}."
    if covers:
        return f"{first} It partly covers {_ref(scene.objects[covers[-1]])}."
    if n == 1:
        return f"{first} It stands alone in the scene."
    other = _nearest(scene, i, [j for j in range(n) if j != i])
    return f"{first} It stands {_direction(o, other)} {_ref(other)}."


# ---------------------------------------------------------------- benchmark pairs
Edit = tuple[Scene, str]


def _swap_object_attr(scene: Scene, rng: np.random.Generator, attr: str) -> Edit | None:
    """Recolour an object or change its class in place, keeping (colour, label) pairs unique."""
    pool = _allowed_colours(scene.upper, scene.lower) if attr == "colour" else list(CLASSES)
    taken = {(p.colour, p.label) for p in scene.objects}
    for i in rng.permutation(len(scene.objects)).tolist():
        o = scene.objects[i]
        options = [
            c for c in (replace(o, **{attr: x}) for x in pool) if (c.colour, c.label) not in taken
        ]
        if options:
            new = _pick(rng, options)
            objects = scene.objects[:i] + (new,) + scene.objects[i + 1 :]
            change = f"{attr} of object {i}: {getattr(o, attr)} -> {getattr(new, attr)}"
            return replace(scene, objects=objects), change
    return None


def _swap_band(scene: Scene, rng: np.random.Generator) -> Edit | None:
    used = {o.colour for o in scene.objects}
    for tier in ("upper", "lower") if rng.integers(2) else ("lower", "upper"):
        old = getattr(scene, tier)
        options = [
            n
            for n, b in BANDS.items()
            if b.tier == tier and n != old and used.isdisjoint(b.clashes)
        ]
        if options:
            new = _pick(rng, options)
            return replace(scene, **{tier: new}), f"{tier} background: {old} -> {new}"
    return None


def perturb(scene: Scene, rng: np.random.Generator) -> Edit:
    """Copy of the scene differing in one attribute: an object colour or class, or a band."""
    for k in rng.permutation(3).tolist():
        edit = (
            _swap_band(scene, rng)
            if k == 2
            else _swap_object_attr(scene, rng, ("colour", "label")[k])
        )
        if edit is not None:
            return edit
    raise ValueError("no single-attribute change keeps this scene valid")


# ---------------------------------------------------------------- writing the world
URLS_SCHEMA = pa.schema(
    [("url", pa.string()), ("caption", pa.string()), ("width", pa.int64()), ("height", pa.int64())]
)
REGION_TYPE = pa.struct(
    [
        ("label", pa.string()),
        ("bbox", pa.list_(pa.float64())),
        ("caption", pa.string()),
        ("kind", pa.string()),
        ("score", pa.float64()),
    ]
)
REFERENCE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("short_caption", pa.string()),
        ("long_caption", pa.string()),
        ("regions", pa.list_(REGION_TYPE)),
        ("source", pa.string()),
        ("seed", pa.int64()),
    ]
)
_NOT_IMAGE = (
    "<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
)


def _broken_counts(n_broken: dict[str, int] | None) -> dict[str, int]:
    if n_broken is None:
        return dict(DEFAULT_BROKEN)
    if unknown := sorted(set(n_broken) - set(BROKEN_KINDS)):
        raise ValueError(f"unknown broken kinds {unknown}; expected some of {BROKEN_KINDS}")
    return {k: n_broken.get(k, 0) for k in BROKEN_KINDS}


def planned_url_rows(n_images: int, n_broken: dict[str, int] | None = None) -> int:
    """Rows of urls.parquet: good, broken, empty url, bad scheme, and a duplicate if any good."""
    return n_images + sum(_broken_counts(n_broken).values()) + 2 + (1 if n_images else 0)


def regions(scene: Scene) -> list[dict]:
    """Reference regions in release format, in region_caption's index order."""
    n = len(scene.objects)
    labels = [o.label for o in scene.objects] + [scene.upper, scene.lower]
    boxes = [o.bbox for o in scene.objects] + [scene.band_bbox("upper"), scene.band_bbox("lower")]
    return [
        {
            "label": labels[i],
            "bbox": [float(v) for v in boxes[i]],
            "caption": region_caption(scene, i),
            "kind": "foreground" if i < n else "background",
            "score": 1.0,
        }
        for i in range(n + 2)
    ]


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def as_downloaded(scene: Scene) -> Image.Image:
    """The scene as the workflow's stages read it: rendered and stored as the demo's JPEG, so
    models trained on it see the same compression artefacts."""
    return Image.open(io.BytesIO(_jpeg(render(scene)))).convert("RGB")


# write_world spawns streams 0-2 of SeedSequence(seed); the classification set takes the next.
_CLASSIFY_STREAM = 3


def _single_object_scene(rng: np.random.Generator, label: str, width: int, height: int) -> Scene:
    """Random bands with one object of the given class in a random allowed colour, size, place."""
    upper = _pick(rng, [n for n, b in BANDS.items() if b.tier == "upper"])
    lower = _pick(rng, [n for n, b in BANDS.items() if b.tier == "lower"])
    split = int(rng.integers(int(0.3 * height), int(0.65 * height) + 1))
    colour, size = _pick(rng, _allowed_colours(upper, lower)), _pick(rng, list(SIZES))
    side = SIZES[size] * min(width, height) * float(rng.uniform(0.9, 1.1))
    aspect = CLASSES[label].aspect
    w, h = (side, side / aspect) if aspect > 1 else (side * aspect, side)
    w, h = max(4, min(width, round(w))), max(4, min(height, round(h)))
    bbox = (int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h)
    cx, cy = _centre(bbox)
    position = _GRID[min(2, int(3 * cy / height))][min(2, int(3 * cx / width))]
    obj = SceneObject(label, colour, size, bbox, position)
    texture_seed = int(rng.integers(2**31))
    return Scene(width, height, upper, lower, split, (obj,), variant=0, texture_seed=texture_seed)


def write_classification_set(
    out_dir: Path, *, per_class: int, width: int, height: int, seed: int
) -> dict:
    """Zero-shot classification set in ImageFolder layout: out_dir/<class>/<i:04d>.jpg.

    Each class draws from its own child stream, so a class's images do not depend on
    per_class beyond their count, nor on the other classes.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    stream = np.random.SeedSequence(seed, spawn_key=(_CLASSIFY_STREAM,))
    for label, child in zip(CLASSES, stream.spawn(len(CLASSES)), strict=True):
        rng = np.random.default_rng(child)
        (out_dir / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            scene = _single_object_scene(rng, label, width, height)
            (out_dir / label / f"{i:04d}.jpg").write_bytes(_jpeg(render(scene)))
    return {"classes": len(CLASSES), "per_class": per_class, "images": len(CLASSES) * per_class}


def file_url(path: Path) -> str:
    """file:// URL of an absolute path; a relative path stays relative (``file:results/...``),
    read from the working directory, so keys (md5 of the URL) and with them shards and training
    order do not depend on where the checkout is."""
    return f"file://{path}" if path.is_absolute() else f"file:{path.as_posix()}"


def write_world(
    out_dir: Path,
    *,
    n_images: int,
    n_benchmark_pairs: int,
    width: int,
    height: int,
    seed: int,
    objects_per_image: tuple[int, int] = (2, 5),
    n_broken: dict[str, int] | None = None,
    url_key: Callable[[str], str],
    classify_per_class: int = 0,
) -> dict:
    """Write images, urls.parquet, reference.parquet and the benchmark; return counts.

    classify_per_class > 0 also writes the classification set to out_dir/classify/.
    """
    counts = _broken_counts(n_broken)
    # Independent streams: the benchmark stays held out and does not shift with n_images.
    rng, noise, bench = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    for sub in ("images", "broken", "benchmark/image", "benchmark/caption"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    size = {"width": width, "height": height}

    good, reference = [], []
    for i in range(n_images):
        scene = make_scene(rng, width, height, objects_per_image)
        path = out_dir / "images" / f"{i:06d}.jpg"
        path.write_bytes(_jpeg(render(scene)))
        url = file_url(path)
        good.append({"url": url, "caption": alt_text(scene, rng), **size})
        reference.append(
            {
                "key": url_key(url),
                "url": url,
                **size,
                "short_caption": short_caption(scene),
                "long_caption": long_caption(scene),
                "regions": regions(scene),
                "source": "demo_world",
                "seed": seed,
            }
        )

    bad = []
    for kind in BROKEN_KINDS:
        for k in range(counts[kind]):
            scene = make_scene(noise, width, height, objects_per_image)
            path = out_dir / "broken" / f"{kind}_{k:03d}.jpg"
            if kind == "not_image":
                path.write_text(_NOT_IMAGE)
            elif kind == "truncated":
                data = _jpeg(render(scene))
                path.write_bytes(data[: len(data) // 3])
            bad.append({"url": file_url(path), "caption": alt_text(scene, noise), **size})
    for url in ("", "ftp://example.invalid/a.jpg"):
        scene = make_scene(noise, width, height, objects_per_image)
        bad.append({"url": url, "caption": alt_text(scene, noise), **size})

    order = noise.permutation(len(good) + len(bad)).tolist()
    rows = [(good + bad)[j] for j in order]
    if good:
        # The duplicate comes after its original, so first-wins dedup keeps the real row.
        pos = _pick(noise, [p for p, j in enumerate(order) if j < len(good)])
        duplicate = {**rows[pos], "caption": reference[order[pos]]["short_caption"]}
        rows.insert(int(noise.integers(pos + 1, len(rows) + 1)), duplicate)
    pq.write_table(pa.Table.from_pylist(rows, schema=URLS_SCHEMA), out_dir / "urls.parquet")
    pq.write_table(
        pa.Table.from_pylist(reference, schema=REFERENCE_SCHEMA), out_dir / "reference.parquet"
    )

    bench_dir = out_dir / "benchmark"
    for j in range(n_benchmark_pairs):
        scene = make_scene(bench, width, height, objects_per_image)
        for k, member in enumerate((scene, perturb(scene, bench)[0])):
            name = f"{2 * j + k:05d}"
            (bench_dir / "image" / f"{name}.jpg").write_bytes(_jpeg(render(member)))
            (bench_dir / "caption" / f"{name}.txt").write_text(long_caption(member) + "\n")

    summary = {
        "images": n_images,
        "url_rows": len(rows),
        "broken": counts,
        "invalid_urls": 2,
        "duplicate_urls": 1 if good else 0,
        "benchmark_pairs": n_benchmark_pairs,
        "benchmark_images": 2 * n_benchmark_pairs,
        "width": width,
        "height": height,
        "seed": seed,
    }
    # Only when asked, so the default summary.json stays byte-identical.
    if classify_per_class > 0:
        classify = write_classification_set(
            out_dir / "classify",
            per_class=classify_per_class,
            width=width,
            height=height,
            seed=seed,
        )
        summary["classify_images"] = classify["images"]
    return summary
