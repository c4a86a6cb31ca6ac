"""`features plot`: figures of an analyzed capture run, as PNG under RUN/analysis/plots/.

    {dataset}_{direction}_top_features.png     top selected features by score
    {dataset}_{direction}_layer_dist.png       selected features per layer
    {dataset}_{direction}_activation_heatmap.png  pooled activation of the top features, GOOD samples above BAD
    {dataset}_frequency.png                    good_freq vs bad_freq of every feature, selections marked
    {dataset}_{direction}_L{layer}_F{feature}.png  a top feature's top-activating samples, with the image
                                               patches where it fires drawn over the image
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image
from safetensors import safe_open

from llava_circuits.features.capture import IMAGE
from llava_circuits.features.config import AnalyzeConfig
from llava_circuits.features.stats import pooled
from llava_circuits.features.store import iter_samples


def save(fig, path: Path) -> Path:
    """Save a figure atomically (temp file + rename) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def label(f: dict) -> str:
    return f"L{f['layer']} F{f['feature_idx']}"


def top_features(analysis: dict, path: Path, top: int = 20) -> Path:
    key = "goodness_score" if analysis["direction"] == "good" else "badness_score"
    feats = sorted(analysis["features"], key=lambda f: -f[key])[:top]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(feats) + 1.2))
    ax.barh([label(f) for f in feats][::-1], [f[key] for f in feats][::-1], color="tab:green" if key[0] == "g" else "tab:red")
    ax.set_xlabel(key)
    ax.set_title(f"{analysis['dataset']}: top {analysis['direction']} features")
    return save(fig, path)


def layer_distribution(analysis: dict, path: Path) -> Path:
    dist = analysis["layer_distribution"]
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(dist)), 3))
    ax.bar([int(l) for l in dist], list(dist.values()))
    ax.set_xlabel("layer")
    ax.set_ylabel("selected features")
    ax.set_title(f"{analysis['dataset']}: {analysis['direction']} features per layer (round-robin)")
    return save(fig, path)


def activation_heatmap(run: Path, analysis: dict, classification: dict, info: dict, cfg: AnalyzeConfig,
                       path: Path, top: int = 30) -> Path:
    feats = analysis["features"][:top]
    layers, width = info["layers"], info["n_features"]
    cols = [layers.index(f["layer"]) * width + f["feature_idx"] for f in feats]
    rows = {}
    for sample in iter_samples(run, {e["id"] for e in classification["GOOD"] + classification["BAD"]}):
        rows[sample.id] = pooled(sample, layers, width, cfg)[1].numpy()[cols]
    good = [rows[e["id"]] for e in classification["GOOD"] if e["id"] in rows]
    bad = [rows[e["id"]] for e in classification["BAD"] if e["id"] in rows]
    matrix = np.array(good + bad).reshape(-1, len(cols))
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(cols) + 2), 5))
    im = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="magma")
    ax.axhline(len(good) - 0.5, color="cyan", lw=1.5)
    ax.set_xticks(range(len(cols)), [label(f) for f in feats], rotation=90, fontsize=7)
    ax.set_ylabel(f"samples: GOOD ({len(good)}) above, BAD ({len(bad)}) below")
    ax.set_title(f"{analysis['dataset']}: pooled activation ({cfg.pool}) of the top {analysis['direction']} features")
    fig.colorbar(im, ax=ax)
    return save(fig, path)


def frequency(stats_path: Path, analyses: dict[str, dict], path: Path) -> Path:
    with safe_open(str(stats_path), "pt") as f:
        layers = json.loads(f.metadata()["layers"])
        good, bad = f.get_tensor("good_freq").numpy(), f.get_tensor("bad_freq").numpy()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(bad.ravel(), good.ravel(), s=4, c="lightgray", label="all features")
    for direction, color in (("good", "tab:green"), ("bad", "tab:red")):
        sel = analyses.get(direction, {}).get("features", [])
        ax.scatter([bad[layers.index(e["layer"]), e["feature_idx"]] for e in sel],
                   [good[layers.index(e["layer"]), e["feature_idx"]] for e in sel], s=12, c=color, label=f"selected {direction}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.7)
    ax.set_xlabel("bad_freq")
    ax.set_ylabel("good_freq")
    ax.legend(fontsize=8)
    ax.set_title("how often each feature fires in GOOD vs BAD samples")
    return save(fig, path)


def shown_image(path: Path, processor=None) -> np.ndarray:
    """The image as the model sees it (the processor's resize and crop, de-normalised), [H, W, 3] in [0, 1]."""
    image = Image.open(path).convert("RGB")
    ip = getattr(processor, "image_processor", None)
    if ip is None:  # no processor: a centre crop to a square, as CLIP preprocessing does
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return np.asarray(image.crop((left, top, left + side, top + side)).resize((336, 336))) / 255.0
    pixels = ip(images=[image], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    mean, std = np.array(getattr(ip, "image_mean", [0, 0, 0])), np.array(getattr(ip, "image_std", [1, 1, 1]))
    return np.clip(pixels * std + mean, 0, 1)


def feature_patches(run: Path, feature: dict, info: dict, images: dict[str, Path], path: Path, processor=None,
                    n_samples: int = 4) -> Path | None:
    """A feature's top-activating samples (max over positions), each image with its image-token activations
    drawn as a grid over it; None when the feature never fires on an image token."""
    layer, f = feature["layer"], feature["feature_idx"]
    best = []
    for sample in iter_samples(run):
        rows = (sample.layer == layer) & (sample.feature == f)
        if bool(rows.any()):
            best.append((float(sample.value[rows].float().max()), sample, rows))
    best = sorted(best, key=lambda t: -t[0])[:n_samples]
    shown = []
    for peak, sample, rows in best:
        image_pos = (sample.tags == IMAGE).nonzero().flatten()
        grid = math.isqrt(len(image_pos))
        if sample.id not in images or grid == 0 or grid * grid != len(image_pos):
            continue  # square grids only (LLaVA-1.5: 24 x 24)
        act = np.zeros(len(sample.tags))
        act[sample.position[rows].long().numpy()] = sample.value[rows].float().numpy()
        act = act[image_pos.numpy()].reshape(grid, grid)
        shown.append((peak, sample.id, act))
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), squeeze=False)
    for ax, (peak, sample_id, act) in zip(axes[0], shown):
        picture = shown_image(images[sample_id], processor)
        h, w = picture.shape[:2]
        ax.imshow(picture)
        ax.imshow(act, cmap="inferno", alpha=0.55, extent=(0, w, h, 0), interpolation="nearest", vmin=0,
                  vmax=max(act.max(), 1e-6))
        ax.set_title(f"sample {sample_id}: max {peak:.2f}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"L{layer} F{f}: top-activating samples, image patches where it fires")
    return save(fig, path)


def plot_run(run: str | Path, dataset: str | None = None, processor=None, top: int = 5, n_samples: int = 4,
             cfg: AnalyzeConfig | None = None) -> list[Path]:
    """Every figure of an analyzed run; returns the PNG paths."""
    from llava_circuits.data.readers import read_benchmark
    from llava_circuits.evaluation.tasks import task_for

    run = Path(run)
    info = json.loads((run / "capture.json").read_text())
    dataset = dataset or info["bench"]
    analyses = {d: json.loads((run / "analysis" / f"{dataset}_{d}_features.json").read_text()) for d in ("good", "bad")}
    classification = json.loads((run / "classification.json").read_text())
    cfg = cfg or AnalyzeConfig(**{k: v for k, v in analyses["good"]["selection"].items() if k in ("pool", "tags", "epsilon")})
    task = task_for(info["bench"])
    images = {s.id: s.image for s in read_benchmark(task.reader or task.name, info["data"], info.get("images")) if s.image}
    out = run / "analysis" / "plots"
    paths = [frequency(run / "analysis" / "stats.safetensors", analyses, out / f"{dataset}_frequency.png")]
    for direction, analysis in analyses.items():
        if not analysis["features"]:
            continue
        stem = f"{dataset}_{direction}"
        paths += [top_features(analysis, out / f"{stem}_top_features.png"),
                  layer_distribution(analysis, out / f"{stem}_layer_dist.png"),
                  activation_heatmap(run, analysis, classification, info, cfg, out / f"{stem}_activation_heatmap.png")]
        for feature in analysis["features"][:top]:
            name = f"{stem}_L{feature['layer']}_F{feature['feature_idx']}.png"
            drawn = feature_patches(run, feature, info, images, out / name, processor, n_samples)
            paths += [drawn] if drawn else []
    return paths


def features_plot(run: str, model: str | None = None, dataset: str | None = None, top: int = 5, samples: int = 4) -> list[Path]:
    """Figures of an analyzed run: top features, features per layer, GOOD vs BAD heatmap, frequencies, image patches.

    Args:
        run: an analyzed `features capture` run directory
        model: model directory or Hub id whose processor shows the images as the model sees them (default: a centre crop)
        dataset: name used in the analysis files (default: the benchmark)
        top: top features per direction drawn with their top-activating samples
        samples: top-activating samples drawn per feature
    """
    processor = None
    if model:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model)
    paths = plot_run(run, dataset, processor, top, samples)
    print(f"features plot: {len(paths)} figures in {Path(run) / 'analysis' / 'plots'}")
    return paths
