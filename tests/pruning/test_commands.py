"""The whole pipeline through its CLI functions on a tiny Llama, with the fixture files of all five benchmarks."""
import argparse
import csv
import inspect
import json
from pathlib import Path

import pytest
import yaml
from docstring_parser import parse as parse_docstring

from llava_circuits.artifacts import read_artifact
from llava_circuits.cli import _command
from llava_circuits.models.load import load_model
from llava_circuits.pruning.commands import (
    prune_apply,
    prune_eval,
    prune_finetune,
    prune_localize,
)

FIXTURES = Path(__file__).parents[1] / "fixtures"
BENCHMARKS = {
    "bbq": {"bench": "bbq_loglik", "data": str(FIXTURES / "bbq")},
    "stereoset": {"bench": "stereoset", "data": str(FIXTURES / "stereoset" / "dev.json")},
    "crows_pairs": {"bench": "crows_pairs", "data": str(FIXTURES / "crows_pairs" / "crows_pairs_anonymized.csv")},
    "mmlu": {"bench": "mmlu", "data": str(FIXTURES / "mmlu" / "data" / "test")},
    "hellaswag": {"bench": "hellaswag", "data": str(FIXTURES / "hellaswag" / "hellaswag_val.jsonl")},
}


def recipe(tmp_path: Path, mode: str) -> Path:
    data = tmp_path / "restore.jsonl"
    rows = [{"prompt": f"is there a {w} ?", "answer": "yes"} for w in ("cat", "dog", "cup")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "bbq": str(FIXTURES / "bbq"),
        "influence": {"variant": "context", "conditions": ["ambig", "disambig"]},
        "select": {"threshold": 0.0, "min_fraction": 0.0, "max_heads": 2, "schedule": "constant", "alpha_max": 0.8},
        "mode": mode,
        "finetune": {"data": str(data), "steps": 2, "batch_size": 2, "ckpt_every": 1},
        "benchmarks": BENCHMARKS,
        "eval_batch_size": 4,
    }
    path = tmp_path / "pruning.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["gate"])
def test_localize_apply_finetune_eval_on_a_tiny_llama(tiny_llama_dir, tmp_path, mode):
    config, run = str(recipe(tmp_path, mode)), tmp_path / "run"
    summary = prune_localize(str(tiny_llama_dir), str(run), config, dtype="float32")
    assert summary["items"] == 10 and summary["categories"][0] == "all"
    before = run / "bias_localization_before"
    assert {"influence.jsonl", "correlations.safetensors", "localization.json", "r_attn_max.png", "r_head_norm.png"} \
        <= {p.name for p in before.iterdir()}

    applied = prune_apply(str(run), config)
    assert applied["n_pruned"] == 2 and all(h["alpha"] == 0.8 for h in applied["heads"])
    artifact = read_artifact(run / "bias_mitigation" / "pruning", expected_kind="pruning")
    assert artifact.config["mode"] == mode and artifact.config["select"]["max_heads"] == 2

    record = prune_finetune(str(tiny_llama_dir), str(run), config, dtype="float32")
    assert record["steps"] == 2 and Path(record["model"]).is_dir()
    tuned = load_model(record["model"], dtype="float32")
    assert tuned.anatomy.n_heads == 4

    results = prune_eval(str(tiny_llama_dir), str(run), config, dtype="float32")
    assert set(results) == {"before", "pruned", "finetuned"}
    assert all(set(results[s]) == set(BENCHMARKS) for s in results)
    rows = list(csv.DictReader((run / "results.csv").open()))
    metrics = {(r["benchmark"], r["metric"]) for r in rows}
    assert {("bbq", "bias_score_ambig"), ("bbq", "accuracy_disambig"), ("stereoset", "icat"), ("stereoset", "ss"),
            ("stereoset", "lms"), ("crows_pairs", "pct_stereotype"), ("mmlu", "accuracy"),
            ("hellaswag", "acc_norm")} <= metrics
    assert all(r["before"] and r["pruned"] and r["finetuned"] for r in rows)
    assert "| bbq | bias_score_ambig |" in (run / "results.md").read_text()
    pruned_run = json.loads((run / "bias_evaluation" / "pruned" / "mmlu" / "run.json").read_text())
    assert pruned_run["interventions"][0]["kind"] == "pruning" and pruned_run["interventions"][0]["mode"] == mode
    assert (run / "bias_localization_after" / "r_head_norm.png").exists()
    # the pruning changes the model's answers; the "before" run is the unpruned model
    plain = json.loads((run / "bias_evaluation" / "before" / "mmlu" / "responses.jsonl").read_text().splitlines()[0])
    pruned = json.loads((run / "bias_evaluation" / "pruned" / "mmlu" / "responses.jsonl").read_text().splitlines()[0])
    assert plain["logliks"] != pruned["logliks"]


def test_eval_without_benchmarks_is_an_error(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="benchmarks"):
        prune_eval(str(tiny_llama_dir), str(tmp_path), None)


@pytest.mark.parametrize("fn", [prune_localize, prune_apply, prune_finetune, prune_eval])
def test_every_command_parameter_is_documented_and_becomes_a_flag(fn):
    documented = {p.arg_name for p in parse_docstring(fn.__doc__).params}
    assert documented == set(inspect.signature(fn).parameters)
    parser = _command(argparse.ArgumentParser().add_subparsers(), "x", fn)
    args = vars(parser.parse_args(["--out", "RUN"] + (["--model", "M"] if "model" in documented else [])))
    assert args["out"] == "RUN" and args["config"] is None
