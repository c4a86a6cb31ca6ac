"""`features classify`: GOOD / BAD per sample from the benchmark's official per-sample results.

Each sample is scored alone by its benchmark's own metric (the same torchmetrics code as metrics.json;
AMBER keeps the run's whole object vocabulary), so "accuracy" of a POPE sample is 1 when its answer is
right by POPE's official parsing, and "cover" of an AMBER caption is its share of truth objects named.
Tasks with a gold answer also get `correct` (BBQ, whose per-sample keys are per condition, uses it).
A rule from the config (features.yaml `classify.rules`) turns the chosen metric into GOOD, BAD or neither.

    RUN/classification.json   {"bench", "rule", "counts": {GOOD, BAD, neither}, "warnings", "GOOD": [...], "BAD": [...]}
"""
from __future__ import annotations

import json
import operator
import re
import warnings
from pathlib import Path

from llava_circuits.data.readers import read_benchmark
from llava_circuits.data.records import Sample
from llava_circuits.evaluation.module import ResponseLog
from llava_circuits.evaluation.run import write_json
from llava_circuits.evaluation.tasks import Task, predicted_letter, task_for
from llava_circuits.features.config import ClassifyConfig, Rule, load_config
from llava_circuits.metrics import AmberMetric, object_vocabulary, parse_pope_answer

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
COMPARISON = re.compile(r"^\s*(>=|<=|==|>|<)\s*(-?[0-9.eE+-]+)\s*$")


def compare(text: str, value: float) -> bool:
    """Whether `value` satisfies a comparison like ">= 1" or "< 0.5"."""
    match = COMPARISON.match(text)
    if not match:
        raise ValueError(f"a GOOD/BAD rule must look like '>= 1' or '< 0.5', got {text!r}")
    return OPS[match.group(1)](value, float(match.group(2)))


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)):
            out[f"{prefix}{key}"] = float(value)
    return out


def correct(task: Task, sample: Sample, response: dict) -> float | None:
    """1.0 / 0.0 when the task has a single gold answer, None otherwise."""
    if task.name == "pope":
        return float(parse_pope_answer(response["response"]) == str(sample.answer).strip().lower())
    if sample.choices and isinstance(sample.answer, int):
        return float(predicted_letter(sample, response) == sample.answer)
    return None


def per_sample_results(bench: str, samples: list[Sample], responses: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Sample id -> its official metrics computed on that sample alone (answered samples only)."""
    task = task_for(bench)
    answered = [s for s in samples if s.id in responses]
    if task.name == "amber":
        objects = {o for s in samples for o in [*s.meta.get("truth_objects", []), *s.meta.get("hallu_objects", [])]}
        vocabulary = object_vocabulary(objects)
    out = {}
    for s in answered:
        if task.name == "amber":  # the run's vocabulary, as score_amber uses, not just this item's objects
            metric = AmberMetric(vocabulary=vocabulary, sync_on_compute=False)
            truth = s.answer if s.meta.get("type") == "discriminative" else s.meta.get("truth_objects", [])
            metric.update([responses[s.id]["response"]], [truth], [s.meta.get("hallu_objects", [])])
            results = flatten(metric.compute())
        else:
            results = flatten(task.score([s], {s.id: responses[s.id]}))
        ok = correct(task, s, responses[s.id])
        if ok is not None:
            results["correct"] = ok
        out[s.id] = results
    return out


def classify_results(results: dict[str, dict[str, float]], rule: Rule, gold: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """{"GOOD": [...], "BAD": [...], "neither": [...]}, each entry {"id", **metrics}; samples without the metric are
    left out (an error names the keys there are when no sample has it). With `rule.gold`, samples whose gold
    answer (`gold`: id -> answer) is not listed there are "neither"."""
    classes: dict[str, list[dict]] = {"GOOD": [], "BAD": [], "neither": []}
    have = [r for r in results.values() if rule.metric in r]
    if results and not have:
        keys = sorted({k for r in results.values() for k in r})
        raise ValueError(f"no sample has metric {rule.metric!r}; per-sample metrics here: {keys}")
    for sample_id, metrics in results.items():
        if rule.metric not in metrics:
            continue
        if rule.gold is not None and str(gold[sample_id]).strip().lower() not in {g.lower() for g in rule.gold}:
            classes["neither"].append({"id": sample_id, **metrics})
            continue
        value = metrics[rule.metric]
        good, bad = compare(rule.good, value), compare(rule.bad, value)
        if good and bad:
            raise ValueError(f"rule {rule} puts sample {sample_id} ({rule.metric}={value}) in both GOOD and BAD")
        classes["GOOD" if good else "BAD" if bad else "neither"].append({"id": sample_id, **metrics})
    return classes


def classify_run(run: str | Path, cfg: ClassifyConfig | None = None, rule: Rule | None = None) -> dict:
    """Classify a capture run's answers and write RUN/classification.json; returns its content."""
    run, cfg = Path(run), cfg or ClassifyConfig()
    info = json.loads((run / "capture.json").read_text())
    bench = info["bench"]
    rule = rule or cfg.rules.get(bench)
    if rule is None:
        raise ValueError(f"no GOOD/BAD rule for {bench!r} in the config (classify.rules has {sorted(cfg.rules)})")
    task = task_for(bench)
    samples = read_benchmark(task.reader or task.name, info["data"], info.get("images"))
    results = per_sample_results(bench, samples, ResponseLog(run).read("responses"))
    classes = classify_results(results, rule, {str(s.id): s.answer for s in samples})
    counts = {name: len(items) for name, items in classes.items()}
    notes = [f"{name} has {counts[name]} samples, fewer than the minimum {cfg.min_class_size}: its statistics are noisy"
             for name in ("GOOD", "BAD") if counts[name] < cfg.min_class_size]
    for note in notes:
        warnings.warn(note, stacklevel=2)
    payload = {"bench": bench, "rule": {"metric": rule.metric, "good": rule.good, "bad": rule.bad, "gold": rule.gold},
               "counts": counts, "min_class_size": cfg.min_class_size, "warnings": notes,
               "GOOD": classes["GOOD"], "BAD": classes["BAD"]}
    write_json(run / "classification.json", payload)
    return payload


def features_classify(run: str, config: str | None = None, metric: str | None = None, good: str | None = None,
                      bad: str | None = None, gold: list[str] | None = None, min_class_size: int | None = None) -> dict:
    """Label every captured sample GOOD or BAD from its official per-sample result (RUN/classification.json).

    Args:
        run: a `features capture` run directory
        config: features recipe YAML; its classify section (rules per benchmark, min_class_size)
        metric: per-sample metric of the rule (overrides the config's rule for this benchmark)
        good: comparison a GOOD sample satisfies, e.g. ">= 1" (with --metric)
        bad: comparison a BAD sample satisfies, e.g. "< 1" (with --metric)
        gold: only samples with this gold answer (repeatable, with --metric), e.g. --gold no for POPE's absent objects
        min_class_size: warn when GOOD or BAD is smaller than this
    """
    cfg = load_config(config).classify
    if min_class_size is not None:
        cfg.min_class_size = min_class_size
    rule = Rule(metric, good or ">= 1", bad or "< 1", gold) if metric else None
    payload = classify_run(run, cfg, rule)
    print(f"features classify: {payload['counts']} -> {Path(run) / 'classification.json'}")
    return payload
