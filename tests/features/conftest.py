"""Tiny LLaVA, transcoders fitted to its own activations, and small POPE files for the features tests."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_circuits.models.load import load_model
from llava_circuits.models.tiny import save_tiny, tiny_llava
from llava_circuits.sites import capture
from llava_circuits.transcoders.io import save_transcoders
from llava_circuits.transcoders.transcoder import TranscoderConfig, TranscoderSet


def pope_file(folder: Path, n: int, name: str = "coco_pope_random.json") -> Path:
    """n POPE questions in the official format with distinct little images in folder/images."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        image = f"COCO_val2014_{i:012d}.jpg"
        Image.new("RGB", (32, 32), (i * 37 % 255, i * 11 % 255, 160)).save(folder / "images" / image)
        obj = ("cat", "dog", "ball")[i % 3]
        lines.append(json.dumps({"question_id": i, "image": image, "text": f"Is there a {obj} in the image?",
                                 "label": "yes" if i % 2 else "no"}))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def fit_transcoders(loaded, inputs, activation: str = "relu", n_features: int = 32, k: int = 4,
                    cross_layer: bool = False) -> TranscoderSet:
    """Transcoders for every layer initialised from the model's own MLP activations on `inputs`."""
    layers = list(range(loaded.anatomy.n_layers))
    sites = [f"layers.{l}.mlp.{k}" for l in layers for k in ("in", "out")]
    with torch.no_grad(), capture(loaded.model, sites) as cap:
        loaded.model(**inputs)
    xs = {l: cap[f"layers.{l}.mlp.in"].flatten(0, 1) for l in layers}
    ys = {l: cap[f"layers.{l}.mlp.out"].flatten(0, 1) for l in layers}
    cfg = TranscoderConfig(n_features=n_features, k=k, activation=activation, cross_layer=cross_layer)
    tcs = TranscoderSet(loaded.anatomy.d_model, cfg, layers)
    tcs.init_from_data(xs, ys, torch.ones(len(xs[0])))
    with torch.no_grad():  # identical tokens seed identical features: break the ties
        for p in tcs.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return tcs


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny(tiny_llava(), tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return load_model(tiny_dir, dtype="float32")


@pytest.fixture(scope="session")
def tiny_transcoders(tiny, llava_inputs):
    return fit_transcoders(tiny, llava_inputs)


@pytest.fixture(scope="session")
def transcoders_dir(tiny, tiny_transcoders, tmp_path_factory):
    return save_transcoders(tiny_transcoders, tmp_path_factory.mktemp("tc") / "transcoders", tiny.fingerprint()).path


@pytest.fixture(scope="session")
def pope_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pope")
    pope_file(folder, 12)
    return folder
