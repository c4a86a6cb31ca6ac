"""Drawing attention maps over the image as the model saw it, and the run log.

The model does not see the image file: LLaVA's processor resizes it (shortest edge to 336 for LLaVA-1.5,
64 for the toy) and centre-crops it to a square, so on a non-square photo the sides are cut off and the
24x24 grid covers only the crop. `model_view` undoes the processor's normalisation of `pixel_values`,
which gives exactly that crop; maps are upsampled onto it, and `box_in_view` moves boxes given in pixels
of the original image into its coordinates.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor


def model_view(image: Image.Image, processor) -> Image.Image:
    """The image as the model saw it: the processor's pixel_values with the normalisation undone."""
    ip = getattr(processor, "image_processor", processor)
    pixels = ip(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"][0].double()  # [3, H, W]
    if getattr(ip, "do_normalize", False):
        pixels = pixels * torch.tensor(ip.image_std).view(3, 1, 1) + torch.tensor(ip.image_mean).view(3, 1, 1)
    if getattr(ip, "do_rescale", False):
        pixels = pixels / ip.rescale_factor
    array = pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def view_geometry(image_size: tuple[int, int], processor) -> tuple[float, float, float, float]:
    """(scale_x, scale_y, left, top): view_x = x * scale_x - left for a pixel x of the original image."""
    ip = getattr(processor, "image_processor", processor)
    width, height = image_size
    size, crop = ip.size, ip.crop_size
    new_w, new_h = width, height
    if getattr(ip, "do_resize", False):
        if size.get("shortest_edge") and not size.get("longest_edge"):
            short, long = sorted((width, height))
            new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
            new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        elif size.get("height") and size.get("width"):
            new_w, new_h = size["width"], size["height"]
        else:
            raise ValueError(f"boxes: unsupported resize {dict(size)}; expected shortest_edge or height/width")
    left = top = 0
    if getattr(ip, "do_center_crop", False):
        left, top = (new_w - crop["width"]) // 2, (new_h - crop["height"]) // 2
    return new_w / width, new_h / height, left, top


def box_in_view(box: tuple[float, float, float, float], image_size: tuple[int, int], processor,
                view_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A box (x0, y0, x1, y1) in original-image pixels, in view pixels, clipped to the view (W, H)."""
    sx, sy, left, top = view_geometry(image_size, processor)
    x0, y0, x1, y1 = box
    w, h = view_size
    return (min(max(x0 * sx - left, 0), w), min(max(y0 * sy - top, 0), h),
            min(max(x1 * sx - left, 0), w), min(max(y1 * sy - top, 0), h))


def grid_map(attn_map: Tensor, grid: tuple[int, int]) -> np.ndarray:
    """[n] image-token values as the [rows, cols] grid they tile (row-major, as the vision tower emits them)."""
    rows, cols = grid
    if attn_map.numel() != rows * cols:
        raise ValueError(f"a map of {attn_map.numel()} image tokens does not tile a {rows}x{cols} grid")
    return attn_map.detach().double().reshape(rows, cols).cpu().numpy()


def upsample(cells: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[rows, cols] -> [H, W] by bilinear interpolation (size is (W, H), as PIL's)."""
    t = torch.from_numpy(np.ascontiguousarray(cells))[None, None]
    return F.interpolate(t, size=(size[1], size[0]), mode="bilinear", align_corners=False)[0, 0].numpy()


def hot_spot(attn_map: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """(x, y) view pixel of the maximum of the upsampled map: the middle of the pixels that reach it, since a peak
    in an edge cell is a flat stretch out to the border (the first of them would sit on the border)."""
    up = upsample(grid_map(attn_map, grid), size)
    ys, xs = np.nonzero(up >= up.max() - 1e-6 * abs(up.max()))
    return int(round(xs.mean())), int(round(ys.mean()))


def cell_centre(index: int, grid: tuple[int, int], size: tuple[int, int]) -> tuple[float, float]:
    """(x, y) view pixel at the centre of image token `index` (row-major)."""
    rows, cols = grid
    row, col = divmod(index, cols)
    return (col + 0.5) * size[0] / cols, (row + 0.5) * size[1] / rows


def save_overlay(view: Image.Image, attn_map: Tensor, grid: tuple[int, int], path: str | Path, title: str = "",
                 alpha: float = 0.5, cmap: str = "jet") -> Path:
    """Write a PNG: the upsampled map over the view image, with a colour bar and `title` (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heat = upsample(grid_map(attn_map, grid), view.size)
    fig = Figure(figsize=(4.2, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(np.asarray(view))
    shown = ax.imshow(heat, cmap=cmap, alpha=alpha, extent=(0, view.size[0], view.size[1], 0), interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def write_run_log(folder: str | Path, log: dict) -> tuple[Path, Path]:
    """run.json and run.md in folder: generated text, runtime, parameters, step-to-token mapping (atomic)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"# Attention run: {log.get('prompt', '')}", "",
             f"- model: `{log.get('model')}`", f"- image: `{log.get('image')}`",
             f"- generated text: {log.get('generated_text', '')!r}", f"- runtime: {log.get('runtime_seconds')} s", "",
             "## Parameters", "", "```json", json.dumps(log.get("parameters", {}), indent=1), "```", "",
             "## Steps", "", "| step | position | query token | generated token |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['position']} | `{s['query_token']}` | `{s['token']}` |"
              for s in log.get("steps", [])]
    if log.get("files"):
        lines += ["", "## Heatmaps", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in log["files"]]
    paths = folder / "run.json", folder / "run.md"
    for path, text in zip(paths, (json.dumps(log, indent=1, ensure_ascii=False), "\n".join(lines) + "\n")):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths
