"""`features analyze`: which transcoder features separate GOOD answers from BAD ones, tested and selected.

Per (layer, feature), over the samples classified GOOD (n_good of them) and BAD (n_bad), with a sample's
activation of a feature pooled over its read positions (`pool`: mean with zeros included, or max), and
"active in a sample" meaning non-zero at one read position at least:

    good_freq            samples of GOOD where it is active / n_good          (bad_freq: same over BAD)
    good_avg_activation  sum over GOOD of its pooled activation / n_good      (zeros included; bad_avg: BAD)
    frequency_ratio      good_freq / (bad_freq + epsilon)
    activation_ratio     good_avg / (bad_avg + epsilon)
    goodness_score       frequency_ratio * good_avg                           (the reference pipeline's score)
    badness_score        bad_freq / (good_freq + epsilon) * bad_avg           (the same, for BAD)
    p_value              two-sided test of active-vs-inactive x GOOD-vs-BAD: Fisher's exact test, or the log
                         odds ratio with `prior` added to each cell (z = log OR / its standard error)
    q_value              Benjamini-Hochberg over every (layer, feature) analyzed

Selection, for "good" (good_freq > bad_freq, q <= alpha, ranked by goodness_score) and for "bad" (the
mirror image, ranked by badness_score): round-robin across layers, round r taking each layer's r-th best
candidate, in layer order, until target_features; the first min_per_layer rounds are always completed.

    RUN/analysis/{dataset}_good_features.json, {dataset}_bad_features.json   the reference pipeline's shape
    RUN/analysis/stats.safetensors                                          every statistic as [n_layers, d_tc]
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from scipy.special import gammaln, ndtr

from llava_circuits.evaluation.run import write_json
from llava_circuits.features.config import (
    AnalyzeConfig,
    FeaturesConfig,
    check,
    load_config,
    override,
)
from llava_circuits.features.store import iter_samples


@dataclass
class Counts:
    """Per-class sums the statistics are made of, each [n_layers, n_features] float64."""

    layers: list[int]
    n_features: int
    n_good: int
    n_bad: int
    good_active: np.ndarray  # samples where active
    bad_active: np.ndarray
    good_sum: np.ndarray  # summed pooled activation
    bad_sum: np.ndarray


def pooled(sample, layers: list[int], n_features: int, cfg: AnalyzeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(active [n_layers * n_features] bool, pooled activation [n_layers * n_features]) of one sample."""
    acts = sample.at(cfg.tags)
    lut = torch.full((max(layers) + 1,), -1, dtype=torch.long)
    lut[torch.tensor(layers)] = torch.arange(len(layers))
    layer = acts.layer.long()
    slot = torch.where(layer < len(lut), lut[layer.clamp_max(len(lut) - 1)], -1)
    known = slot >= 0
    index = slot[known] * n_features + acts.feature[known].long()
    values = acts.value[known].double()
    active = torch.zeros(len(layers) * n_features, dtype=torch.bool)
    active[index] = values != 0
    if cfg.pool == "max":
        pool = torch.zeros(len(layers) * n_features, dtype=torch.float64).scatter_reduce(0, index, values, "amax")
    else:
        pool = torch.zeros(len(layers) * n_features, dtype=torch.float64).index_add_(0, index, values)
        pool /= max(1, sample.n_positions(cfg.tags))
    return active, pool


def count(run: str | Path, classification: dict, layers: list[int], n_features: int, cfg: AnalyzeConfig) -> Counts:
    """Sums over the GOOD and BAD samples of a capture run (samples without activations are not counted)."""
    label = {str(e["id"]): "GOOD" for e in classification["GOOD"]} | {str(e["id"]): "BAD" for e in classification["BAD"]}
    size = len(layers) * n_features
    sums = {c: [np.zeros(size), np.zeros(size), 0] for c in ("GOOD", "BAD")}
    for sample in iter_samples(run, set(label)):
        active, pool = pooled(sample, layers, n_features, cfg)
        s = sums[label[sample.id]]
        s[0] += active.numpy()
        s[1] += pool.numpy()
        s[2] += 1
    shape = (len(layers), n_features)
    g, b = sums["GOOD"], sums["BAD"]
    return Counts(layers, n_features, g[2], b[2], g[0].reshape(shape), b[0].reshape(shape), g[1].reshape(shape),
                  b[1].reshape(shape))


def fisher_p(a: np.ndarray, b: np.ndarray, n_good: int, n_bad: int) -> np.ndarray:
    """Two-sided Fisher exact p of the tables [[a, n_good - a], [b, n_bad - b]] (any shape).

    With the margins fixed, a follows a hypergeometric law that depends only on k = a + b, so the
    p-values are computed once per distinct k: the sum of the probabilities of the outcomes no more likely
    than the observed one (relative tolerance 1e-7, as scipy.stats.fisher_exact).
    """
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    k, n = a + b, n_good + n_bad
    out = np.ones(a.shape)
    lchoose = lambda m, x: gammaln(m + 1) - gammaln(x + 1) - gammaln(m - x + 1)
    for kk in np.unique(k):
        lo, hi = max(0, kk - n_bad), min(kk, n_good)
        x = np.arange(lo, hi + 1)
        pmf = np.exp(lchoose(n_good, x) + lchoose(n_bad, kk - x) - lchoose(n, kk))
        order = np.sort(pmf)
        below = np.cumsum(order)[np.searchsorted(order, pmf * (1 + 1e-7), side="right") - 1]
        rows = k == kk
        out[rows] = np.minimum(1.0, below[a[rows] - lo])
    return out


def log_odds(a: np.ndarray, b: np.ndarray, n_good: int, n_bad: int, prior: float) -> tuple[np.ndarray, np.ndarray]:
    """(log odds ratio of being active in GOOD vs BAD, two-sided normal p) with `prior` added to every cell."""
    a, b = np.asarray(a, dtype=np.float64) + prior, np.asarray(b, dtype=np.float64) + prior
    c, d = n_good - a + 2 * prior, n_bad - b + 2 * prior  # (n_good - a_raw) + prior
    lor = np.log(a / c) - np.log(b / d)
    z = lor / np.sqrt(1 / a + 1 / b + 1 / c + 1 / d)
    return lor, 2 * ndtr(-np.abs(z))


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values (q), same shape: q_(i) = min over j >= i of p_(j) m / j, capped at 1."""
    flat = np.asarray(p, dtype=np.float64).ravel()
    m = flat.size
    order = np.argsort(flat)
    scaled = flat[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    q = np.empty(m)
    q[order] = q_sorted
    return q.reshape(np.shape(p))


def statistics(c: Counts, cfg: AnalyzeConfig) -> dict[str, np.ndarray]:
    """Every per-feature statistic, [n_layers, n_features] each (see the module docstring)."""
    eps = cfg.epsilon
    s = {"good_count": c.good_active, "bad_count": c.bad_active,
         "good_freq": c.good_active / max(c.n_good, 1), "bad_freq": c.bad_active / max(c.n_bad, 1),
         "good_avg_activation": c.good_sum / max(c.n_good, 1), "bad_avg_activation": c.bad_sum / max(c.n_bad, 1)}
    s["frequency_ratio"] = s["good_freq"] / (s["bad_freq"] + eps)
    s["activation_ratio"] = s["good_avg_activation"] / (s["bad_avg_activation"] + eps)
    s["goodness_score"] = s["frequency_ratio"] * s["good_avg_activation"]
    s["badness_score"] = s["bad_freq"] / (s["good_freq"] + eps) * s["bad_avg_activation"]
    if cfg.test == "fisher":
        s["p_value"] = fisher_p(c.good_active, c.bad_active, c.n_good, c.n_bad)
        s["log_odds"] = log_odds(c.good_active, c.bad_active, c.n_good, c.n_bad, cfg.prior)[0]
    else:
        s["log_odds"], s["p_value"] = log_odds(c.good_active, c.bad_active, c.n_good, c.n_bad, cfg.prior)
    s["q_value"] = benjamini_hochberg(s["p_value"])
    return s


def round_robin(ranked: list[list[int]], target: int, min_per_layer: int) -> list[tuple[int, int]]:
    """(layer slot, feature) picks: round r takes each slot's r-th candidate, in slot order, until `target`
    picks; rounds before `min_per_layer` are completed whatever the target."""
    picks: list[tuple[int, int]] = []
    depth = 0
    while any(depth < len(r) for r in ranked):
        for slot, candidates in enumerate(ranked):
            if depth >= len(candidates):
                continue
            if len(picks) >= target and depth >= min_per_layer:
                return picks
            picks.append((slot, candidates[depth]))
        depth += 1
    return picks


def select(s: dict[str, np.ndarray], direction: str, cfg: AnalyzeConfig) -> list[tuple[int, int]]:
    """Round-robin picks of significant features leaning to `direction` ("good" or "bad")."""
    lean = s["good_freq"] > s["bad_freq"] if direction == "good" else s["bad_freq"] > s["good_freq"]
    ok = lean & (s["q_value"] <= cfg.alpha)
    score = s["goodness_score" if direction == "good" else "badness_score"]
    ranked = []
    for slot in range(score.shape[0]):
        rows = np.flatnonzero(ok[slot])
        ranked.append(rows[np.argsort(-score[slot, rows], kind="stable")].tolist())
    return round_robin(ranked, cfg.target_features, cfg.min_per_layer)


ENTRY_KEYS = ("goodness_score", "badness_score", "frequency_ratio", "activation_ratio", "good_freq", "bad_freq",
              "good_avg_activation", "bad_avg_activation", "good_count", "bad_count", "log_odds", "p_value", "q_value")


def report(c: Counts, s: dict[str, np.ndarray], picks: list[tuple[int, int]], direction: str, dataset: str,
           cfg: AnalyzeConfig) -> dict:
    """The reference pipeline's JSON (dataset, totals, selected count, layer_distribution, features) plus the test."""
    distribution = {str(l): 0 for l in c.layers}
    features = []
    for slot, f in picks:
        distribution[str(c.layers[slot])] += 1
        features.append({"layer": c.layers[slot], "feature_idx": int(f), **{k: float(s[k][slot, f]) for k in ENTRY_KEYS}})
    lean = s["good_freq"] > s["bad_freq"] if direction == "good" else s["bad_freq"] > s["good_freq"]
    return {"dataset": dataset, "direction": direction, "total_good_samples": c.n_good, "total_bad_samples": c.n_bad,
            "total_features_analyzed": len(c.layers) * c.n_features, "selected_features_count": len(features),
            "significant_candidates": int((lean & (s["q_value"] <= cfg.alpha)).sum()),
            "selection": {"target_features": cfg.target_features, "min_per_layer": cfg.min_per_layer, "test": cfg.test,
                          "alpha": cfg.alpha, "pool": cfg.pool, "tags": cfg.tags, "epsilon": cfg.epsilon},
            "layer_distribution": distribution, "features": features}


def analyze_run(run: str | Path, cfg: AnalyzeConfig | None = None, dataset: str | None = None) -> dict[str, dict]:
    """Statistics and selections of a classified capture run, written under RUN/analysis; returns {good, bad}."""
    run, cfg = Path(run), cfg or AnalyzeConfig()
    check(FeaturesConfig(analyze=cfg))
    info = json.loads((run / "capture.json").read_text())
    classification = json.loads((run / "classification.json").read_text())
    dataset = dataset or info["bench"]
    c = count(run, classification, info["layers"], info["n_features"], cfg)
    if c.n_good == 0 or c.n_bad == 0:
        raise ValueError(f"{run}: GOOD has {c.n_good} and BAD {c.n_bad} captured samples; both classes are needed")
    s = statistics(c, cfg)
    out = run / "analysis"
    out.mkdir(exist_ok=True)
    results = {}
    for direction in ("good", "bad"):
        results[direction] = report(c, s, select(s, direction, cfg), direction, dataset, cfg)
        write_json(out / f"{dataset}_{direction}_features.json", results[direction])
    tmp = out / f".stats.safetensors.tmp-{os.getpid()}"
    save_file({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for k, v in s.items()}, str(tmp),
              metadata={"layers": json.dumps(c.layers), "n_good": str(c.n_good), "n_bad": str(c.n_bad)})
    tmp.replace(out / "stats.safetensors")
    return results


def features_analyze(run: str, config: str | None = None, dataset: str | None = None, target_features: int | None = None,
                     min_per_layer: int | None = None, test: str | None = None, alpha: float | None = None,
                     pool: str | None = None) -> dict:
    """Rank features by how they separate GOOD from BAD samples, test the difference, select round-robin by layer.

    Args:
        run: a classified `features capture` run directory
        config: features recipe YAML; its analyze section
        dataset: name used in the output files and JSON (default: the benchmark)
        target_features: upper bound on selected features per direction (good, bad)
        min_per_layer: round-robin rounds always completed, so each layer gives at least this many
        test: fisher (exact test) or log_odds (log odds ratio with a prior)
        alpha: Benjamini-Hochberg false discovery rate a selected feature must pass (1.0: no filter)
        pool: a sample's activation of a feature: mean over its positions, or max
    """
    cfg = override(load_config(config).analyze, target_features=target_features, min_per_layer=min_per_layer,
                   test=test, alpha=alpha, pool=pool)
    results = analyze_run(run, cfg, dataset)
    for direction, r in results.items():
        print(f"features analyze: {r['selected_features_count']} {direction} features "
              f"({r['significant_candidates']} significant) over {r['total_good_samples']} GOOD / "
              f"{r['total_bad_samples']} BAD samples")
    return results
