"""The demo's `attribution` stage: graphs for "Is there a <object> in the image?" with the object present.

Figures (demo metrics.json, stage `attribution`):
    completeness_rel_error    worst |sum of the target's direct edges + rest + biases - model's Yes-No logit
                              difference| / |difference| over the prompts (bar: <= 1e-4)
    patch_pointing_accuracy   share of prompts whose most influential image patch (influence on Yes - No
                              through the whole graph) has its centre inside the object's box (bar: >= 0.8)
"""
from __future__ import annotations

from pathlib import Path

import torch

from llava_circuits.attribution.build import AttributionConfig, attribute_graph, prepare_inputs
from llava_circuits.attribution.commands import make_target
from llava_circuits.attribution.export import graph_json, patch_influence, save_patch_png, write_json
from llava_circuits.attribution.prune import prune
from llava_circuits.evaluation.module import format_prompt
from llava_circuits.models.load import Loaded

TOY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "toy" / "attribution.yaml"
BARS = {"completeness_rel_error": ("<= 1e-4", lambda f: f["completeness_rel_error"] <= 1e-4),
        "patch_pointing_accuracy": (">= 0.8", lambda f: f["patch_pointing_accuracy"] >= 0.8)}
"""figure -> (bar as text, check), as demo.py's TOY_BARS."""


def attribution_stage(loaded: Loaded, data_dir: str | Path, out: str | Path, transcoders: str | Path | None = None,
                      n_prompts: int = 40, n_pngs: int = 4, seed: int = 0,
                      answers: tuple[str, str] = ("Yes", "No")) -> dict[str, float]:
    """Graphs of Yes - No on `n_prompts` fresh toy scenes asking about a present object (data_dir is unused:
    the scenes need their object boxes); transcoders default to the demo's `transcoders` stage artifact;
    the target is logit[answers[0]] - logit[answers[1]] at the prompt's last token."""
    from llava_circuits.attention.commands import boxes_in_view
    from llava_circuits.attention.config import load_config
    from llava_circuits.attention.data import toy_items
    from llava_circuits.attention.heads import points_in_boxes
    from llava_circuits.transcoders.io import load_transcoders

    out = Path(out)
    path = Path(transcoders) if transcoders is not None else out.parent / "transcoders" / "transcoders"
    if not (path / "artifact.json").is_file():
        raise FileNotFoundError(f"{path}: no transcoders artifact; run the demo's transcoders stage first")
    tcs = load_transcoders(path, loaded.fingerprint())
    cfg = load_config(TOY_CONFIG, "attribute", AttributionConfig)
    items = toy_items(n_prompts, seed + 11)
    target = make_target(loaded, *answers)
    errors, maps, sizes = [], [], []
    for i, item in enumerate(items):
        text = format_prompt(loaded, item.question, True)
        graph = attribute_graph(loaded, tcs, prepare_inputs(loaded, item.image, text), target, cfg, prompt=text)
        pruned = prune(graph.adjacency, graph.n_pos, cfg.node_threshold, cfg.edge_threshold)
        errors.append(float(graph.completeness()[-1]))
        maps.append(patch_influence(graph, pruned))
        sizes.append(graph.n_selected)
        if i < n_pngs:
            save_patch_png(graph, pruned, item.image, loaded.processor, out / f"patches_{i}.png")
            write_json(graph_json(graph, pruned, f"toy-{i}", loaded.name_or_path), out / f"graph_{i}.json")
    index, boxes, size = boxes_in_view(loaded, items)
    hits = points_in_boxes(torch.stack(maps)[index], boxes, tuple(loaded.anatomy.image_grid), size)
    metrics = {"completeness_rel_error": max(errors), "patch_pointing_accuracy": float(hits.float().mean()),
               "prompts": float(len(items)), "feature_nodes_mean": sum(sizes) / len(sizes)}
    write_json(metrics, out / "attribution_metrics.json")
    return metrics
