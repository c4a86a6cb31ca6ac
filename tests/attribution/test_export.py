"""Export: the graph JSON matches circuit-tracer's documented format; the PNG; the artifact round trip."""
import json
import re

import pytest
import torch
from PIL import Image

from llava_circuits.artifacts import ModelFingerprint
from llava_circuits.attribution.artifact import load_graph, save_graph
from llava_circuits.attribution.build import AttributionConfig, Target, attribute_graph
from llava_circuits.attribution.export import cantor, graph_json, save_patch_png, write_json
from llava_circuits.attribution.prune import prune
from llava_circuits.models.tiny import VOCAB

from .conftest import make_transcoders, prompt_inputs, random_image

# The documented format (docs/attribution.md), as circuit-tracer writes it and Neuronpedia reads it.
METADATA = {"slug": str, "scan": str, "transcoder_list": list, "prompt_tokens": list, "prompt": str,
            "node_threshold": float, "schema_version": int}
QPARAMS = {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str, "sg_pos": str}
NODE = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str, "token_prob": float,
        "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int, "jsNodeId": str, "clerp": str,
        "influence": (float, type(None)), "activation": (float, type(None))}
LINK = {"source": str, "target": str, "weight": float}
IDS = {  # feature_type -> (node_id pattern, jsNodeId pattern)
    "cross layer transcoder": (r"(\d+)_(\d+)_(\d+)", r"(\d+)_(\d+)-0"),
    "mlp reconstruction error": (r"(\d+)_-1_(\d+)", r"(\d+)_-1-(\d+)"),
    "embedding": (r"E_(\d+)_(\d+)", r"E_(\d+)-(\d+)"),
    "logit": (r"(\d+)_(\d+)_(\d+)", r"L_(\d+)-(\d+)"),
}


def _fields(obj: dict, spec: dict, where: str) -> None:
    for key, kind in spec.items():
        assert key in obj, f"{where}: missing {key!r}"
        assert isinstance(obj[key], kind) and not (kind is int and isinstance(obj[key], bool)), \
            f"{where}: {key}={obj[key]!r} is not {kind}"


def check_graph_format(data: dict, n_layers: int) -> None:
    """Every rule of the documented format; raises AssertionError naming the first broken one."""
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    _fields(data["metadata"], METADATA, "metadata")
    _fields(data["qParams"], QPARAMS, "qParams")
    ids = set()
    for node in data["nodes"]:
        _fields(node, NODE, f"node {node.get('node_id')}")
        kind = node["feature_type"]
        assert kind in IDS, f"unknown feature_type {kind!r}"
        node_re, js_re = IDS[kind]
        assert re.fullmatch(node_re, node["node_id"]) and re.fullmatch(js_re, node["jsNodeId"]), node
        assert node["node_id"] not in ids, f"duplicate node_id {node['node_id']}"
        ids.add(node["node_id"])
        if kind == "cross layer transcoder":
            layer, feat, pos = map(int, node["node_id"].split("_"))
            assert node["feature"] == cantor(layer, feat) and node["layer"] == str(layer) and node["ctx_idx"] == pos
            assert node["activation"] is not None and node["activation"] > 0
        elif kind == "embedding":
            assert node["layer"] == "E" and node["feature"] == node["ctx_idx"]
        elif kind == "logit":
            assert node["layer"] == str(n_layers + 1)
        else:
            assert node["feature"] == -1 and 0 <= int(node["layer"]) < n_layers
        if kind != "logit":
            assert 0.0 <= node["influence"] <= 1.0 + 1e-9
    assert sum(n["is_target_logit"] for n in data["nodes"]) == 1
    for link in data["links"]:
        _fields(link, LINK, "link")
        assert link["source"] in ids and link["target"] in ids, link
    n_tokens = len(data["metadata"]["prompt_tokens"])
    assert sorted(n["ctx_idx"] for n in data["nodes"] if n["feature_type"] == "embedding") == list(range(n_tokens))


@pytest.fixture(scope="module")
def built(loaded32):
    cfg = AttributionConfig(batch_size=64)
    graph = attribute_graph(loaded32, make_transcoders("plt-relu"), prompt_inputs(loaded32),
                            Target(VOCAB["yes"], VOCAB["no"], label="yes - no"), cfg, prompt="is there a cat ?")
    return graph, prune(graph.adjacency, graph.n_pos)


def test_the_json_matches_the_circuit_tracer_format(built, loaded32, tmp_path):
    graph, pruned = built
    data = json.loads(write_json(graph_json(graph, pruned, "cat", "tiny-llava"), tmp_path / "g.json").read_text())
    check_graph_format(data, loaded32.anatomy.n_layers)
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert kinds == {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    assert data["links"] and len(data["nodes"]) < graph.n_nodes  # pruned, not empty
    target = next(n for n in data["nodes"] if n["is_target_logit"])
    assert target["feature"] == graph.vocab_size  # a logit difference gets a virtual vocabulary index
    assert data["metadata"]["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.98}


def test_image_patch_nodes_carry_their_grid_coordinates(built):
    graph, pruned = built
    data = graph_json(graph, pruned, "cat", "tiny-llava")
    patches = [n for n in data["nodes"] if "patch_row" in n]
    assert len(patches) == 16 and data["metadata"]["image"]["grid"] == [4, 4]
    assert {(n["patch_row"], n["patch_col"]) for n in patches} == {(r, c) for r in range(4) for c in range(4)}
    first = min(patches, key=lambda n: n["ctx_idx"])
    assert (first["patch_row"], first["patch_col"]) == (0, 0) and first["ctx_idx"] == int(graph.image_positions[0])
    assert all(n["node_id"].startswith(f"E_{VOCAB['<image>']}_") for n in patches)


def test_link_weights_are_the_graphs_direct_edges(built):
    graph, pruned = built
    data = graph_json(graph, pruned, "cat", "tiny-llava")
    target_id = next(n["node_id"] for n in data["nodes"] if n["is_target_logit"])
    column = {graph.embed_index(p): f"E_{int(graph.input_ids[p])}_{p}" for p in range(graph.n_pos)}
    into_target = {l["source"]: l["weight"] for l in data["links"] if l["target"] == target_id}
    for col, node_id in column.items():
        if node_id in into_target:
            assert into_target[node_id] == pytest.approx(float(graph.adjacency[-1, col]))


def test_patch_png_over_the_image(built, loaded32, tmp_path):
    graph, pruned = built
    path = save_patch_png(graph, pruned, random_image(), loaded32.processor, tmp_path / "p.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 100


def test_the_artifact_round_trip_keeps_the_graph(built, tmp_path):
    graph, pruned = built
    fingerprint = ModelFingerprint("tiny-llava", None, {"d_model": 64})
    save_graph(graph, tmp_path / "g", fingerprint, graph_json(graph, pruned, "cat", "tiny-llava"))
    back = load_graph(tmp_path / "g")
    assert torch.equal(back.adjacency, graph.adjacency) and torch.equal(back.active, graph.active)
    assert back.target == graph.target and back.tokens == graph.tokens and back.grid == graph.grid
    assert torch.allclose(back.completeness(), graph.completeness())
    assert (tmp_path / "g" / "graph.json").is_file()
