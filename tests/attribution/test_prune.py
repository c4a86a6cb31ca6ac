"""Influence and pruning, checked on small hand-made graphs against direct computations."""
import itertools

import pytest
import torch

from llava_circuits.attribution.prune import cumulative_share, influence, normalise, prune, threshold


def _toy_graph() -> torch.Tensor:
    """2 features (f0 reads the embeddings, f1 reads f0 and e1), 1 error node, 2 embeddings, the target.
    Columns: f0 f1 err e0 e1 target; rows: f0, f1, target."""
    return torch.tensor([
        [0.0, 0.0, 0.0, 2.0, -1.0, 0.0],   # f0 <- e0, e1
        [3.0, 0.0, 0.0, 0.0, 1.0, 0.0],    # f1 <- f0, e1
        [-1.0, 4.0, 1.0, 0.5, 0.0, 0.0],   # target <- f0, f1, err, e0
    ], dtype=torch.float64)


def _path_influence(adjacency: torch.Tensor) -> torch.Tensor:
    """Sum over every path target <- ... <- node of the products of row-normalised |edges|, by enumeration."""
    norm = normalise(adjacency)
    S, N = adjacency.shape[0] - 1, adjacency.shape[1]
    row_of = {j: j for j in range(S)} | {N - 1: S}
    total = torch.zeros(N, dtype=torch.float64)
    for length in range(1, S + 2):
        for path in itertools.product(range(N), repeat=length):
            node, weight = N - 1, 1.0
            for nxt in path:
                if node not in row_of:
                    weight = 0.0
                    break
                weight *= float(norm[row_of[node], nxt])
                node = nxt
            total[node] += weight
    return total


def test_influence_sums_every_path():
    adjacency = _toy_graph()
    got = influence(normalise(adjacency))
    assert torch.allclose(got, _path_influence(adjacency), atol=1e-12)
    # by hand: f1 gets 4/6.5 directly; f0 gets 1/6.5 directly and 4/6.5 * 3/4 through f1
    assert got[1] == pytest.approx(4 / 6.5)
    assert got[0] == pytest.approx(1 / 6.5 + 4 / 6.5 * 0.75)


def test_threshold_keeps_the_top_share():
    scores = torch.tensor([5.0, 3.0, 1.0, 1.0])
    assert threshold(scores, 0.5) == 5.0  # 5/10 already holds half
    assert threshold(scores, 0.8) == 3.0
    assert threshold(scores, 1.0) == 1.0
    assert torch.allclose(cumulative_share(scores), torch.tensor([0.5, 0.8, 0.9, 1.0])) or \
        torch.allclose(cumulative_share(scores), torch.tensor([0.5, 0.8, 1.0, 0.9]))


def test_prune_keeps_embeddings_and_target_and_drops_weak_nodes():
    adjacency = _toy_graph()
    adjacency[2, 2] = 1e-6  # a nearly useless error node
    kept = prune(adjacency, n_embeddings=2, node_threshold=0.8, edge_threshold=0.98)
    assert kept.node_mask[3:].all()  # embeddings and the target always stay
    assert not kept.node_mask[2]  # the error node holds no influence worth keeping
    assert kept.node_mask[1]
    # every kept feature has an edge in and out; every kept edge joins kept nodes
    for f in range(2):
        if kept.node_mask[f]:
            assert kept.edge_mask[f].any() and kept.edge_mask[:, f].any()
    _, cols = kept.edge_mask.nonzero(as_tuple=True)
    assert kept.node_mask[cols].all()
    everything = prune(adjacency, n_embeddings=2, node_threshold=1.0, edge_threshold=1.0)
    assert everything.edge_mask.sum() == (adjacency != 0).sum()


def test_thresholds_outside_zero_one_are_refused():
    with pytest.raises(ValueError, match="node_threshold"):
        prune(_toy_graph(), 2, node_threshold=1.5)
