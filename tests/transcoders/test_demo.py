"""The demo stage runs end to end (a few steps on a tiny model) and reports its figures."""
import pytest

from llava_circuits.artifacts import read_artifact
from llava_circuits.models.anatomy import Anatomy
from llava_circuits.models.load import Loaded
from llava_circuits.models.tiny import tiny_llava, tiny_processor
from llava_circuits.toy.writers import toy_data
from llava_circuits.transcoders.demo import toy_recipe, transcoders_stage


def test_the_toy_recipe_is_the_configs():
    recipe = toy_recipe()
    assert recipe["transcoder"].activation == "topk" and recipe["steps"] > 0
    assert recipe["transcoder"].k / recipe["transcoder"].n_features <= 0.05  # the L0 bar, by construction


@pytest.mark.slow
def test_stage_reports_the_figures_and_saves_the_artifact(tmp_path):
    model = tiny_llava(n_layers=2)
    loaded = Loaded(model, tiny_processor(), Anatomy.of(model), name_or_path="tiny")
    toy_data(str(tmp_path / "data"), seed=0)
    figures = transcoders_stage(loaded, tmp_path / "data", tmp_path / "out", steps=3, val_sequences=16, prompts=16)
    keys = ("fvu_max", "l0_fraction_max", "dead_fraction_max", "next_token_agreement", "exact_with_error_max_abs_diff")
    assert all(isinstance(figures[k], float) for k in keys)
    assert figures["exact_with_error_max_abs_diff"] <= 1e-5
    assert 0.0 <= figures["next_token_agreement"] <= 1.0
    assert read_artifact(figures["artifact"]).kind == "transcoders"
