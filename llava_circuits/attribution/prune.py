"""Influence and pruning of an attribution graph, as circuit-tracer does it.

Edges are taken as |weight| and normalised so that each row (the inputs of one node) sums to 1: A.
The influence of a node on the target is the sum over all paths of the products of normalised edges,
w (A + A^2 + ...) with w the target's indicator; the graph is a DAG (features only read lower layers),
so the series ends. Pruning keeps the nodes that hold `node_threshold` of the total influence (all
embeddings and the target stay), then the edges that hold `edge_threshold` of the edge influence
(edge (i <- j) scores A[i, j] * (influence of i + w_i), recomputed on the pruned nodes), then drops
features and error nodes left without outgoing edges and features without incoming ones until nothing
changes.

Rows are only stored for nodes with inputs (`Graph.adjacency` [S + 1, N]): rows 0..S-1 are the
feature nodes, which are also columns 0..S-1, and row S is the target (column N - 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Pruned:
    """Which nodes and edges survive, and each node's cumulative influence (circuit-tracer's 'influence' field)."""

    node_mask: Tensor  # [N] bool
    edge_mask: Tensor  # [S + 1, N] bool, same layout as the adjacency
    influence: Tensor  # [N] influence on the target (unpruned graph)
    cumulative: Tensor  # [N] share of the total influence held by nodes at least as influential


def normalise(rows: Tensor) -> Tensor:
    """|rows| with each row scaled to sum 1 (all-zero rows stay zero)."""
    a = rows.abs().double()
    return a / a.sum(1, keepdim=True).clamp_min(1e-30)


def influence(norm_rows: Tensor) -> Tensor:
    """[N] total influence on the target (the last row) through every path, for normalised rows [S + 1, N]."""
    S = norm_rows.shape[0] - 1
    weight = torch.zeros(S + 1, dtype=norm_rows.dtype)
    weight[S] = 1.0
    total = torch.zeros(norm_rows.shape[1], dtype=norm_rows.dtype)
    for _ in range(S + 2):  # a DAG over S features: paths have at most S + 1 edges
        current = weight @ norm_rows  # [N]
        if not bool(current.any()):
            break
        total += current
        weight = torch.cat([current[:S], current.new_zeros(1)])  # only feature columns have rows of their own
    return total


def threshold(scores: Tensor, fraction: float) -> float:
    """The smallest score among the top scores that together hold `fraction` of the total."""
    ordered = scores.flatten().sort(descending=True).values
    if len(ordered) == 0 or float(ordered.sum()) <= 0:
        return float("inf")
    cumulative = ordered.cumsum(0) / ordered.sum()
    index = min(int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))), len(ordered) - 1)
    return float(ordered[index])


def cumulative_share(scores: Tensor) -> Tensor:
    """[N] for each node, the share of total influence held by it and every node ranked above it."""
    ordered, index = scores.sort(descending=True)
    out = torch.zeros_like(scores)
    out[index] = ordered.cumsum(0) / ordered.sum().clamp_min(1e-30)
    return out


def prune(adjacency: Tensor, n_embeddings: int, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Node and edge masks of a graph's adjacency [S + 1, N] whose last `n_embeddings` + 1 columns are
    the embeddings and the target (kept always); see the module docstring."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {value}")
    S, N = adjacency.shape[0] - 1, adjacency.shape[1]
    node_influence = influence(normalise(adjacency))
    node_mask = node_influence >= threshold(node_influence, node_threshold)
    node_mask[N - n_embeddings - 1 :] = True
    rows_kept = torch.cat([node_mask[:S], torch.ones(1, dtype=torch.bool)])
    pruned = adjacency.double() * rows_kept[:, None] * node_mask[None, :]
    norm = normalise(pruned)
    row_weight = torch.cat([influence(norm)[:S], torch.ones(1, dtype=norm.dtype)])  # influence + w
    edge_scores = norm * row_weight[:, None]
    edge_mask = (edge_scores >= threshold(edge_scores, edge_threshold)) & (pruned != 0)
    sources = N - n_embeddings - 1  # features and error nodes: they need an outgoing edge
    while True:
        before = node_mask.clone()
        node_mask[:sources] &= edge_mask.any(0)[:sources]
        node_mask[:S] &= edge_mask[:S].any(1)  # features also need an incoming edge
        rows_kept = torch.cat([node_mask[:S], torch.ones(1, dtype=torch.bool)])
        edge_mask &= rows_kept[:, None] & node_mask[None, :]
        if bool((node_mask == before).all()):
            break
    return Pruned(node_mask, edge_mask, node_influence, cumulative_share(node_influence))
