import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from llava_circuits.attention.render import (box_in_view, cell_centre, hot_spot, model_view, save_overlay,
                                             upsample, write_run_log)
from llava_circuits.models.tiny import tiny_processor


def planted(grid: tuple[int, int], cell: int) -> torch.Tensor:
    attn_map = torch.full((grid[0] * grid[1],), 0.01)
    attn_map[cell] = 0.5
    return attn_map


@pytest.mark.parametrize("grid, size, cell", [
    ((4, 4), (64, 64), 9), ((24, 24), (336, 336), 24 * 5 + 17), ((4, 4), (32, 32), 15),
])
def test_hot_spot_of_the_upsampled_map_sits_on_the_planted_cell(grid, size, cell):
    x, y = hot_spot(planted(grid, cell), grid, size)
    row, col = divmod(cell, grid[1])
    assert int(y * grid[0] / size[1]) == row and int(x * grid[1] / size[0]) == col
    assert cell_centre(cell, grid, size) == ((col + 0.5) * size[0] / grid[1], (row + 0.5) * size[1] / grid[0])


def test_upsample_is_bilinear_and_keeps_a_flat_map_flat():
    np.testing.assert_allclose(upsample(np.full((4, 4), 0.25), (40, 20)), np.full((20, 40), 0.25))
    up = upsample(np.array([[0.0, 1.0]]), (4, 1))  # centres of the two cells at x = 0.5 and 2.5 (pixel units)
    np.testing.assert_allclose(up, [[0.0, 0.25, 0.75, 1.0]])


def test_overlay_png_shows_the_hot_spot_on_the_planted_cell(tmp_path):
    view = Image.new("RGB", (64, 64), (128, 128, 128))
    path = save_overlay(view, planted((4, 4), 9), (4, 4), tmp_path / "step000.png", "step 0 -> 'Yes'", alpha=1.0)
    png = np.asarray(Image.open(path).convert("RGB")).astype(int)
    r, g, b = png[..., 0], png[..., 1], png[..., 2]
    blue = (b > 110) & (r < 60) & (g < 60)  # jet's low end: the cold part of the heat image
    labels, _ = ndimage.label(blue)
    biggest = labels == np.bincount(labels.ravel())[1:].argmax() + 1  # the heat image, not the colour bar
    ys, xs = biggest.nonzero()
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    heat = png[y0:y1, x0:x1]
    hot = (heat[..., 0] > 110) & (heat[..., 1] < 60) & (heat[..., 2] < 60)  # jet's high end: dark red
    hy, hx = np.argwhere(hot).mean(0)
    assert (int(hy * 4 / (y1 - y0)), int(hx * 4 / (x1 - x0))) == divmod(9, 4)  # row 2, col 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_model_view_is_the_processors_resize_and_centre_crop():
    processor = tiny_processor()  # shortest edge to 32, centre crop 32x32
    rng = np.random.default_rng(0)
    square = Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))
    assert np.array_equal(np.asarray(model_view(square, processor)), np.asarray(square))
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :16] = 255  # a white band on the left quarter: cut away by the centre crop
    wide[:, 16:48] = 90
    view = np.asarray(model_view(Image.fromarray(wide), processor))
    assert view.shape == (32, 32, 3) and abs(view.astype(int) - 90).max() <= 2
    assert box_in_view((16, 0, 32, 8), (64, 32), processor, (32, 32)) == (0, 0, 16, 8)
    assert box_in_view((0, 0, 8, 8), (64, 32), processor, (32, 32)) == (0, 0, 0, 8)  # outside the crop: empty
    assert box_in_view((10, 10, 20, 20), (64, 64), processor, (32, 32)) == (5, 5, 10, 10)  # scaled by 1/2


def test_run_log_holds_text_runtime_parameters_and_the_step_to_token_mapping(tmp_path):
    log = {"model": "m", "image": "a.png", "prompt": "Is there a ball?", "generated_text": "Yes",
           "runtime_seconds": 1.5,
           "parameters": {"layers": [14], "heads": [13, 24]},
           "steps": [{"step": 0, "position": 40, "query_token": ":", "token": "Yes"}], "files": ["step000.png"]}
    json_path, md_path = write_run_log(tmp_path, log)
    assert json.loads(json_path.read_text()) == log
    md = md_path.read_text()
    assert "| 0 | 40 | `:` | `Yes` |" in md and "'Yes'" in md and "1.5 s" in md and "![step000](step000.png)" in md


def test_the_hot_spot_of_a_corner_peak_is_inside_the_cell_not_on_the_border():
    attn = torch.zeros(16)
    attn[0] = 1.0  # top-left cell of a 4x4 grid, 16 view pixels per cell
    x, y = hot_spot(attn, (4, 4), (64, 64))
    assert 2 <= x <= 8 and 2 <= y <= 8  # the flat stretch runs from the border (0) to the cell centre (8)
