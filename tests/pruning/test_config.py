from dataclasses import replace
from pathlib import Path

import pytest

from llava_circuits.finetune import FinetuneConfig
from llava_circuits.pruning.config import BenchmarkSpec, PruningConfig, load_config

CONFIGS = Path(__file__).parents[2] / "configs"


def test_the_toy_recipe_is_the_defaults():
    cfg = load_config(CONFIGS / "toy" / "pruning.yaml")
    assert replace(cfg, bbq=None, benchmarks={}) == PruningConfig()
    assert cfg.benchmarks["bbq"] == BenchmarkSpec("bbq", "toy-data/bbq/data/Nationality.jsonl")


@pytest.mark.parametrize("recipe", ["llava15_7b", "llama32_1b"])
def test_gpu_recipes_parse_with_all_five_benchmarks(recipe):
    cfg = load_config(CONFIGS / recipe / "pruning.yaml")
    assert {b.bench for b in cfg.benchmarks.values()} == {"bbq", "stereoset", "crows_pairs", "mmlu", "hellaswag"}
    assert isinstance(cfg.finetune.optim, FinetuneConfig) and cfg.finetune.optim.betas == (0.9, 0.95)
    assert cfg.mode in ("gate", "qkv") and cfg.influence.per_category == 50


def test_unknown_keys_are_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("select:\n  treshold: 0.2\n")
    with pytest.raises(ValueError, match=r"select: unknown key\(s\) \['treshold'\]"):
        load_config(path)
