"""Fixtures: tiny LLaVA models (float64 for exact checks, float32 as used), one prompt, random transcoders."""
import numpy as np
import pytest
import torch
from PIL import Image

from llava_circuits.models.anatomy import Anatomy
from llava_circuits.models.load import Loaded
from llava_circuits.models.tiny import tiny_llava, tiny_processor
from llava_circuits.transcoders.transcoder import TranscoderConfig, TranscoderSet

PROMPT = "USER: <image>\nis there a cat in the image ? ASSISTANT:"
KINDS = {  # name -> (activation, cross_layer, skip, layers)
    "plt-relu": ("relu", False, False, [0, 1, 2]),
    "plt-topk-skip": ("topk", False, True, [0, 1, 2]),
    "clt-jumprelu": ("jumprelu", True, False, [0, 1, 2]),
    "plt-missing-layer": ("relu", False, False, [0, 2]),
}


def make_loaded(dtype: torch.dtype, n_kv_heads: int = 4) -> Loaded:
    model = tiny_llava(seed=1, n_kv_heads=n_kv_heads).to(dtype)
    return Loaded(model, tiny_processor(), Anatomy.of(model), name_or_path="tiny-llava")


def make_transcoders(kind: str, seed: int = 0) -> TranscoderSet:
    """Random transcoders (float32) for the tiny LLaVA: d_model 64, 48 features per layer."""
    activation, cross, skip, layers = KINDS[kind]
    cfg = TranscoderConfig(n_features=48, k=5, activation=activation, cross_layer=cross, skip=skip,
                           threshold_init=0.2, seed=seed)
    tcs = TranscoderSet(64, cfg, layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for l in layers:
            tcs[l].b_enc.copy_(0.1 * torch.randn(48, generator=gen))
            tcs[l].b_dec.copy_(0.05 * torch.randn(tcs[l].b_dec.shape, generator=gen))
            if skip:  # small, as trained skips are: a large random one amplifies float rounding layer by layer
                tcs[l].W_skip.copy_(0.002 * torch.randn(64, 64, generator=gen))
    return tcs


@pytest.fixture(scope="module")
def loaded64():
    return make_loaded(torch.float64)


@pytest.fixture(scope="module")
def loaded64_gqa():
    """Grouped-query attention: 4 query heads share 2 key/value heads."""
    return make_loaded(torch.float64, n_kv_heads=2)


@pytest.fixture(scope="module")
def loaded32():
    return make_loaded(torch.float32)


def prompt_inputs(loaded: Loaded, prompt: str = PROMPT, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))
    inputs = dict(loaded.processor(images=[image], text=[prompt], return_tensors="pt"))
    inputs["pixel_values"] = inputs["pixel_values"].to(next(loaded.model.parameters()).dtype)
    return inputs


def random_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny matmuls: on a shared, loaded CPU extra threads only wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
