"""The demo's `attention` stage: find the toy model's localization heads, score where they point, draw them."""
from __future__ import annotations

import random
from pathlib import Path

from PIL import ImageDraw

from llava_circuits.attention.commands import boxes_in_view, item_attention, pointing, search_heads
from llava_circuits.attention.config import HeadSearchConfig, load_config
from llava_circuits.attention.data import read_items, toy_items
from llava_circuits.attention.extract import extract_attention
from llava_circuits.attention.render import box_in_view, model_view, save_overlay
from llava_circuits.evaluation.run import write_json

TOY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "toy" / "attention.yaml"


def attention_stage(loaded, data_dir: str | Path, out: str | Path, n_search: int = 300, n_pointing: int = 200,
                    n_overlays: int = 4, config: HeadSearchConfig | None = None, seed: int = 0) -> dict:
    """Localization heads of the toy model, their pointing accuracy against a random head, and overlays.

    Heads are searched on the present-object POPE items of data_dir/manifest.json (fresh toy scenes when it
    is missing); pointing is scored on held-out toy scenes with known boxes: a hit when the argmax cell of
    the mean map of the top heads (the config's query: the prompt's last token, or the asked object's word) has
    its centre inside the object's box.
    """
    config = config or load_config(TOY_CONFIG, "find_heads", HeadSearchConfig)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Path(data_dir) / "manifest.json"
    search = read_items(manifest, limit=n_search) if manifest.exists() else toy_items(n_search, seed + 1)
    ranking, _ = search_heads(loaded, search, config)
    top = [tuple(p) for p in ranking["top_heads"]]
    a = loaded.anatomy
    others = [(l, h) for l in range(a.n_layers) for h in range(a.n_heads) if (l, h) not in top]
    rand = random.Random(seed).choice(others)
    held_out = toy_items(n_pointing, seed + 2)
    attn = item_attention(loaded, held_out, config)
    boxed = boxes_in_view(loaded, held_out)
    per_head = {(l, h): pointing(loaded, attn, [(l, h)], boxed) for l in range(a.n_layers) for h in range(a.n_heads)}
    overlays = [draw(loaded, item, heads, out / f"overlay_{i}_{name}.png", config)
                for i, item in enumerate(held_out[:n_overlays]) for name, heads in (("top", top), ("random", [rand]))]
    metrics = {
        "pointing_accuracy_top_heads": pointing(loaded, attn, top, boxed),
        "pointing_accuracy_random_head": per_head[rand],
        "pointing_accuracy_mean_head": sum(per_head.values()) / len(per_head),
        "top_heads": [list(p) for p in top], "random_head": list(rand),
        "prompts_search": len(search), "prompts_pointing": len(held_out),
        "overlays": [str(p.relative_to(out)) for p in overlays],
    }
    write_json(out / "heads.json", ranking | {"pointing_by_head": {f"L{l}H{h}": v for (l, h), v in per_head.items()}})
    write_json(out / "attention_metrics.json", metrics)
    return metrics


def draw(loaded, item, heads: list[tuple[int, int]], path: Path, config: HeadSearchConfig) -> Path:
    """Overlay of the mean map of `heads` for the config's query, titled with the answer token, the object's box drawn."""
    attn = item_attention(loaded, [item], config)[0]  # [layers, heads, n_image]
    attn_map = sum(attn[l, h] for l, h in heads) / len(heads)
    answer = extract_attention(loaded, item.image, item.question, [heads[0][0]], "all", steps=[0], max_new_tokens=1).tokens[0]
    view = model_view(item.image, loaded.processor)
    if item.box is not None:
        box = box_in_view(item.box, item.image.size, loaded.processor, view.size)
        ImageDraw.Draw(view).rectangle(box, outline="white")
    names = ", ".join(f"L{l}H{h}" for l, h in heads)
    query = "last token" if config.query == "last" else f"query {item.name!r}"
    return save_overlay(view, attn_map, tuple(loaded.anatomy.image_grid), path,
                        f"{item.question} -> {answer!r}\n{names}, {query}")
