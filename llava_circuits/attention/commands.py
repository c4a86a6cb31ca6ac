"""The `attention extract` and `attention find-heads` commands."""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

from llava_circuits.attention.aggregate import aggregate, labelled_maps
from llava_circuits.attention.config import ExtractConfig, HeadSearchConfig, load_config
from llava_circuits.attention.data import GroundingItem, read_items
from llava_circuits.attention.extract import extract_attention, prompt_attention
from llava_circuits.attention.heads import head_maps, points_in_boxes, rank_heads
from llava_circuits.attention.render import box_in_view, model_view, save_overlay, write_run_log
from llava_circuits.evaluation.run import write_json


def _split(spec: str | None) -> list[str] | None:
    return None if spec is None else [s.strip() for s in spec.split(",") if s.strip()]


def map_file_name(label: dict) -> str:
    """step003_L14_H13.png style names; aggregated.png when every axis was reduced."""
    parts = [f"step{label['step']:03d}"] if "step" in label else []
    parts += [f"L{label['layer']}"] if "layer" in label else []
    parts += [f"H{label['head']}"] if "head" in label else []
    return ("_".join(parts) or "aggregated") + ".png"


def map_title(label: dict, cfg: ExtractConfig, layers: list[int], heads: list[int]) -> str:
    where = f"L{label['layer']}" if "layer" in label else f"L{','.join(map(str, layers))}"
    where += f" H{label['head']}" if "head" in label else f" H{','.join(map(str, heads))}"
    kind = ("relative " if cfg.relative else "") + f"{cfg.reduce} over {'+'.join(cfg.over) or 'nothing'}"
    step = f"step {label['step']} -> {label['token']!r}" if "step" in label else "all steps"
    return f"{step}\n{where}, {kind}"


def explain_image(loaded, image: Image.Image, prompt: str, cfg: ExtractConfig, out: Path, name: str = "") -> dict:
    """Extract, aggregate and draw one image and prompt into `out`; returns the run log."""
    start = time.time()
    record = extract_attention(loaded, image, prompt, cfg.layers, cfg.heads, cfg.steps, cfg.max_new_tokens)
    baseline = None
    if cfg.relative:
        baseline = extract_attention(loaded, image, cfg.baseline_prompt, record.layers, record.heads, [0], 1)
    maps = aggregate(record, cfg.over, cfg.reduce, cfg.sinks, cfg.sink_z, baseline)
    view = model_view(image, loaded.processor)
    files = []
    if record.steps:
        for label, attn_map in labelled_maps(record, maps, cfg.over):
            title = map_title(label, cfg, record.layers, record.heads)
            save_overlay(view, attn_map, record.grid, out / map_file_name(label), title, cfg.alpha, cfg.cmap)
            files.append(map_file_name(label))
    record.save(out)
    log = {"model": loaded.name_or_path, "image": name, "prompt": prompt, "generated_text": record.generated_text,
           "runtime_seconds": round(time.time() - start, 3), "parameters": asdict(cfg) | {
               "layers": record.layers, "heads": record.heads, "grid": list(record.grid)},
           "steps": record.step_table(), "files": files}
    write_run_log(out, log)
    return log


def extract(model: str, out: str, image: str | None = None, prompt: str | None = None, data: str | None = None,
            bench: str = "pope", images: str | None = None, limit: int | None = None, config: str | None = None,
            steps: str | None = None, layers: str | None = None, heads: str | None = None, over: str | None = None,
            reduce: str | None = None, sinks: bool | None = None, relative: bool | None = None,
            max_new_tokens: int | None = None, dtype: str = "auto", device: str = "cpu",
            quantization: str | None = None) -> dict:
    """Record the attention of each generation step to the image tokens and draw it over the image.

    Args:
        model: model id or path (e.g. llava-hf/llava-1.5-7b-hf or checkpoints/toy-llava)
        out: output folder: one PNG per step (or one aggregated), attention.safetensors, run.json and run.md
        image: image file (with --prompt)
        prompt: question about the image (wrapped in the model's chat template unless it holds <image>)
        data: a benchmark file instead of --image/--prompt; each sample gets a subfolder of out
        bench: reader of --data (pope, scienceqa, amber, ...); its evaluation prompt is used
        images: images folder of --data
        limit: at most this many samples of --data
        config: YAML file whose `extract` section sets the defaults (configs/llava15_7b/attention.yaml)
        steps: generation steps: all, 3, 0,2,5 or 0-4 (step 0 is the prompt's last token)
        layers: decoder layers (0-based): all, 14, 12-16
        heads: attention heads (0-based): all, 13,24
        over: axes reduced into one map, comma-separated: steps, layers, heads (default heads)
        reduce: mean or max
        sinks: mask attention-sink image tokens (robust outliers of each map)
        relative: divide by the attention of the generic prompt on the same image
        max_new_tokens: tokens generated per prompt
        dtype: auto, float32 or bfloat16
        device: cpu, cuda, cuda:1, ...
        quantization: 4bit or 8bit (bitsandbytes)
    """
    from llava_circuits.data.readers import read_benchmark
    from llava_circuits.evaluation.tasks import task_for
    from llava_circuits.models.load import load_model

    cfg = load_config(config, "extract", ExtractConfig, steps=steps, layers=layers, heads=heads, over=_split(over),
                      reduce=reduce, sinks=sinks, relative=relative, max_new_tokens=max_new_tokens)
    if (image is None) == (data is None) or (image is not None and prompt is None):
        raise ValueError("give --image with --prompt, or --data (a benchmark file)")
    loaded = load_model(model, dtype=dtype, device=device, quantization=quantization)
    root = Path(out)
    if image is not None:
        return explain_image(loaded, Image.open(image), prompt, cfg, root, image)
    task = task_for(bench)
    samples = [s for s in read_benchmark(task.reader or task.name, data, images) if s.image is not None][:limit]
    logs = [explain_image(loaded, Image.open(s.image), task.body(s), cfg, root / s.id, str(s.image)) for s in samples]
    index = {"model": model, "data": data,
             "samples": [{"id": s.id, "folder": s.id, "generated_text": log["generated_text"]}
                         for s, log in zip(samples, logs)]}
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "index.json", index)
    return index


Boxed = tuple[list[int], list[tuple[float, float, float, float]], tuple[int, int]]


def boxes_in_view(loaded, items: list[GroundingItem]) -> Boxed:
    """(indices of the items with a box, those boxes in view pixels, the view size (W, H))."""
    index = [i for i, item in enumerate(items) if item.box is not None]
    views = [model_view(items[i].image, loaded.processor) for i in index]
    boxes = [box_in_view(items[i].box, items[i].image.size, loaded.processor, v.size) for i, v in zip(index, views)]
    return index, boxes, views[0].size if views else (0, 0)


def pointing(loaded, attn: torch.Tensor, heads: list[tuple[int, int]], boxed: Boxed) -> float:
    """Share of boxed items whose mean map over `heads` peaks (argmax cell centre) inside the object's box."""
    index, boxes, size = boxed
    if not index:
        return float("nan")
    hits = points_in_boxes(head_maps(attn[index], heads), boxes, tuple(loaded.anatomy.image_grid), size)
    return float(hits.float().mean())


def item_attention(loaded, items: list[GroundingItem], cfg: HeadSearchConfig) -> torch.Tensor:
    """[n, layers, heads, n_image] attention of each item's query (cfg.query) to its image."""
    if cfg.query not in ("last", "object"):
        raise ValueError(f"find_heads.query must be 'last' or 'object', got {cfg.query!r}")
    words = None
    if cfg.query == "object":
        unnamed = [i.id for i in items if i.name is None]
        if unnamed:
            raise ValueError(f"query 'object' needs questions like 'Is there a <object> in the image?'; items {unnamed[:5]} are not")
        words = [i.name for i in items]
    return prompt_attention(loaded, [(i.image, i.question) for i in items], batch_size=cfg.batch_size, words=words)


def search_heads(loaded, items: list[GroundingItem], cfg: HeadSearchConfig) -> tuple[dict, torch.Tensor]:
    """Rank heads over the items; returns the ranking as JSON (with pointing accuracy when boxes are known)."""
    attn = item_attention(loaded, items, cfg)
    ranking = rank_heads(attn, tuple(loaded.anatomy.image_grid), cfg)
    result = ranking.to_json(cfg.top_k) | {"config": asdict(cfg)}
    if any(i.box is not None for i in items):
        boxed = boxes_in_view(loaded, items)
        result["pointing_accuracy_top_heads"] = pointing(loaded, attn, ranking.top(cfg.top_k), boxed)
    return result, attn


def find_heads(model: str, data: str, out: str, images: str | None = None, config: str | None = None,
               limit: int | None = None, per_sample: int | None = None, top_k: int | None = None,
               min_layer: int | None = None, dtype: str = "auto", device: str = "cpu",
               quantization: str | None = None) -> dict:
    """Find localization heads (Kang et al. 2025): attention mass past the elbow, low spatial entropy, frequency.

    Args:
        model: model id or path
        data: POPE-style jsonl ("yes" items are used; an optional "box": [x0, y0, x1, y1] in image pixels
            scores pointing) or a toy manifest.json
        out: output folder: heads.json (ranking, frequencies, threshold) and heads.md
        images: images folder of --data (default: the file's folder, or the manifest's)
        config: YAML file whose `find_heads` section sets the defaults
        limit: at most this many prompts
        per_sample: heads selected per prompt (lowest spatial entropy)
        top_k: heads reported as the localization heads
        min_layer: never select layers below this one
        dtype: auto, float32 or bfloat16
        device: cpu, cuda, ...
        quantization: 4bit or 8bit (bitsandbytes)
    """
    from llava_circuits.models.load import load_model

    cfg = load_config(config, "find_heads", HeadSearchConfig, per_sample=per_sample, top_k=top_k, min_layer=min_layer)
    loaded = load_model(model, dtype=dtype, device=device, quantization=quantization)
    items = read_items(data, images, limit)
    result, _ = search_heads(loaded, items, cfg)
    result = {"model": model, "data": data} | result
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "heads.json", result)
    lines = [f"# Localization heads of `{model}`", "", f"{result['prompts']} prompts from `{data}`; "
             f"elbow threshold of the image-attention mass: {result['threshold']:.4f}.", "",
             "| rank | layer | head | selected | frequency | mass | mean entropy |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r + 1} | {h['layer']} | {h['head']} | {h['count']} | {h['frequency']:.3f} | {h['mass']:.4f} | "
              f"{h['mean_entropy']:.3f} |" for r, h in enumerate(result["ranking"][:20])]
    if "pointing_accuracy_top_heads" in result:
        lines += ["", f"Pointing accuracy of the top {cfg.top_k} heads: {result['pointing_accuracy_top_heads']:.3f}"]
    tmp = folder / ".heads.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, folder / "heads.md")
    return result
