import math

import pytest
import torch

from llava_circuits.pruning.localize import ALL, Localization
from llava_circuits.pruning.select import SelectConfig, alpha_schedule, select_heads


def localization(r_by_category: dict[str, list[list[float]]], half_width: float = 0.1) -> Localization:
    """A Localization with the given r [L][H] per category (one activation), intervals r -/+ half_width."""
    cats = list(r_by_category)
    r = torch.tensor([[r_by_category[c] for c in cats]], dtype=torch.float32)  # [1, C, L, H]
    pooled = r.mean(1, keepdim=True)
    r = torch.cat([pooled, r], 1)
    return Localization(["head_norm"], [ALL, *cats], r, r - half_width, r + half_width, torch.tensor([30] * (len(cats) + 1)))


LOC = localization({
    "Age": [[0.5, 0.1], [0.35, -0.6]],
    "SES": [[0.45, 0.0], [0.1, -0.7]],
    "Race": [[0.05, 0.2], [0.4, 0.65]],
})


def test_votes_need_the_threshold_in_enough_categories():
    sel = select_heads(LOC, SelectConfig(activation="head_norm", threshold=0.3, min_fraction=0.6, schedule="constant"))
    assert sel.votes.tolist() == [[2, 0], [2, 3]]
    assert sel.heads == [(0, 0), (1, 0), (1, 1)]
    assert sel.weight[0, 0] == pytest.approx(0.95) and sel.weight[1, 1] == pytest.approx(1.95)
    assert sel.weight[1, 0] == pytest.approx(0.75)  # only the voting categories count
    assert sel.alpha.tolist() == [[pytest.approx(0.9), 0.0], [pytest.approx(0.9), pytest.approx(0.9)]]
    strict = select_heads(LOC, SelectConfig(activation="head_norm", threshold=0.3, min_fraction=1.0))
    assert strict.heads == [(1, 1)]


def test_max_heads_keeps_the_largest_summed_r():
    sel = select_heads(LOC, SelectConfig(activation="head_norm", threshold=0.3, min_fraction=0.6, max_heads=2))
    assert set(sel.heads) == {(1, 1), (0, 0)}


def test_significance_filter_drops_intervals_through_zero():
    wide = localization({"Age": [[0.5, 0.35]], "SES": [[0.5, 0.35]]}, half_width=0.4)
    sel = select_heads(wide, SelectConfig(activation="head_norm", threshold=0.3, min_fraction=1.0, significant_only=True))
    assert sel.heads == [(0, 0)]


def test_alpha_schedules():
    strength = torch.tensor([[0.3, 0.6], [0.9, 0.2]])
    keep = torch.tensor([[True, True], [True, False]])
    linear = alpha_schedule(strength, keep, SelectConfig(schedule="linear", alpha_max=0.9))
    assert linear.tolist() == [[pytest.approx(0.3), pytest.approx(0.6)], [pytest.approx(0.9), 0.0]]
    affine = alpha_schedule(strength, keep, SelectConfig(schedule="affine", threshold=0.3, alpha_min=0.2, alpha_max=0.8))
    assert affine[0, 0] == pytest.approx(0.2) and affine[1, 0] == pytest.approx(0.2 + 0.6 * 0.6 / 0.7)
    with pytest.raises(ValueError, match="schedule"):
        alpha_schedule(strength, keep, SelectConfig(schedule="cubic"))


def test_any_activation_takes_the_larger_abs_r_and_nan_never_votes():
    r = torch.tensor([[[[0.1, math.nan]]], [[[-0.8, 0.2]]]])  # [2 activations, 1 category, 1, 2]
    loc = Localization(["attn_max", "head_norm"], [ALL], r, r - 0.1, r + 0.1, torch.tensor([20]))
    sel = select_heads(loc, SelectConfig(activation="any", threshold=0.5, min_fraction=1.0))
    assert sel.heads == [(0, 0)] and sel.weight[0, 0] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="activation"):
        select_heads(loc, SelectConfig(activation="mlp"))


def test_categories_without_r_neither_vote_nor_count():
    nan = math.nan
    loc = localization({"Age": [[0.5, 0.1]], "SES": [[nan, nan]]})
    sel = select_heads(loc, SelectConfig(activation="head_norm", threshold=0.0, min_fraction=1.0))
    assert sel.n_categories == 1 and sel.votes.tolist() == [[1, 1]]
