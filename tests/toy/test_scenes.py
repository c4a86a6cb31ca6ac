import random

import numpy as np

from llava_circuits.toy.scenes import BACKGROUND, CELL, GRID, IMAGE_SIZE, OBJECTS, PARTNER, render, sample_scene, scene_from_seed


def test_scene_is_deterministic_from_seed():
    for seed in range(20):
        a, b = scene_from_seed(seed), scene_from_seed(seed)
        assert a == b
        assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
    assert len({scene_from_seed(s) for s in range(20)}) > 15


def test_objects_are_distinct_and_boxed_inside_their_cell():
    rng = random.Random(0)
    for _ in range(300):
        scene = sample_scene(rng)
        assert 1 <= len(scene.objects) <= 4
        assert len(set(scene.names)) == len(scene.names)
        assert len({o.patch for o in scene.objects}) == len(scene.objects)
        assert [o.patch for o in scene.objects] == sorted(o.patch for o in scene.objects)
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert o.col * CELL <= x0 < x1 <= (o.col + 1) * CELL
            assert o.row * CELL <= y0 < y1 <= (o.row + 1) * CELL
            assert o.patch == o.row * GRID + o.col


def test_pixels_outside_object_boxes_are_background():
    rng = random.Random(1)
    for _ in range(50):
        scene = sample_scene(rng)
        pixels = np.asarray(render(scene)).copy()
        assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert (pixels[y0:y1, x0:x1] != BACKGROUND).any(), f"{o.name} drew nothing"
            pixels[y0:y1, x0:x1] = BACKGROUND
        assert (pixels == BACKGROUND).all()


def test_pairs_co_occur():
    rng = random.Random(2)
    scenes = [sample_scene(rng, cooccur=0.75) for _ in range(2000)]
    with_a = [s for s in scenes if "moon" in s.names]
    together = sum("star" in s.names for s in with_a) / len(with_a)
    with_single = [s for s in scenes if "ring" in s.names]
    base = sum("star" in s.names for s in with_single) / len(with_single)
    assert together > 0.5 > base
    assert set(PARTNER) < set(OBJECTS)
