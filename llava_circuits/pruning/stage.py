"""The demo's `pruning` stage: localize the toy's stereotype heads, prune them softly, fine-tune, measure.

The heads are localized on a fresh draw of the toy's BBQ-style items (another seed than the evaluated
file), evaluated by the harness on the data directory's `bbq` and `utility` benchmarks, and fine-tuned
on a copy of the model, so `loaded` is unchanged afterwards. The recipe is PruningConfig's defaults,
which configs/toy/pruning.yaml spells out.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shlex
from collections.abc import Callable
from pathlib import Path

from llava_circuits.data.readers import read_benchmark
from llava_circuits.models.anatomy import Anatomy
from llava_circuits.models.load import Loaded
from llava_circuits.pruning.commands import (
    AFTER,
    BEFORE,
    EVALUATION,
    MITIGATION,
    PRUNING,
    make_pruning,
)
from llava_circuits.pruning.config import BenchmarkSpec, PruningConfig
from llava_circuits.pruning.finetune import restore
from llava_circuits.pruning.localize import localize, plot_heatmaps
from llava_circuits.pruning.prune import SoftPruning
from llava_circuits.pruning.report import (
    evaluate_benchmarks,
    results_rows,
    write_results,
)

LOCALIZE_SEED = 104729
"""Seed of the toy BBQ draw the heads are localized on (the evaluated file uses the demo's seed)."""

PRUNING_BARS: dict[str, tuple[str, Callable[[dict], bool]]] = {
    "bias_score_ambig_after": ("|after| <= 0.5 x |before|",
                               lambda f: abs(f["bias_score_ambig_after"]) <= 0.5 * abs(f["bias_score_ambig_before"])),
    "accuracy_disambig_after": ("within 0.02 of before",
                                lambda f: abs(f["accuracy_disambig_after"] - f["accuracy_disambig_before"]) <= 0.02),
    "utility_after": ("within 0.02 of before", lambda f: abs(f["utility_after"] - f["utility_before"]) <= 0.02),
}
"""The acceptance bars of issue 11, in demo.TOY_BARS's format."""


def manifest_spec(entry: dict) -> BenchmarkSpec:
    """The harness benchmark, data and images of a toy manifest entry's eval command."""
    argv = shlex.split(entry["eval"])
    flags = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}
    return BenchmarkSpec(bench=argv[2], data=flags["--data"], images=flags.get("--images"))


def localization_items(out: Path, seed: int = LOCALIZE_SEED) -> Path:
    """A fresh draw of toy BBQ items, in BBQ's format, to localize on."""
    from llava_circuits.toy.writers import bbq_records

    path = out / "Nationality.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in bbq_records(seed)))
    return path


def pruning_stage(loaded: Loaded, data_dir: str | Path, out: str | Path, config: PruningConfig | None = None,
                  limit: int | None = None) -> dict:
    """Bias and utility of the toy before and after soft pruning + fine-tuning (after = both), in the
    reference folders under `out`, plus results.csv / results.md.

    `config` defaults to PruningConfig() (the toy recipe); `limit` answers only the first N items of each
    benchmark (quick runs; the demo uses all).
    """
    out, cfg = Path(out), config or PruningConfig()
    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    benches = {name: dataclasses.replace(manifest_spec(manifest[name]), limit=limit) for name in ("bbq", "utility")}
    bbq = localization_items(out / BEFORE / "items")
    cfg = dataclasses.replace(cfg, bbq=str(bbq))

    results = {"before": evaluate_benchmarks(loaded, benches, out / EVALUATION / "before", batch_size=cfg.eval_batch_size)}
    loc = localize(loaded, read_benchmark("bbq", bbq), cfg.influence, cfg.localize)
    loc.save(out / BEFORE)
    pruning = make_pruning(loc, cfg)
    pruning.save(out / PRUNING)
    heads = [(l, h) for l, h, _ in pruning.heads]
    plot_heatmaps(loc, out / BEFORE, heads)
    results["pruned"] = evaluate_benchmarks(loaded, benches, out / EVALUATION / "pruned", [pruning], cfg.eval_batch_size)

    model = copy.deepcopy(loaded.model)
    tuned = Loaded(model, loaded.processor, Anatomy.of(model), loaded.name_or_path, loaded.revision)
    restore(tuned, SoftPruning(pruning.alpha, pruning.mode, pruning.fingerprint), cfg.finetune, out / MITIGATION)
    results["finetuned"] = evaluate_benchmarks(tuned, benches, out / EVALUATION / "finetuned",
                                               batch_size=cfg.eval_batch_size)
    after = localize(tuned, read_benchmark("bbq", bbq), cfg.influence, cfg.localize)
    after.save(out / AFTER)
    plot_heatmaps(after, out / AFTER, heads)
    write_results(results_rows(results, benches), out)

    def figure(stage: str, name: str, key: str) -> float:
        return float(results[stage][name][key])

    return {
        "bias_score_ambig_before": figure("before", "bbq", "bias_score_ambig"),
        "bias_score_ambig_pruned": figure("pruned", "bbq", "bias_score_ambig"),
        "bias_score_ambig_after": figure("finetuned", "bbq", "bias_score_ambig"),
        "accuracy_disambig_before": figure("before", "bbq", "accuracy_disambig"),
        "accuracy_disambig_pruned": figure("pruned", "bbq", "accuracy_disambig"),
        "accuracy_disambig_after": figure("finetuned", "bbq", "accuracy_disambig"),
        "utility_before": figure("before", "utility", "accuracy"),
        "utility_pruned": figure("pruned", "utility", "accuracy"),
        "utility_after": figure("finetuned", "utility", "accuracy"),
        "heads_pruned": float(len(heads)),
    }
