"""The `attribute` command: one prompt (image + text) -> pruned attribution graph JSON + patch-influence PNG."""
from __future__ import annotations

import time
from pathlib import Path

from PIL import Image

from llava_circuits.attention.config import load_config
from llava_circuits.attribution.artifact import save_graph
from llava_circuits.attribution.build import AttributionConfig, Graph, Target, attribute_graph, prepare_inputs, token_id
from llava_circuits.attribution.export import graph_json, save_patch_png, write_json
from llava_circuits.attribution.prune import Pruned, prune
from llava_circuits.evaluation.module import format_prompt
from llava_circuits.models.load import Loaded, load_model


def make_target(loaded: Loaded, target: str | None, contrast: str | None) -> Target | None:
    """Target logit[target] (minus logit[contrast]) at the last position; None: the model's top next token."""
    if target is None:
        if contrast is not None:
            raise ValueError("--contrast needs --target (the token whose logit the contrast is subtracted from)")
        return None
    tok = loaded.tokenizer
    label = target if contrast is None else f"{target} - {contrast}"
    return Target(token_id(tok, target), token_id(tok, contrast) if contrast is not None else None, -1, label)


def graph_summary(graph: Graph, pruned: Pruned) -> dict:
    """The figures a run reports: completeness, sizes, the patch that influences the target most."""
    completeness = graph.completeness()
    summary = {
        "target": graph.target.label, "target_value": graph.target_value, "target_prob": graph.target_prob,
        "completeness_rel_error": float(completeness[-1]),
        "feature_completeness_max_rel_error": float(completeness[:-1].max()) if graph.n_selected else 0.0,
        "active_features": len(graph.active), "feature_nodes": graph.n_selected,
        "kept_nodes": int(pruned.node_mask.sum()), "kept_edges": int(pruned.edge_mask.sum()),
    }
    if len(graph.image_positions):
        from llava_circuits.attribution.export import patch_influence

        best = int(patch_influence(graph, pruned).argmax())
        summary["top_patch"] = [best // graph.grid[1], best % graph.grid[1]]
    return summary


def attribute(model: str, transcoders: str, prompt: str, out: str, image: str | None = None,
              target: str | None = None, contrast: str | None = None, config: str | None = None,
              max_feature_nodes: int | None = None, node_threshold: float | None = None,
              edge_threshold: float | None = None, batch_size: int | None = None, compute_dtype: str | None = None,
              chunk_elems: int | None = None, artifact: str | None = None, slug: str | None = None,
              dtype: str = "auto", device: str = "cpu") -> dict:
    """Attribution graph of one prompt: which image patches, tokens and transcoder features drive a logit.

    Writes OUT (circuit-tracer / Neuronpedia graph JSON) and, with an image, OUT's stem + .patches.png
    (patch influence over the image).

    Args:
        model: model id or path (e.g. llava-hf/llava-1.5-7b-hf or checkpoints/toy-llava)
        transcoders: transcoders artifact (directory or Hub id) made for this model, covering its layers
        prompt: question about the image (wrapped in the model's chat template unless it holds <image>)
        out: graph JSON file to write (e.g. graph.json)
        image: image file (omit for a text-only prompt)
        target: token whose next-token logit is explained (default: the model's top next token)
        contrast: token whose logit is subtracted from the target's (e.g. --target Yes --contrast No)
        config: YAML with an `attribute` section (configs/toy/attribution.yaml, configs/llava15_7b/attribution.yaml)
        max_feature_nodes: cap on feature nodes (default 7500)
        node_threshold: pruning keeps nodes with this share of the influence (default 0.8)
        edge_threshold: pruning keeps edges with this share of the edge influence (default 0.98)
        batch_size: targets per backward pass of the linearised model (default 32)
        compute_dtype: float32 (default) or float64
        chunk_elems: bound on gathered decoder blocks, in elements (lower it if memory runs short)
        artifact: also write the full unpruned graph as an attribution-graph artifact in this directory
        slug: graph name in the JSON (default: OUT's stem)
        dtype: model dtype: auto, float32, bfloat16
        device: cpu, cuda, cuda:1, ...
    """
    start = time.time()
    cfg = load_config(config, "attribute", AttributionConfig, max_feature_nodes=max_feature_nodes,
                      node_threshold=node_threshold, edge_threshold=edge_threshold, batch_size=batch_size,
                      dtype=compute_dtype, chunk_elems=chunk_elems)
    loaded = load_model(model, dtype=dtype, device=device)
    from llava_circuits.transcoders.io import load_transcoders

    tcs = load_transcoders(transcoders, loaded.fingerprint())
    picture = Image.open(image).convert("RGB") if image is not None else None
    text = prompt if "<image>" in prompt else format_prompt(loaded, prompt, picture is not None)
    graph = attribute_graph(loaded, tcs, prepare_inputs(loaded, picture, text), make_target(loaded, target, contrast),
                            cfg, prompt=text)
    pruned = prune(graph.adjacency, graph.n_pos, cfg.node_threshold, cfg.edge_threshold)
    summary = graph_summary(graph, pruned)
    out_path = Path(out)
    data = graph_json(graph, pruned, slug or out_path.stem, loaded.name_or_path, {"llava_circuits": summary})
    write_json(data, out_path)
    if picture is not None and len(graph.image_positions):
        summary["png"] = str(save_patch_png(graph, pruned, picture, loaded.processor,
                                            out_path.with_name(out_path.stem + ".patches.png")))
    if artifact is not None:
        summary["artifact"] = str(save_graph(graph, artifact, loaded.fingerprint(), data).path)
    summary["seconds"] = round(time.time() - start, 2)
    print(f"attribute: {summary['target']!r} = {graph.target_value:+.4f}, completeness error "
          f"{summary['completeness_rel_error']:.2e}, {summary['kept_nodes']} nodes / {summary['kept_edges']} edges "
          f"-> {out_path}")
    return summary
