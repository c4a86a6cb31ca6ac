"""Transcoders: training every layer's from one forward pass (Lightning: DDP or layer-sharded, resumable),
circuit-tracer artifacts, and the replacement model. See docs/transcoders.md."""
from llava_circuits.transcoders.io import load_transcoders, save_transcoders, transcoders_export
from llava_circuits.transcoders.replacement import FeatureEdit, ReplacementModel
from llava_circuits.transcoders.transcoder import TranscoderConfig, TranscoderSet

__all__ = [
    "FeatureEdit", "ReplacementModel", "TranscoderConfig", "TranscoderSet",
    "load_transcoders", "save_transcoders", "transcoders_export",
]
