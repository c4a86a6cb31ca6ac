"""Export: the graph JSON that circuit-tracer's and Neuronpedia's viewers read, and the patch-influence PNG.

The JSON (docs/attribution.md has the field-by-field format) is `{"metadata", "qParams", "nodes", "links"}`
with circuit-tracer's node kinds and id scheme:

    feature      node_id "{layer}_{feature}_{pos}"   feature_type "cross layer transcoder"
    error        node_id "{layer}_-1_{pos}"          feature_type "mlp reconstruction error"
    embedding    node_id "E_{token_id}_{pos}"        feature_type "embedding"
    target       node_id "{L+1}_{token_id}_{pos}"    feature_type "logit", is_target_logit true

Image-patch nodes are embeddings (their token id is the image token's) that also carry `image_index`,
`patch_row`, `patch_col` and a clerp "image patch (row r, col c)"; `metadata.image` gives the grid.
A logit difference gets a virtual token id (vocab_size), as circuit-tracer does for targets that are
not one vocabulary entry. Links are `{"source", "target", "weight"}` with the direct edge weight.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from PIL import Image
from torch import Tensor

from llava_circuits.attribution.build import Graph
from llava_circuits.attribution.prune import Pruned

SCHEMA_VERSION = 1
FEATURE, ERROR, EMBEDDING, LOGIT = "cross layer transcoder", "mlp reconstruction error", "embedding", "logit"


def cantor(x: int, y: int) -> int:
    """Cantor pairing: circuit-tracer's `feature` number of (layer, feature index)."""
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id: str, feature: int, layer: str, pos: int, kind: str, js: str, influence: float | None,
          activation: float | None = None, clerp: str = "", **extra) -> dict:
    return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos, "feature_type": kind,
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js,
            "clerp": clerp, "influence": influence, "activation": activation, **extra}


def graph_nodes(graph: Graph, pruned: Pruned) -> dict[int, dict]:
    """Node index -> JSON node for every kept node."""
    S, T, L = graph.n_selected, graph.n_pos, graph.n_layers
    cum = pruned.cumulative.tolist()
    patches = {int(p): c for p, c in zip(graph.image_positions.tolist(), graph.patch_coords.tolist())}
    nodes = {}
    for i in pruned.node_mask.nonzero().flatten().tolist():
        if i < S:
            layer, pos, feat = graph.active[graph.selected[i]].tolist()
            act = float(graph.activations[graph.selected[i]])
            nodes[i] = _node(f"{layer}_{feat}_{pos}", cantor(layer, feat), str(layer), pos, FEATURE,
                             f"{layer}_{feat}-0", cum[i], act)
        elif i < S + L * T:
            layer, pos = divmod(i - S, T)
            nodes[i] = _node(f"{layer}_-1_{pos}", -1, str(layer), pos, ERROR, f"{layer}_-1-{pos}", cum[i])
        elif i < S + L * T + T:
            pos = i - S - L * T
            tok = int(graph.input_ids[pos])
            extra = {}
            if pos in patches:
                image, row, col = patches[pos]
                extra = {"image_index": image, "patch_row": row, "patch_col": col,
                         "clerp": f"image patch (row {row}, col {col})"}
            nodes[i] = _node(f"E_{tok}_{pos}", pos, "E", pos, EMBEDDING, f"E_{tok}-{pos}", cum[i], **extra)
        else:
            nodes[i] = target_node(graph)
    return nodes


def target_node(graph: Graph) -> dict:
    t = graph.target
    vocab = t.token if t.contrast is None else graph.vocab_size  # a virtual index for a difference
    layer = str(graph.n_layers + 1)
    node = _node(f"{layer}_{vocab}_{t.pos}", vocab, layer, t.pos, LOGIT, f"L_{vocab}-{t.pos}", None,
                 clerp=f'Output "{t.label}" (p={graph.target_prob:.3f})')
    node.update(token_prob=graph.target_prob, is_target_logit=True)
    return node


def graph_json(graph: Graph, pruned: Pruned, slug: str, scan: str, extra_metadata: dict | None = None) -> dict:
    """The circuit-tracer / Neuronpedia graph JSON of a pruned graph."""
    nodes = graph_nodes(graph, pruned)
    S, N = graph.n_selected, graph.n_nodes
    links = []
    for row, col in pruned.edge_mask.nonzero().tolist():
        target = row if row < S else N - 1
        if target in nodes and col in nodes:
            links.append({"source": nodes[col]["node_id"], "target": nodes[target]["node_id"],
                          "weight": float(graph.adjacency[row, col])})
    linked = {l["source"] for l in links} | {l["target"] for l in links}
    used = [n for n in nodes.values() if n["node_id"] in linked or n["feature_type"] in (EMBEDDING, LOGIT)]
    cfg = graph.config
    metadata = {
        "slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": graph.tokens, "prompt": graph.prompt,
        "node_threshold": cfg.get("node_threshold"), "schema_version": SCHEMA_VERSION,
        "info": {"creator_name": "llava-circuits", "generator": {"name": "llava-circuits attribute"},
                 "create_time_ms": int(time.time() * 1000)},
        "generation_settings": {"max_feature_nodes": cfg.get("max_feature_nodes"), "batch_size": cfg.get("batch_size")},
        "pruning_settings": {"node_threshold": cfg.get("node_threshold"), "edge_threshold": cfg.get("edge_threshold")},
        "image": {"grid": list(graph.grid) if graph.grid else None, "positions": graph.image_positions.tolist()},
        "target": {"token": graph.target.token, "contrast": graph.target.contrast, "label": graph.target.label,
                   "pos": graph.target.pos, "value": graph.target_value},
        **(extra_metadata or {}),
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


def write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path


def patch_influence(graph: Graph, pruned: Pruned, image: int = 0) -> Tensor:
    """[rows * cols] influence of each patch of image `image` on the target (unpruned graph), row-major."""
    keep = graph.patch_coords[:, 0] == image
    return pruned.influence[[graph.embed_index(int(p)) for p in graph.image_positions[keep]]].float()


def save_patch_png(graph: Graph, pruned: Pruned, image: Image.Image, processor, path: str | Path) -> Path:
    """PNG of the patch influence drawn over the image as the model saw it."""
    from llava_circuits.attention.render import model_view, save_overlay

    if graph.grid is None or len(graph.image_positions) == 0:
        raise ValueError("the prompt has no image tokens: there is no patch influence to draw")
    title = f"patch influence on {graph.target.label!r} ({graph.target_value:+.3f})"
    return save_overlay(model_view(image, processor), patch_influence(graph, pruned), graph.grid, path, title)
