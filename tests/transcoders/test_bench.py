"""bench_transcoders: the three trainers side by side report their ratios."""
import sys

import pytest

from llava_circuits.models.anatomy import Anatomy
from llava_circuits.models.load import Loaded
from llava_circuits.models.tiny import tiny_llava, tiny_processor
from llava_circuits.transcoders.bench import bench_transcoders, fit_sparsify, text_batches


def test_text_batches_are_fixed_and_imageless():
    model = tiny_llava()
    loaded = Loaded(model, tiny_processor(), Anatomy.of(model), name_or_path="tiny")
    a, b = text_batches(loaded, 2, 3, 5), text_batches(loaded, 2, 3, 5)
    assert all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(a, b))
    assert not any((x["input_ids"] == loaded.anatomy.image_token_id).any() for x in a)


@pytest.mark.slow
def test_bench_reports_ratios_and_layers_and_null_without_sparsify(monkeypatch):
    monkeypatch.setitem(sys.modules, "sparsify", None)  # `import sparsify` raises ImportError
    result = bench_transcoders(steps=2, batch=4, seq=8, n_features=32, k=4, repeats=1, warmup=0)
    assert result["n_layers"] >= 3 and result["tokens"] == 2 * 4 * 8
    assert result["ratios"]["all_layers_vs_layerwise"] > 0 and set(result["tokens_per_second"]) == {"all_layers", "layerwise"}
    assert result["ratios"]["vs_sparsify"] is None
    assert result["sparsify"].startswith("not measured: eai-sparsify is not importable")


@pytest.mark.slow
def test_sparsify_trains_the_same_hookpoints_on_the_same_tokens(tmp_path):
    pytest.importorskip("sparsify", reason="eai-sparsify (the `bench` extra) is not installed")
    model = tiny_llava(n_layers=2)
    loaded = Loaded(model, tiny_processor(), Anatomy.of(model), name_or_path="tiny")
    fit_sparsify(loaded, text_batches(loaded, 1, 2, 4), [0, 1], n_features=8, k=2)
