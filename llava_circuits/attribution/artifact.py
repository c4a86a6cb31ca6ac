"""An attribution graph as an `attribution-graph` artifact: the full (unpruned) graph tensors in
`graph.safetensors`, the rest in artifact.json's config, and the viewer JSON as an extra file."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from llava_circuits.artifacts import Artifact, ModelFingerprint, read_artifact, write_artifact
from llava_circuits.attribution.build import Graph, Target

TENSORS = ("input_ids", "image_positions", "patch_coords", "active", "activations", "selected", "adjacency",
           "rest", "bias", "row_values")


def save_graph(graph: Graph, out: str | Path, fingerprint: ModelFingerprint, viewer_json: dict | None = None) -> Artifact:
    """Write `graph` (and optionally its viewer JSON as graph.json) as an attribution-graph artifact."""
    tensors = {name: getattr(graph, name).contiguous() for name in TENSORS}
    config = {"prompt": graph.prompt, "tokens": graph.tokens, "grid": list(graph.grid) if graph.grid else None,
              "n_layers": graph.n_layers, "target": asdict(graph.target), "target_value": graph.target_value,
              "target_prob": graph.target_prob, "vocab_size": graph.vocab_size, "attribution": graph.config}
    extra = {"graph.json": json.dumps(viewer_json, indent=1)} if viewer_json is not None else None
    return write_artifact(out, "attribution-graph", fingerprint, {"graph": tensors}, config, extra)


def load_graph(path: str | Path) -> Graph:
    """The graph of an attribution-graph artifact."""
    artifact = read_artifact(path, expected_kind="attribution-graph")
    t, c = artifact.tensors("graph"), artifact.config
    return Graph(prompt=c["prompt"], tokens=c["tokens"], grid=tuple(c["grid"]) if c["grid"] else None,
                 n_layers=c["n_layers"], target=Target(**c["target"]), target_value=c["target_value"],
                 target_prob=c["target_prob"], vocab_size=c["vocab_size"], config=c["attribution"],
                 **{name: t[name] for name in TENSORS})

