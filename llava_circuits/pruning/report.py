"""Bias and utility before pruning, after pruning and after fine-tuning: harness runs, one table, one CSV.

Every figure comes from the evaluation harness (`evaluate_loaded`), whose runs land in
bias_evaluation/{before,pruned,finetuned}/{name}/ (responses.jsonl, metrics.json, run.json; a rerun into
the same folder skips answered items, so use a fresh run directory for a different model or pruning).
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from llava_circuits.evaluation.run import evaluate_loaded
from llava_circuits.models.load import Loaded
from llava_circuits.pruning.config import BenchmarkSpec

STAGES = ("before", "pruned", "finetuned")
BBQ_FIGURES = ("bias_score_ambig", "bias_score_disambig", "accuracy_ambig", "accuracy_disambig")
FIGURES: dict[str, tuple[str, ...]] = {
    "bbq": BBQ_FIGURES,
    "bbq_loglik": BBQ_FIGURES,
    "stereoset": ("ss", "lms", "icat"),
    "crows_pairs": ("pct_stereotype",),
    "mmlu": ("accuracy",),
    "hellaswag": ("acc", "acc_norm"),
    "scienceqa": ("accuracy",),
    "pope": ("accuracy", "f1"),
}
"""The figures of each harness benchmark that go into the table (metrics.json holds them all)."""


def evaluate_benchmarks(loaded: Loaded, benchmarks: dict[str, BenchmarkSpec], out: str | Path,
                        interventions: Sequence = (), batch_size: int = 8) -> dict[str, dict]:
    """Run every benchmark through the harness into out/{name}/; returns name -> metrics."""
    out = Path(out)
    return {name: evaluate_loaded(loaded, spec.bench, spec.data, out / name, spec.images, interventions, batch_size,
                                  spec.limit, progress=False, config={"spec": vars(spec)})
            for name, spec in benchmarks.items()}


def figures(bench: str, metrics: dict) -> dict[str, float]:
    """The table's figures of one run: FIGURES[bench], plus BBQ's per-category figures as "Category/figure"."""
    keys = FIGURES.get(bench) or [k for k, v in metrics.items() if isinstance(v, (int, float))]
    out = {k: float(metrics[k]) for k in keys if k in metrics}
    by_category = metrics.get("by_category") or {}
    if bench in ("bbq", "bbq_loglik") and len(by_category) > 1:
        out |= {f"{c}/{k}": float(v[k]) for c, v in sorted(by_category.items()) for k in BBQ_FIGURES if k in v}
    return out


def results_rows(results: dict[str, dict[str, dict]], benchmarks: dict[str, BenchmarkSpec]) -> list[dict]:
    """One row per (benchmark, figure) with a column per stage that was run."""
    rows: dict[tuple[str, str], dict] = {}
    for stage, by_name in results.items():
        for name, metrics in by_name.items():
            for key, value in figures(benchmarks[name].bench, metrics).items():
                rows.setdefault((name, key), {"benchmark": name, "metric": key})[stage] = value
    return list(rows.values())


def write_results(rows: list[dict], out: str | Path) -> tuple[Path, Path]:
    """out/results.csv and out/results.md (atomically): benchmark, metric, one column per stage."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = [s for s in STAGES if any(s in r for r in rows)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["benchmark", "metric", *stages], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    lines = ["| benchmark | metric | " + " | ".join(stages) + " |", "| --- | --- |" + " --- |" * len(stages)]
    for r in rows:
        cells = [f"{r[s]:.4f}" if s in r else "" for s in stages]
        lines.append(f"| {r['benchmark']} | {r['metric']} | " + " | ".join(cells) + " |")
    paths = (out / "results.csv", out / "results.md")
    for path, text in zip(paths, (buffer.getvalue(), "\n".join(lines) + "\n")):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return paths
