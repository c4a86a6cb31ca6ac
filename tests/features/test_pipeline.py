"""The `features` commands end to end on a tiny LLaVA: capture -> classify -> analyze -> plot -> map -> steer -> eval."""
import json
from pathlib import Path

import pytest
import yaml

from llava_circuits.evaluation.run import evaluate
from llava_circuits.features.capture import features_capture
from llava_circuits.features.classify import features_classify
from llava_circuits.features.mapping import features_map
from llava_circuits.features.plots import features_plot
from llava_circuits.features.stats import features_analyze
from llava_circuits.features.steer import features_steer

from .conftest import pope_file

CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.mark.parametrize("path", ["toy/features.yaml", "llava15_7b/features.yaml"])
def test_shipped_configs_load(path):
    from llava_circuits.features.config import load_config

    cfg = load_config(CONFIGS / path)
    assert cfg.classify.rules["pope"].metric == "accuracy" and cfg.analyze.test == "fisher"


def test_config_checks_tags_per_step_and_unquoted_yaml_answers(tmp_path):
    from llava_circuits.features.config import load_config

    def load(raw: dict):
        path = tmp_path / "c.yaml"
        path.write_text(raw)
        return load_config(path)

    assert load("analyze: {tags: [prompt_last]}\nsteer: {tags: [prompt_last]}").analyze.tags == ["prompt_last"]
    with pytest.raises(ValueError, match="capture.tags: unknown tag"):  # captured positions are image/prompt/generated
        load("capture: {tags: [prompt_last]}")
    with pytest.raises(ValueError, match=r"classify.rules.pope.gold: \[False\] are not strings"):
        load("classify: {rules: {pope: {metric: accuracy, good: '>= 1', bad: '< 1', gold: [no]}}}")


@pytest.mark.slow
def test_commands_run_end_to_end_and_eval_accepts_the_steering(tiny_dir, transcoders_dir, tmp_path):
    data = pope_file(tmp_path / "pope", 12)
    images = str(tmp_path / "pope" / "images")
    config = tmp_path / "features.yaml"
    config.write_text(yaml.safe_dump({"analyze": {"alpha": 1.0, "target_features": 3, "min_per_layer": 1},
                                      "classify": {"min_class_size": 2}}))
    run = tmp_path / "run"
    features_capture("pope", str(tiny_dir), str(transcoders_dir), str(data), str(run), images=images,
                     config=str(config), batch_size=6, max_new_tokens=2, dtype="float32")
    # a tiny random model answers at random: label GOOD by the response's own answer so both classes exist
    labels = features_classify(str(run), config=str(config), metric="correct", good=">= 1", bad="< 1")
    assert labels["counts"]["GOOD"] + labels["counts"]["BAD"] == 12
    assert min(labels["counts"]["GOOD"], labels["counts"]["BAD"]) > 0, labels["counts"]  # the seeded model answers both ways
    results = features_analyze(str(run), config=str(config))
    assert results["good"]["selected_features_count"] == 3
    plots = features_plot(str(run), model=str(tiny_dir), top=1, samples=2)
    names = {p.name for p in plots}
    assert {"pope_frequency.png", "pope_good_top_features.png", "pope_good_layer_dist.png",
            "pope_good_activation_heatmap.png"} <= names
    assert any(n.startswith("pope_good_L") for n in names)  # image patches of a top feature
    mapping = features_map(str(run), str(tiny_dir), str(transcoders_dir), config=str(config), top_k=4)
    assert len(mapping) == 3 and all(len(m["top_mlp_neurons"]) == 4 for m in mapping)
    steer = features_steer(str(run), str(transcoders_dir), str(tmp_path / "steer"), config=str(config), which="good",
                           top=2, op="clamp", value=8.0, where="all")
    metrics = evaluate("pope", str(tiny_dir), str(data), str(tmp_path / "eval"), images=images,
                       intervention=[str(steer)], max_new_tokens=2, dtype="float32")
    assert "yes_ratio" in metrics
    run_json = json.loads((tmp_path / "eval" / "run.json").read_text())
    assert run_json["interventions"][0]["kind"] == "feature-analysis" and run_json["interventions"][0]["n_features"] == 2
