import pytest

from llava_circuits.toy.processor import build_processor
from llava_circuits.toy.tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def toy_processor():
    """The toy LlavaProcessor (word-level tokenizer + CLIP image processor, PIL backend)."""
    return build_processor(build_tokenizer())
