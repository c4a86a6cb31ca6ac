"""The trained toy model's localization heads point at the asked object; a random head does clearly worse."""
from pathlib import Path

import pytest

from llava_circuits.attention.commands import item_attention
from llava_circuits.attention.config import HeadSearchConfig, load_config
from llava_circuits.attention.data import toy_items
from llava_circuits.attention.heads import head_maps
from llava_circuits.attention.render import box_in_view, hot_spot, model_view
from llava_circuits.attention.stage import TOY_CONFIG, attention_stage
from llava_circuits.models.load import load_model

TOY = Path(__file__).parents[2] / "checkpoints" / "toy-llava"


@pytest.fixture(scope="module")
def toy():
    return load_model(TOY, dtype="float32")


@pytest.mark.slow
def test_top_heads_point_at_the_asked_object_and_a_random_head_does_not(toy, tmp_path):
    metrics = attention_stage(toy, tmp_path / "no-manifest", tmp_path / "out", n_search=200, n_pointing=200)
    assert metrics["pointing_accuracy_top_heads"] >= 0.8
    assert metrics["pointing_accuracy_random_head"] <= metrics["pointing_accuracy_top_heads"] - 0.3
    assert metrics["pointing_accuracy_mean_head"] <= metrics["pointing_accuracy_top_heads"] - 0.3
    assert all((tmp_path / "out" / f).exists() for f in metrics["overlays"])


@pytest.mark.slow
def test_overlay_hot_spot_sits_on_the_object(toy, tmp_path):
    metrics = attention_stage(toy, tmp_path / "no-manifest", tmp_path / "out", n_search=100, n_pointing=8, n_overlays=1)
    top = [tuple(p) for p in metrics["top_heads"]]
    items = toy_items(8, seed=2)  # the stage's held-out scenes (seed 0 + 2)
    maps = head_maps(item_attention(toy, items, load_config(TOY_CONFIG, "find_heads", HeadSearchConfig)), top)
    inside = 0
    for item, attn_map in zip(items, maps):
        view = model_view(item.image, toy.processor)
        x, y = hot_spot(attn_map, toy.anatomy.image_grid, view.size)
        x0, y0, x1, y1 = box_in_view(item.box, item.image.size, toy.processor, view.size)
        inside += x0 <= x < x1 and y0 <= y < y1
    assert inside >= 6  # of 8
