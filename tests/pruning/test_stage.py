import csv
from dataclasses import replace

import pytest

from llava_circuits.pruning.config import PruningConfig, RestoreConfig
from llava_circuits.pruning.influence import InfluenceConfig
from llava_circuits.pruning.select import SelectConfig
from llava_circuits.pruning.stage import PRUNING_BARS, manifest_spec, pruning_stage
from llava_circuits.toy.writers import toy_data

KEYS = {f"{figure}_{when}" for figure in ("bias_score_ambig", "accuracy_disambig", "utility")
        for when in ("before", "pruned", "after")} | {"heads_pruned"}


def test_manifest_eval_commands_become_harness_specs():
    entry = {"eval": "llava-circuits eval scienceqa --model {model} --data /d/problems.json --images /d/img --out {out}"}
    spec = manifest_spec(entry)
    assert (spec.bench, spec.data, spec.images) == ("scienceqa", "/d/problems.json", "/d/img")


@pytest.mark.slow
def test_pruning_stage_runs_on_a_llava_and_writes_the_reference_folders(llava_loaded, tmp_path):
    data_dir = toy_data(str(tmp_path / "data"), seed=3).parent
    cfg = replace(PruningConfig(), influence=InfluenceConfig(per_category=8),
                  select=SelectConfig(threshold=0.0, min_fraction=0.0, max_heads=2),
                  finetune=RestoreConfig(steps=2, batch_size=4, ckpt_every=1, n_examples=20))
    weights = {n: p.clone() for n, p in llava_loaded.model.named_parameters()}
    out = tmp_path / "pruning"
    figures = pruning_stage(llava_loaded, data_dir, out, cfg, limit=8)
    assert set(figures) == KEYS and figures["heads_pruned"] == 2.0
    assert all(isinstance(v, float) for v in figures.values())
    assert all(bar in figures for bar in PRUNING_BARS)
    for folder in ("bias_evaluation/before/bbq", "bias_evaluation/finetuned/utility", "bias_localization_before",
                   "bias_localization_after", "bias_mitigation/pruning"):
        assert (out / folder).is_dir(), folder
    assert (out / "bias_localization_after" / "r_attn_max.png").exists()
    rows = {(r["benchmark"], r["metric"]): r for r in csv.DictReader((out / "results.csv").open())}
    assert float(rows["bbq", "bias_score_ambig"]["before"]) == figures["bias_score_ambig_before"]
    assert float(rows["utility", "accuracy"]["finetuned"]) == figures["utility_after"]
    assert all((p == weights[n]).all() for n, p in llava_loaded.model.named_parameters())  # fine-tuned a copy


@pytest.mark.slow
def test_on_the_committed_toy_pruning_removes_the_stereotype_and_keeps_ability(tmp_path):
    """Issue 11's toy acceptance, as the demo measures it: the stereotype sits on heads L3H1 and L3H2 (planted by the
    recipe's stage 3), localization finds them, and pruning + restoring halves bias_score_ambig at no cost."""
    from pathlib import Path

    from llava_circuits.demo import DEMO_SEED
    from llava_circuits.models.load import load_model
    from llava_circuits.pruning.prune import SoftPruning

    toy = load_model(Path(__file__).parents[2] / "checkpoints" / "toy-llava", dtype="float32")
    data_dir = toy_data(str(tmp_path / "data"), seed=DEMO_SEED).parent
    figures = pruning_stage(toy, data_dir, tmp_path / "out")
    failing = [name for name, (_, holds) in PRUNING_BARS.items() if not holds(figures)]
    assert not failing, {k: round(v, 4) for k, v in figures.items()}
    assert figures["bias_score_ambig_before"] >= 0.5
    heads = {(l, h) for l, h, _ in SoftPruning.load(tmp_path / "out" / "bias_mitigation" / "pruning").heads}
    assert {(3, 1), (3, 2)} <= heads
