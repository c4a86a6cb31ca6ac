"""Toy scenes: coloured objects on a 4x4 grid, drawn with PIL, deterministic from a seed.

A scene is a 64x64 RGB image cut into a 4x4 grid of 16x16 cells. The toy CLIP uses 16x16
patches, so every image token of the model is exactly one cell: an object's box lies inside
one patch, and "does the model look at the object" has a crisp answer (the patch index
`row * 4 + col`, which is also its position among the 16 image tokens).

Each scene holds 1-4 objects in distinct cells, each with a distinct name from `OBJECTS`
and a colour from `COLOURS`. Every name has a fixed drawing (a ball is a filled disc, a key is
a ring with a toothed shaft, ...); size and offset inside the cell jitter by a few pixels.

Co-occurrence (planted bias (b), see `llava_circuits.toy`): the names in `PAIRS` tend to
appear together. When a scene draws one member of a pair, it adds the partner with
probability `cooccur` (if there is room). The same sampler makes training and benchmark
scenes, so POPE's adversarial split (absent objects that co-occur most with present ones)
picks the absent partners.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 64  # pixels per side
GRID = 4  # cells per side
CELL = IMAGE_SIZE // GRID  # pixels per cell side, = the toy CLIP's patch size
BACKGROUND = (24, 24, 32)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "green": (40, 185, 70),
    "blue": (50, 100, 240),
    "yellow": (240, 215, 40),
    "purple": (160, 70, 215),
    "orange": (250, 140, 30),
}
OBJECTS: tuple[str, ...] = (
    "ball", "box", "tent", "kite", "ring", "cross", "star", "moon",
    "cup", "key", "flag", "hammer", "house", "tree", "fish", "arrow",
)
PAIRS: tuple[tuple[str, str], ...] = (
    ("moon", "star"), ("tent", "flag"), ("house", "tree"), ("cup", "key"), ("hammer", "box"), ("ball", "kite"),
)
"""Object pairs that co-occur in scenes (planted bias (b))."""
PARTNER: dict[str, str] = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
COOCCUR = 0.4
"""Probability that a scene drawing one member of a pair also draws its partner, in training and benchmark
scenes alike. Well above chance, yet low enough that 35% of POPE-adversarial negatives are absent partners
(the room a fix of the co-occurrence bias has to show itself in)."""


@dataclass(frozen=True)
class SceneObject:
    """One drawn object."""

    name: str
    """Object word from OBJECTS."""
    colour: str
    """Colour word from COLOURS."""
    row: int
    """Grid row, 0 at the top."""
    col: int
    """Grid column, 0 at the left."""
    box: tuple[int, int, int, int]
    """Pixel box (x0, y0, x1, y1) of the drawing, x1/y1 exclusive; inside cell (row, col)."""

    @property
    def patch(self) -> int:
        """Index of the patch (and image token) that holds the object: row * GRID + col."""
        return self.row * GRID + self.col


@dataclass(frozen=True)
class Scene:
    """A toy scene: objects in reading order (row-major)."""

    objects: tuple[SceneObject, ...]

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objects]

    def get(self, name: str) -> SceneObject | None:
        return next((o for o in self.objects if o.name == name), None)

    def to_json(self) -> list[dict]:
        return [
            {"name": o.name, "colour": o.colour, "row": o.row, "col": o.col, "patch": o.patch, "box": list(o.box)}
            for o in self.objects
        ]


def sample_scene(rng: random.Random, max_objects: int = 4, cooccur: float = COOCCUR) -> Scene:
    """Draw a scene: 1..max_objects distinct names, partners of PAIRS added with prob `cooccur`."""
    k = rng.randint(1, max_objects)
    names: list[str] = []
    while len(names) < k:
        name = rng.choice([n for n in OBJECTS if n not in names])
        names.append(name)
        partner = PARTNER.get(name)
        if partner and partner not in names and len(names) < max_objects and rng.random() < cooccur:
            names.append(partner)
    cells = rng.sample(range(GRID * GRID), len(names))
    objects = []
    for name, cell in zip(names, cells):
        row, col = divmod(cell, GRID)
        size = rng.randint(10, 14)
        x0 = col * CELL + rng.randint(1, CELL - size - 1)
        y0 = row * CELL + rng.randint(1, CELL - size - 1)
        objects.append(SceneObject(name, rng.choice(list(COLOURS)), row, col, (x0, y0, x0 + size, y0 + size)))
    return Scene(tuple(sorted(objects, key=lambda o: o.patch)))


def scene_from_seed(seed: int | str) -> Scene:
    """The scene a given seed produces (same seed, same scene, on every machine)."""
    return sample_scene(random.Random(f"scene:{seed}"))


def render(scene: Scene) -> Image.Image:
    """Draw the scene as a 64x64 RGB image."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    for obj in scene.objects:  # each object on its own cell tile, so no stroke leaves its cell
        tile = Image.new("RGB", (CELL, CELL), BACKGROUND)
        ox, oy = obj.col * CELL, obj.row * CELL
        local = (obj.box[0] - ox, obj.box[1] - oy, obj.box[2] - ox, obj.box[3] - oy)
        _DRAW[obj.name](ImageDraw.Draw(tile), local, COLOURS[obj.colour])
        image.paste(tile, (ox, oy))
    return image


# --- one drawing per object name; (x0, y0, x1, y1) is the object's box, x1/y1 exclusive ----------

def _ball(d, b, c):
    d.ellipse((b[0], b[1], b[2] - 1, b[3] - 1), fill=c)


def _box(d, b, c):
    d.rectangle((b[0] + 1, b[1] + 1, b[2] - 2, b[3] - 2), fill=c)


def _tent(d, b, c):
    d.polygon([((b[0] + b[2] - 1) / 2, b[1]), (b[0], b[3] - 1), (b[2] - 1, b[3] - 1)], fill=c)


def _kite(d, b, c):
    cx, cy = (b[0] + b[2] - 1) / 2, (b[1] + b[3] - 1) / 2
    d.polygon([(cx, b[1]), (b[2] - 1, cy), (cx, b[3] - 1), (b[0], cy)], fill=c)


def _ring(d, b, c):
    d.ellipse((b[0], b[1], b[2] - 1, b[3] - 1), outline=c, width=3)


def _cross(d, b, c):
    s = b[2] - b[0]
    t = max(3, s // 3)
    m0 = b[0] + (s - t) // 2
    n0 = b[1] + (s - t) // 2
    d.rectangle((m0, b[1], m0 + t - 1, b[3] - 1), fill=c)
    d.rectangle((b[0], n0, b[2] - 1, n0 + t - 1), fill=c)


def _star(d, b, c):
    import math

    cx, cy = (b[0] + b[2] - 1) / 2, (b[1] + b[3] - 1) / 2
    r_out, r_in = (b[2] - b[0] - 1) / 2, (b[2] - b[0]) / 5
    pts = []
    for i in range(10):
        r = r_out if i % 2 == 0 else r_in
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    d.polygon(pts, fill=c)


def _moon(d, b, c):
    s = b[2] - b[0]
    d.ellipse((b[0], b[1], b[2] - 1, b[3] - 1), fill=c)
    d.ellipse((b[0] + s // 3, b[1] - 1, b[2] - 1 + s // 3, b[3] - 2), fill=BACKGROUND)


def _cup(d, b, c):
    s = b[2] - b[0]
    body_right = b[0] + (2 * s) // 3
    d.rectangle((b[0], b[1] + s // 4, body_right, b[3] - 1), fill=c)
    d.rectangle((body_right, b[1] + s // 3, b[2] - 1, b[1] + (2 * s) // 3), outline=c, width=2)


def _key(d, b, c):
    s = b[2] - b[0]
    r = s // 3
    cy = (b[1] + b[3] - 1) // 2
    d.ellipse((b[0], cy - r, b[0] + 2 * r, cy + r), outline=c, width=2)
    d.rectangle((b[0] + 2 * r, cy - 1, b[2] - 1, cy + 1), fill=c)
    d.rectangle((b[2] - 3, cy + 1, b[2] - 1, cy + r), fill=c)
    d.rectangle((b[2] - 6, cy + 1, b[2] - 5, cy + r - 1), fill=c)


def _flag(d, b, c):
    s = b[2] - b[0]
    d.rectangle((b[0], b[1], b[0] + 1, b[3] - 1), fill=c)
    d.rectangle((b[0] + 2, b[1], b[2] - 1, b[1] + s // 2), fill=c)


def _hammer(d, b, c):
    s = b[2] - b[0]
    cx = (b[0] + b[2] - 1) // 2
    d.rectangle((b[0], b[1], b[2] - 1, b[1] + s // 3), fill=c)
    d.rectangle((cx - 1, b[1] + s // 3, cx + 1, b[3] - 1), fill=c)


def _house(d, b, c):
    s = b[2] - b[0]
    roof = s * 2 // 5
    d.polygon([((b[0] + b[2] - 1) / 2, b[1]), (b[0], b[1] + roof), (b[2] - 1, b[1] + roof)], fill=c)
    d.rectangle((b[0] + 1, b[1] + roof, b[2] - 2, b[3] - 1), fill=c)
    d.rectangle(((b[0] + b[2]) // 2 - 1, b[3] - 1 - s // 3, (b[0] + b[2]) // 2, b[3] - 1), fill=BACKGROUND)


def _tree(d, b, c):
    s = b[2] - b[0]
    cx = (b[0] + b[2] - 1) / 2
    crown = s * 2 // 3
    d.polygon([(cx, b[1]), (b[0] + 1, b[1] + crown), (b[2] - 2, b[1] + crown)], fill=c)
    d.rectangle((int(cx) - 1, b[1] + crown, int(cx) + 1, b[3] - 1), fill=c)


def _fish(d, b, c):
    s = b[2] - b[0]
    cy = (b[1] + b[3] - 1) / 2
    d.ellipse((b[0], b[1] + s // 4, b[0] + s * 2 // 3, b[3] - 1 - s // 4), fill=c)
    d.polygon([(b[0] + s * 2 // 3 - 1, cy), (b[2] - 1, b[1] + s // 5), (b[2] - 1, b[3] - 1 - s // 5)], fill=c)


def _arrow(d, b, c):
    s = b[2] - b[0]
    cy = (b[1] + b[3] - 1) // 2
    d.rectangle((b[0], cy - 1, b[2] - 1 - s // 3, cy + 1), fill=c)
    d.polygon([(b[2] - 1, cy), (b[2] - 1 - s // 2, b[1] + 1), (b[2] - 1 - s // 2, b[3] - 2)], fill=c)


_DRAW = {
    "ball": _ball, "box": _box, "tent": _tent, "kite": _kite, "ring": _ring, "cross": _cross,
    "star": _star, "moon": _moon, "cup": _cup, "key": _key, "flag": _flag, "hammer": _hammer,
    "house": _house, "tree": _tree, "fish": _fish, "arrow": _arrow,
}
