"""Cross-category head selection and the pruning strength alpha of each selected head.

A BBQ category votes for head (layer, head) when |r| >= `threshold` there (and, with
`significant_only`, when its confidence interval excludes 0). A head is kept when at least
`min_fraction` of the categories vote for it; its weight is the summed |r| of the voting categories,
and at most `max_heads` heads of the largest weight are kept. Its strength s is the mean |r| of the
voting categories, and alpha follows `schedule`:

- ``constant``: alpha = alpha_max;
- ``linear``:   alpha = alpha_max * s / max(s over the kept heads);
- ``affine``:   alpha = alpha_min + (alpha_max - alpha_min) * (s - threshold) / (1 - threshold).

Categories with too few items for an r (LocalizeConfig.min_items) neither vote nor count. With one
category (the toy's BBQ has only Nationality) voting reduces to |r| >= threshold on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llava_circuits.pruning.localize import ALL, Localization

SCHEDULES = ("constant", "linear", "affine")


@dataclass
class SelectConfig:
    """Which heads are pruned and how strongly."""

    activation: str = "any"
    """The activation whose r votes: "attn_max", "head_norm", or "any" (the larger |r| of the two)."""
    threshold: float = 0.3
    """A category votes for a head when |r| >= threshold."""
    min_fraction: float = 0.5
    """Keep heads voted for by at least this fraction of the categories."""
    significant_only: bool = False
    """Count a vote only when the category's confidence interval of r excludes 0."""
    max_heads: int | None = None
    """Keep at most this many heads, those of the largest summed |r| (None: no cap)."""
    schedule: str = "linear"
    """How alpha follows |r|: "constant", "linear" or "affine" (module docstring)."""
    alpha_max: float = 0.9
    """The largest alpha (alpha = 1 removes a head)."""
    alpha_min: float = 0.3
    """The smallest alpha of the "affine" schedule (at |r| = threshold)."""


@dataclass
class Selection:
    """The selected heads and their alpha."""

    alpha: Tensor  # [n_layers, n_heads] in [0, 1]; 0 for heads left alone
    votes: Tensor  # [n_layers, n_heads] number of categories voting for each head
    weight: Tensor  # [n_layers, n_heads] summed |r| of the voting categories
    n_categories: int

    @property
    def heads(self) -> list[tuple[int, int]]:
        """(layer, head) of every pruned head, strongest first."""
        flat = [(float(self.alpha[l, h]), l, h) for l, h in self.alpha.nonzero().tolist()]
        return [(l, h) for _, l, h in sorted(flat, key=lambda t: (-t[0], t[1], t[2]))]

    def describe(self) -> list[dict]:
        return [{"layer": l, "head": h, "alpha": round(float(self.alpha[l, h]), 4), "votes": int(self.votes[l, h]),
                 "weight": round(float(self.weight[l, h]), 4)} for l, h in self.heads]


def category_abs_r(loc: Localization, activation: str) -> tuple[Tensor, Tensor]:
    """|r| [n_categories, L, H] of the voting activation in each category that has an r (enough items), and
    whether each confidence interval excludes 0. NaN (a head without r) never reaches a threshold."""
    cats = [i for i, c in enumerate(loc.categories) if c != ALL and not bool(loc.r[:, i].isnan().all())]
    cats = cats or [loc.categories.index(ALL)]
    if activation == "any":
        acts = list(range(len(loc.activations)))
    elif activation in loc.activations:
        acts = [loc.activations.index(activation)]
    else:
        raise ValueError(f"select.activation must be 'any' or one of {loc.activations}, got {activation!r}")
    r = loc.r[acts][:, cats].abs()  # [n_acts, n_cats, L, H]
    excludes_zero = (loc.low[acts][:, cats] > 0) | (loc.high[acts][:, cats] < 0)
    best = r.nan_to_num(-1.0).argmax(0, keepdim=True)  # the activation that gives each category its |r|
    return r.gather(0, best)[0], excludes_zero.gather(0, best)[0]


def alpha_schedule(strength: Tensor, keep: Tensor, config: SelectConfig) -> Tensor:
    """alpha [L, H] from the strength s (mean |r| of the voting categories) of the kept heads."""
    if config.schedule not in SCHEDULES:
        raise ValueError(f"select.schedule must be one of {SCHEDULES}, got {config.schedule!r}")
    if not 0 <= config.alpha_min <= config.alpha_max <= 1:
        raise ValueError(f"need 0 <= alpha_min <= alpha_max <= 1, got {config.alpha_min}, {config.alpha_max}")
    if config.schedule == "constant":
        alpha = torch.full_like(strength, config.alpha_max)
    elif config.schedule == "linear":
        top = strength[keep].max() if keep.any() else torch.tensor(1.0)
        alpha = config.alpha_max * strength / top.clamp_min(1e-12)
    else:
        span = max(1e-12, 1 - config.threshold)
        alpha = config.alpha_min + (config.alpha_max - config.alpha_min) * (strength - config.threshold) / span
    return torch.where(keep, alpha.clamp(0, 1), torch.zeros_like(alpha)).float()


def select_heads(loc: Localization, config: SelectConfig | None = None) -> Selection:
    """Cross-category consistency voting, then alpha by the schedule."""
    config = config or SelectConfig()
    r, excludes_zero = category_abs_r(loc, config.activation)  # [n_cats, L, H]
    voting = r >= config.threshold
    if config.significant_only:
        voting &= excludes_zero
    votes = voting.sum(0)  # [L, H]
    weight = torch.where(voting, r, torch.zeros_like(r)).sum(0).double()  # [L, H]
    n_cats = r.shape[0]
    keep = (votes >= max(1, config.min_fraction * n_cats - 1e-9)) & (votes > 0)
    if config.max_heads is not None and int(keep.sum()) > config.max_heads:
        ranked = torch.where(keep, weight, torch.full_like(weight, -1.0)).flatten().argsort(descending=True, stable=True)
        capped = torch.zeros_like(keep).flatten()
        capped[ranked[: config.max_heads]] = True
        keep = capped.reshape(keep.shape)
    strength = (weight / votes.clamp_min(1)).float()
    return Selection(alpha_schedule(strength, keep, config), votes, weight.float(), n_cats)
