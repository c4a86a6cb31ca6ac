"""features analyze: statistics against a dense computation, Fisher / log-odds / BH against scipy, round-robin."""
import json

import numpy as np
import pytest
import scipy.stats
import torch

from llava_circuits.features.config import AnalyzeConfig
from llava_circuits.features.stats import (
    analyze_run,
    benjamini_hochberg,
    count,
    fisher_p,
    log_odds,
    round_robin,
    select,
    statistics,
)
from llava_circuits.features.store import SampleActs, write_shard

LAYERS, N_FEATURES = [0, 2, 5], 12


def fake_run(tmp_path, n_samples=30, seed=0):
    """A capture run of random sparse activations; returns (run, dense [samples, pos, layers, features], tags, labels)."""
    gen = torch.Generator().manual_seed(seed)
    samples, dense, tags = [], [], []
    for i in range(n_samples):
        n_pos = 5 + i % 4
        t = torch.randint(0, 3, (n_pos,), generator=gen).to(torch.uint8)
        d = torch.rand(n_pos, len(LAYERS), N_FEATURES, generator=gen)
        d = torch.where(torch.rand(d.shape, generator=gen) < 0.15 + 0.5 * (i % 2) * (torch.arange(N_FEATURES) < 3), d, 0.0)
        pos, slot, feat = d.nonzero(as_tuple=True)
        samples.append(SampleActs(str(i), t, torch.tensor(LAYERS)[slot].to(torch.int16), pos.to(torch.int32),
                                  feat.to(torch.int32), d[pos, slot, feat]))
        dense.append(d.double().numpy())
        tags.append(t.numpy())
    for start in range(0, n_samples, 7):  # several shards
        chunk = samples[start : start + 7]
        write_shard(tmp_path, 0, chunk, [{"id": s.id, "response": "x"} for s in chunk])
    labels = {str(i): ("GOOD" if i % 2 else "BAD") for i in range(n_samples) if i % 5 != 4}  # some left out
    return dense, tags, labels


def dense_statistics(dense, tags, labels, keep_tags, pool, eps):
    """The definitions of stats.py, computed directly on dense arrays in float64."""
    out = {}
    for cls in ("GOOD", "BAD"):
        ids = [int(i) for i, c in labels.items() if c == cls]
        active, pooled = [], []
        for i in ids:
            rows = np.isin(tags[i], keep_tags)
            a = dense[i][rows]  # [read positions, layers, features]
            active.append((a != 0).any(0))
            pooled.append(a.max(0) if pool == "max" else a.sum(0) / max(rows.sum(), 1))
        out[cls] = (np.mean(active, 0), np.mean(pooled, 0), np.sum(active, 0))
    (gf, ga, gc), (bf, ba, bc) = out["GOOD"], out["BAD"]
    return {"good_freq": gf, "bad_freq": bf, "good_avg_activation": ga, "bad_avg_activation": ba,
            "frequency_ratio": (gf / (bf + eps)), "activation_ratio": (ga / (ba + eps)),
            "goodness_score": (gf / (bf + eps) * ga), "badness_score": (bf / (gf + eps) * ba),
            "good_count": gc, "bad_count": bc}


@pytest.mark.parametrize("pool,keep", [("mean", ["image", "prompt", "generated"]), ("max", ["prompt", "generated"])])
def test_statistics_match_a_dense_computation(tmp_path, pool, keep):
    dense, tags, labels = fake_run(tmp_path)
    classification = {"GOOD": [{"id": i} for i, c in labels.items() if c == "GOOD"],
                      "BAD": [{"id": i} for i, c in labels.items() if c == "BAD"]}
    cfg = AnalyzeConfig(pool=pool, tags=keep, epsilon=1e-3)
    c = count(tmp_path, classification, LAYERS, N_FEATURES, cfg)
    s = statistics(c, cfg)
    keep_tags = [("image", "prompt", "generated").index(t) for t in keep]
    expected = dense_statistics(dense, tags, labels, keep_tags, pool, 1e-3)
    assert (c.n_good, c.n_bad) == (12, 12)
    for key, value in expected.items():
        np.testing.assert_allclose(s[key], value, rtol=1e-9, atol=1e-12, err_msg=key)
    for l in range(len(LAYERS)):
        for f in range(N_FEATURES):
            a, b = int(s["good_count"][l, f]), int(s["bad_count"][l, f])
            p = scipy.stats.fisher_exact([[a, 12 - a], [b, 12 - b]]).pvalue
            assert s["p_value"][l, f] == pytest.approx(p, rel=1e-9, abs=1e-15)


def test_fisher_exact_matches_scipy_on_random_and_edge_tables():
    rng = np.random.default_rng(0)
    for n_good, n_bad in [(40, 60), (7, 3), (1, 1), (200, 15)]:
        a = np.concatenate([rng.integers(0, n_good + 1, 60), [0, n_good, 0, n_good]])
        b = np.concatenate([rng.integers(0, n_bad + 1, 60), [0, n_bad, n_bad, 0]])
        ours = fisher_p(a, b, n_good, n_bad)
        for x, y, p in zip(a, b, ours):
            ref = scipy.stats.fisher_exact([[x, n_good - x], [y, n_bad - y]]).pvalue
            assert p == pytest.approx(min(ref, 1.0), rel=1e-9, abs=1e-15), (x, y, n_good, n_bad)


def test_log_odds_with_a_prior_matches_the_direct_formula():
    a, b, ng, nb, prior = np.array([0, 5, 30]), np.array([10, 5, 2]), 30, 40, 0.5
    lor, p = log_odds(a, b, ng, nb, prior)
    for i in range(3):
        cells = np.array([a[i], ng - a[i], b[i], nb - b[i]], dtype=float) + prior
        expected = np.log(cells[0] * cells[3] / (cells[1] * cells[2]))
        se = np.sqrt((1 / cells).sum())
        assert lor[i] == pytest.approx(expected, rel=1e-12)
        assert p[i] == pytest.approx(2 * scipy.stats.norm.sf(abs(expected / se)), rel=1e-9)


def test_benjamini_hochberg_matches_scipy():
    p = np.random.default_rng(1).random((7, 9)) ** 3
    np.testing.assert_allclose(benjamini_hochberg(p), scipy.stats.false_discovery_control(p.ravel()).reshape(7, 9),
                               rtol=1e-12)


def test_round_robin_takes_each_layers_next_best_in_turn():
    ranked = [[10, 11, 12, 13, 14], [20], [30, 31, 32], [40, 41, 42, 43, 44]]
    picks = round_robin(ranked, target=9, min_per_layer=0)
    assert picks == [(0, 10), (1, 20), (2, 30), (3, 40), (0, 11), (2, 31), (3, 41), (0, 12), (2, 32)]
    # the first min_per_layer rounds are completed whatever the target
    assert round_robin(ranked, target=2, min_per_layer=2) == [(0, 10), (1, 20), (2, 30), (3, 40), (0, 11), (2, 31), (3, 41)]
    assert len(round_robin(ranked, target=100, min_per_layer=1)) == 14  # exhausted: every candidate once


def test_rare_features_do_not_win_by_luck():
    """A feature seen once in GOOD and never in BAD has the top goodness_score but fails the test; a feature
    that truly separates the classes is selected."""
    n = 60

    c_good, c_bad = np.array([[1.0, 50.0, 10.0]]), np.array([[0.0, 5.0, 10.0]])
    from llava_circuits.features.stats import Counts

    counts = Counts([0], 3, n, n, c_good, c_bad, c_good * np.array([[300.0, 3.0, 3.0]]), c_bad * 1.0)
    cfg = AnalyzeConfig(alpha=0.05, target_features=5, min_per_layer=0, epsilon=1e-3)
    s = statistics(counts, cfg)
    assert s["goodness_score"][0].argmax() == 0  # the naive score prefers the lucky feature
    assert select(s, "good", cfg) == [(0, 1)]
    assert select(s, "bad", cfg) == []


def test_analyze_writes_the_reference_shape_with_round_robin_layers(tmp_path):
    _, _, labels = fake_run(tmp_path, n_samples=60)
    (tmp_path / "capture.json").write_text(json.dumps({"bench": "pope", "layers": LAYERS, "n_features": N_FEATURES}))
    classification = {"GOOD": [{"id": i} for i, c in labels.items() if c == "GOOD"],
                      "BAD": [{"id": i} for i, c in labels.items() if c == "BAD"]}
    (tmp_path / "classification.json").write_text(json.dumps(classification))
    results = analyze_run(tmp_path, AnalyzeConfig(target_features=4, min_per_layer=1, alpha=0.05), dataset="toy_pope")
    good = json.loads((tmp_path / "analysis" / "toy_pope_good_features.json").read_text())
    assert good == json.loads(json.dumps(results["good"]))
    assert {"dataset", "total_good_samples", "total_bad_samples", "total_features_analyzed", "selected_features_count",
            "layer_distribution", "features"} <= set(good)
    assert good["dataset"] == "toy_pope" and good["total_features_analyzed"] == len(LAYERS) * N_FEATURES
    # features 0-2 fire far more often in GOOD (odd) samples, in every layer: one per layer, then the best again
    assert [(f["layer"], f["feature_idx"] < 3) for f in good["features"]] == [(0, True), (2, True), (5, True), (0, True)]
    assert good["layer_distribution"] == {"0": 2, "2": 1, "5": 1} and good["selected_features_count"] == 4
    scores = [f["goodness_score"] for f in good["features"] if f["layer"] == 0]
    assert scores == sorted(scores, reverse=True)
    assert all(f["q_value"] <= 0.05 for f in good["features"])
