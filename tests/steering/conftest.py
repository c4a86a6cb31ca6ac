"""Fixtures for the steering tests: the tiny LLaVA as a Loaded, and small benchmark items with image files."""
import numpy as np
import pytest
import torch
from PIL import Image

from llava_circuits.data.records import Sample
from llava_circuits.models.anatomy import Anatomy
from llava_circuits.models.load import Loaded
from llava_circuits.models.tiny import tiny_llava, tiny_processor


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per test: tiny models gain nothing from more, and on a shared, loaded machine the idle
    threads of a niced process spin and wait for cores (the barrier's many small ops ran ~100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded():
    """A tiny random LLaVA of its own (tests attach hooks to it), wrapped as load_model returns it."""
    model = tiny_llava(seed=1)
    return Loaded(model, tiny_processor(), Anatomy.of(model), name_or_path="tiny-random-llava")


def images(folder, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img_{i}.png"
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def mc_samples(tmp_path_factory):
    """Six four-option questions over the tiny vocabulary, each with an image."""
    paths = images(tmp_path_factory.mktemp("mc"), 6)
    words = ["red", "blue", "green", "cat", "dog", "ball", "cup"]
    return [Sample(id=f"q{i}", question="what colour is the ball ?", image=paths[i],
                   choices=[words[(i + j) % len(words)] for j in range(4)], answer=i % 4) for i in range(6)]


@pytest.fixture(scope="module")
def pope_samples(tmp_path_factory):
    paths = images(tmp_path_factory.mktemp("pope"), 6, seed=1)
    return [Sample(id=str(i), question="is there a cat in the image ?", image=paths[i],
                   answer="yes" if i % 2 else "no", meta={"split": "random"}) for i in range(6)]
