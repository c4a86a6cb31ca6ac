import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava_circuits.data.permutations import all_permutations
from llava_circuits.metrics import parse_pope_answer
from llava_circuits.models.tiny import save_tiny, tiny_llava
from llava_circuits.steering.barrier import BarrierConfig, barrier_eval
from llava_circuits.steering.base import Intervention
from llava_circuits.steering.callbacks import compare, recipe
from llava_circuits.steering.steerfair import (
    SteerFairConfig,
    steerfair_eval,
    steerfair_fit,
)


class ForceAnswer(Intervention):
    """Test-only: a large bonus on one token's logit, so every answer is that word (not registered: no kind)."""

    def __init__(self, word: str):
        self.word, self.handle = word, None

    def attach(self, loaded):
        token = loaded.tokenizer.convert_tokens_to_ids(self.word)
        bonus = lambda module, args, out: out + 1e4 * (torch.arange(out.shape[-1]) == token)
        self.handle = loaded.anatomy.lm_head.register_forward_hook(bonus)

    def detach(self):
        self.handle.remove()

    def describe(self):
        return {"kind": "force-answer", "word": self.word}

    def save(self, path):
        raise NotImplementedError

    @classmethod
    def load(cls, path, loaded):
        raise NotImplementedError


def lines(path: Path) -> dict[str, dict]:
    return {str(r["id"]): r for r in map(json.loads, path.read_text().splitlines())}


def test_compare_writes_baseline_and_intervened_side_by_side_with_flips(loaded, pope_samples, tmp_path):
    out = tmp_path / "run"
    metrics = compare(loaded, "pope", pope_samples, [ForceAnswer("no")], out, batch_size=4, max_new_tokens=2)
    baseline, intervened = lines(out / "baseline" / "responses.jsonl"), lines(out / "intervened" / "responses.jsonl")
    assert sorted(baseline) == sorted(intervened) == sorted(s.id for s in pope_samples)
    assert all(parse_pope_answer(r["response"]) == "no" for r in intervened.values())
    assert metrics["intervened"]["yes_ratio"] == 0.0 and metrics["intervened"]["accuracy"] == 0.5
    right_before = {s.id for s in pope_samples if parse_pope_answer(baseline[s.id]["response"]) == s.answer}
    right_after = {s.id for s in pope_samples if s.answer == "no"}
    assert set(metrics["flips"]["right_to_wrong_ids"]) == right_before - right_after
    assert set(metrics["flips"]["wrong_to_right_ids"]) == right_after - right_before
    assert metrics["flips"]["compared"] == 6 and metrics["interventions"] == [{"kind": "force-answer", "word": "no"}]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    logged = (out / "logs" / "metrics.csv").read_text().splitlines()
    assert "flips/right_to_wrong" in logged[0] and "intervened/yes_ratio" in logged[0] and len(logged) == 2
    assert json.loads((out / "run.json").read_text())["interventions"] == metrics["interventions"]


def test_compare_resumes_what_an_interrupted_run_left(loaded, pope_samples, tmp_path):
    out = tmp_path / "run"
    first = compare(loaded, "pope", pope_samples, [ForceAnswer("no")], out, batch_size=4, max_new_tokens=2)
    path = out / "intervened" / "responses.jsonl"
    kept = path.read_text().splitlines()
    path.write_text("\n".join(kept[:3]) + "\n")  # killed after the baseline, before the intervened answers
    again = compare(loaded, "pope", pope_samples, [ForceAnswer("no")], out, batch_size=4, max_new_tokens=2)
    assert len((out / "baseline" / "responses.jsonl").read_text().splitlines()) == 6  # nothing answered twice
    assert sorted(lines(path)) == sorted(s.id for s in pope_samples)
    assert again["flips"] == first["flips"] and again["intervened"] == first["intervened"]


def test_multiple_choice_flips_and_position_figures(loaded, mc_samples, tmp_path):
    samples = all_permutations(mc_samples)
    metrics = compare(loaded, "scienceqa", samples, [ForceAnswer("A")], tmp_path / "mc", batch_size=8, max_new_tokens=1)
    after = metrics["intervened"]
    assert after["accuracy_by_gold_position"] == {"A": 1.0, "B": 0.0, "C": 0.0, "D": 0.0} and after["position_gap"] == 1.0
    assert metrics["flips"]["compared"] == len(samples) == 24


def test_recipe_arguments_win_over_the_yaml_which_wins_over_defaults(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: some/model\nbatch_size: 4\nsteerfair:\n  top_k: 6\n  alpha: 2.0\n")
    defaults = {"model": None, "batch_size": 8, "dtype": "auto"}
    run, config, given = recipe(path, "steerfair", SteerFairConfig, {"batch_size": 2, "model": None, "dtype": None},
                                defaults, {"alpha": 3.0, "combine": None})
    assert run == {"model": "some/model", "batch_size": 2, "dtype": "auto"}
    assert (config.top_k, config.alpha, config.combine) == (6, 3.0, "qr") and given == {"top_k", "alpha"}
    path.write_text("modle: x\n")
    with pytest.raises(ValueError, match="unknown key"):
        recipe(path, "steerfair", SteerFairConfig, {}, defaults, {})


def write_scienceqa(root: Path, n: int) -> Path:
    """n four-option questions with images in ScienceQA's original layout."""
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "cat", "dog", "ball", "cup"]
    problems = {}
    for i in range(n):
        pid = str(i + 1)
        (root / "images" / "test" / pid).mkdir(parents=True)
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(root / "images" / "test" / pid / "image.png")
        problems[pid] = {"question": "what colour is the ball ?", "choices": [words[(i + j) % 7] for j in range(4)],
                         "answer": i % 4, "hint": "", "image": "image.png", "split": "test"}
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"test": list(problems)}))
    return root / "problems.json"


@pytest.mark.slow
def test_commands_fit_evaluate_and_steer_from_a_saved_model(tmp_path):
    model = str(save_tiny(tiny_llava(seed=3), tmp_path / "model"))
    data = write_scienceqa(tmp_path / "sqa", 2)
    recipe_path = tmp_path / "steerfair.yaml"
    recipe_path.write_text(f"model: {model}\ndtype: float32\nbatch_size: 16\nsteerfair:\n  top_k: 3\n")
    summary = steerfair_fit(str(data), str(tmp_path / "fit"), config=str(recipe_path), alpha=0.5)
    assert summary["top_k"] == 3 and summary["alpha"] == 0.5 and len(summary["heads"]) == 3
    assert (tmp_path / "fit" / "kde_top_heads.png").is_file()
    metrics = steerfair_eval(str(tmp_path / "fit" / "steerfair"), str(data), str(tmp_path / "eval"),
                             config=str(recipe_path), top_k=2)
    assert metrics["flips"]["compared"] == 8 and len(metrics["interventions"][0]["heads"]) == 2
    pope = tmp_path / "pope"
    (pope / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(pope / "images" / "a.png")
    pope_file = pope / "coco_pope_adversarial.json"
    pope_file.write_text("".join(json.dumps({"question_id": i, "image": "a.png", "text": "is there a cat ?",
                                             "label": ["yes", "no"][i % 2]}) + "\n" for i in range(4)))
    result = barrier_eval(str(pope_file), str(tmp_path / "barrier"), model=model, dtype="float32", tau=0.9,
                          images=str(pope / "images"),
                          layers=[1, 2], phases=["prefill"], max_new_tokens=2, diagnose=2)
    assert BarrierConfig(**json.loads((tmp_path / "barrier" / "barrier" / "artifact.json").read_text())["config"]) == \
        BarrierConfig(tau=0.9, layers=[1, 2], phases=["prefill"])
    assert result["barrier"]["positions_steered"] > 0 and set(result["barrier"]["yes_minus_no_change_by_layer"]) == {"1", "2"}
    records = (tmp_path / "barrier" / "diagnostics.jsonl").read_text().splitlines()
    assert len(records) == 4 * 2 and {"h_before", "h_after", "theta_ratio"} <= set(json.loads(records[0]))


@pytest.mark.parametrize("path, section, cls", [
    ("configs/toy/steerfair.yaml", "steerfair", SteerFairConfig),
    ("configs/llava15_7b/steerfair.yaml", "steerfair", SteerFairConfig),
    ("configs/toy/barrier.yaml", "barrier", BarrierConfig),
])
def test_recipes_in_configs_are_read_by_their_commands(path, section, cls):
    from llava_circuits.steering import barrier, steerfair

    defaults = (steerfair if section == "steerfair" else barrier).RUN_DEFAULTS
    run, config, _ = recipe(Path(__file__).parents[2] / path, section, cls, {}, defaults, {})
    assert run["model"] and isinstance(config, cls)


@pytest.mark.slow
def test_demo_stages_report_their_figures(loaded, tmp_path):
    from llava_circuits.steering.barrier import barrier_stage
    from llava_circuits.steering.steerfair import steerfair_stage
    from llava_circuits.toy.writers import toy_data

    data = toy_data(str(tmp_path / "data"), seed=1).parent
    figures = steerfair_stage(loaded, data, tmp_path / "sf", SteerFairConfig(top_k=2), limit=4)
    assert {"position_gap_before", "position_gap_after", "permutation_std_before", "permutation_std_after",
            "settled_accuracy_before", "settled_accuracy_after"} <= set(figures)
    assert (tmp_path / "sf" / "steerfair" / "artifact.json").is_file()
    assert all(isinstance(v, float) for v in figures.values())  # the demo report formats every figure
    figures = barrier_stage(loaded, data, tmp_path / "barrier", BarrierConfig(tau=0.9, layers=[1]), limit=4)
    assert {"adversarial_fp_rate_before", "adversarial_fp_rate_after", "random_accuracy_before",
            "random_accuracy_after", "min_h_after_minus_tau"} <= set(figures)
    assert figures["positions_steered"] > 0 and math.isfinite(figures["min_h_after_minus_tau"])
    assert all(isinstance(v, float) for v in figures.values())


def test_both_interventions_run_inside_evaluate_loaded(loaded, tmp_path):
    from llava_circuits.evaluation.run import evaluate_loaded
    from llava_circuits.steering.barrier import Barrier
    from llava_circuits.steering.steerfair import SteerFair

    pope = tmp_path / "pope"
    (pope / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (20, 200, 30)).save(pope / "images" / "a.png")
    data = pope / "coco_pope_random.json"
    data.write_text("".join(json.dumps({"question_id": i, "image": "a.png", "text": "is there a cat ?",
                                        "label": ["yes", "no"][i % 2]}) + "\n" for i in range(3)))
    a = loaded.anatomy
    rule_dirs = torch.nn.functional.normalize(torch.randn(a.n_layers, a.n_heads, 4, a.head_dim, dtype=torch.float64), dim=-1)
    steer = SteerFair(rule_dirs, torch.rand(a.n_layers, a.n_heads, 4, dtype=torch.float64), SteerFairConfig(alpha=2.0))
    barrier = Barrier(BarrierConfig(tau=0.9, layers=[1]), record=True)
    metrics = evaluate_loaded(loaded, "pope", data, tmp_path / "run", pope / "images", [steer, barrier], batch_size=2,
                              max_new_tokens=2, progress=False)
    assert metrics is not None and len(lines(tmp_path / "run" / "responses.jsonl")) == 3
    assert barrier.summary()["positions_steered"] > 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [i["kind"] for i in run["interventions"]] == ["steerfair", "barrier"]


def test_command_functions_document_every_flag_for_the_cli():
    import argparse

    from docstring_parser import parse

    from llava_circuits.cli import _command

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    for name, fn in (("fit", steerfair_fit), ("eval", steerfair_eval), ("barrier", barrier_eval)):
        documented = {p.arg_name for p in parse(fn.__doc__).params}
        assert documented == set(inspect.signature(fn).parameters), name
        _command(sub, name, fn)
    args = parser.parse_args(["barrier", "--data", "d", "--out", "o", "--tau", "0.4", "--layers", "1", "--layers", "3",
                              "--phases", "prefill"])
    assert (args.tau, args.layers, args.phases, args.alpha) == (0.4, [1, 3], ["prefill"], None)
    args = parser.parse_args(["eval", "--intervention", "a", "--data", "d", "--out", "o", "--no-permutations",
                              "--per_layer", "--top_k", "3"])
    assert (args.permutations, args.per_layer, args.top_k, args.combine) == (False, True, 3, None)


def test_bench_steering_reports_both_overheads():
    from llava_circuits.steering.bench import bench_steering

    result = bench_steering(n=2, max_new_tokens=2, repeats=1)
    assert set(result["ratios"]) == {"steerfair_overhead", "barrier_overhead"}
    assert all(v > 0 for v in result["ratios"].values()) and result["barrier_positions_seen"] > 0
