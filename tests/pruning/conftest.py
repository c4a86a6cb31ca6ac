"""Tiny models for the pruning tests, as `Loaded`s."""
import pytest
import torch

from llava_circuits.models.anatomy import Anatomy
from llava_circuits.models.load import Loaded, load_model
from llava_circuits.models.tiny import save_tiny, tiny_llama, tiny_llava, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny(tiny_llama(), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def llama(tiny_llama_dir):
    return load_model(tiny_llama_dir, dtype="float32")


@pytest.fixture
def qwen(qwen2):
    """The shared `qwen2` fixture (GQA: 4 query heads, 2 KV heads) as a Loaded; every test must leave it as it was."""
    before, hooks = {n: p.detach().clone() for n, p in qwen2.state_dict().items()}, _hooks(qwen2)
    yield Loaded(qwen2, tiny_tokenizer(), Anatomy.of(qwen2), "tiny-qwen2")
    assert all(torch.equal(p, before[n]) for n, p in qwen2.state_dict().items()), "the test changed the qwen2 fixture"
    assert _hooks(qwen2) == hooks, "the test left a hook on the qwen2 fixture"


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.fixture
def llava_loaded(tmp_path_factory):
    return load_model(save_tiny(tiny_llava(), tmp_path_factory.mktemp("tiny-llava")), dtype="float32")
