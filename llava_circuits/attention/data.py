"""Prompts about objects in images, with the object's box when known: the input of find-heads and pointing.

Sources:
- a POPE-style jsonl (`{"question_id", "image", "text", "label"}`), optionally with `"box": [x0, y0, x1, y1]`,
  the asked object's box in pixels of the original image (x1, y1 exclusive); only "yes" items are used;
- a toy manifest.json (`toy data --out DIR`): its `pope_random` file and images;
- `toy_items(n, seed)`: fresh toy scenes drawn in memory, each asking about one object that is present.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from llava_circuits.data.pope import read_pope


@dataclass
class GroundingItem:
    """A question about an object that is in the image."""

    id: str
    image: Image.Image
    question: str
    """"Is there a {object} in the image?"."""
    box: tuple[float, float, float, float] | None = None
    """The object's box (x0, y0, x1, y1) in pixels of `image`, x1/y1 exclusive; None when unknown."""
    name: str | None = None
    """The asked object's name as the question spells it (the query word of `query: object`)."""


POPE_QUESTION = re.compile(r"^Is there an? (.+?) in the (?:image|picture)\?", re.IGNORECASE)


def object_name(question: str) -> str | None:
    """The object a POPE question asks about ("Is there a dining table in the image?" -> "dining table")."""
    match = POPE_QUESTION.match(question.strip())
    return match.group(1) if match else None


def read_items(data: str | Path, images: str | Path | None = None, limit: int | None = None) -> list[GroundingItem]:
    """Present-object items of a POPE-style jsonl or of a toy manifest's pope_random split."""
    path = Path(data)
    if path.name == "manifest.json":
        entry = json.loads(path.read_text()).get("pope_random")
        if entry is None:
            raise ValueError(f"{path}: no pope_random entry; expected a manifest written by `toy data`")
        files = [Path(f) for f in entry["files"]]
        path = next(f for f in files if f.suffix in (".jsonl", ".json"))
        images = images or next((f for f in files if f.is_dir()), None)
    try:
        samples = read_pope(path, Path(images) if images else None)
    except ValueError as err:
        if "cannot tell the POPE split" not in str(err):
            raise
        samples = read_pope(path, Path(images) if images else None, split="random")
    items = []
    for s in samples:
        if s.answer != "yes":
            continue
        box = s.meta.get("box")
        items.append(GroundingItem(s.id, Image.open(s.image).convert("RGB"), s.question,
                                   tuple(float(v) for v in box) if box is not None else None, object_name(s.question)))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise ValueError(f"{path}: no items with label 'yes' (present objects) to localize")
    return items


def toy_items(n: int, seed: int = 0) -> list[GroundingItem]:
    """n toy scenes (not those of training or `toy data`), each with a question about one present object."""
    from llava_circuits.toy.scenes import render, sample_scene
    from llava_circuits.toy.tasks import pope_question

    rng = random.Random(f"attention-pointing:{seed}")
    items = []
    for i in range(n):
        scene = sample_scene(rng)
        obj = rng.choice(scene.objects)
        box = tuple(float(v) for v in obj.box)
        items.append(GroundingItem(f"toy-{seed}-{i}", render(scene), pope_question(obj.name), box, obj.name))
    return items
