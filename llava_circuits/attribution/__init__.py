"""Attribution graphs for LLaVA with image patches as input nodes: build (frozen linearised replacement
model), prune (cumulative influence), export (circuit-tracer / Neuronpedia graph JSON, patch PNG).
See docs/attribution.md."""
from llava_circuits.attribution.artifact import load_graph, save_graph
from llava_circuits.attribution.build import AttributionConfig, Graph, Target, attribute_graph, prepare_inputs
from llava_circuits.attribution.export import graph_json, patch_influence, save_patch_png
from llava_circuits.attribution.linear import LinearModel, raw_transcoders, record
from llava_circuits.attribution.prune import Pruned, prune

__all__ = [
    "AttributionConfig", "Graph", "LinearModel", "Pruned", "Target", "attribute_graph", "graph_json", "load_graph",
    "patch_influence", "prepare_inputs", "prune", "raw_transcoders", "record", "save_graph", "save_patch_png",
]
