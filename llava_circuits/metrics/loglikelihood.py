"""Log-likelihood multiple choice (MMLU, HellaSwag), scored as lm-evaluation-harness does."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from llava_circuits.metrics.counting import ratio


def _padded(rows: Sequence[Sequence[float]] | Tensor, fill: float) -> Tensor:
    """[batch, n_choices] float64, ragged rows padded with `fill`."""
    if isinstance(rows, Tensor):
        return rows.double().reshape(len(rows), -1)
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], dtype=torch.float64).reshape(-1, width)


def _gold(gold: Sequence[int] | Tensor, n: int) -> Tensor:
    out = torch.as_tensor(gold, dtype=torch.long).reshape(-1)
    if len(out) != n:
        raise ValueError(f"got {len(out)} gold indices for {n} rows of log-likelihoods")
    return out


class MMLUMetric(Metric):
    """accuracy: the choice with the highest log-likelihood is the gold one (first maximum on ties)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, loglikelihoods: Sequence[Sequence[float]] | Tensor, gold: Sequence[int] | Tensor) -> None:
        """loglikelihoods: [batch, n_choices] (rows may differ in length); gold: gold choice per row."""
        if len(loglikelihoods) == 0:  # an empty batch (a run's last shard) adds nothing
            _gold(gold, 0)
            return
        lls = _padded(loglikelihoods, float("-inf"))
        self.correct += int((lls.argmax(1) == _gold(gold, len(lls))).sum())
        self.total += len(lls)

    def compute(self) -> dict[str, float]:
        return {"accuracy": ratio(self.correct, self.total)}


class HellaSwagMetric(Metric):
    """acc (argmax log-likelihood) and acc_norm (argmax log-likelihood / length of the ending).

    The length is `len(ending)` in characters, as lm-evaluation-harness computes `completion_len` for
    acc_norm (equal to the byte length for ASCII endings; the harness's separate acc_bytes uses utf-8
    bytes). Endings are the choice strings without the leading space the harness adds when scoring.
    Ties go to the first maximum (np.argmax). An empty ending counts as length 1.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("correct", "correct_norm", "total"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        loglikelihoods: Sequence[Sequence[float]] | Tensor,
        gold: Sequence[int] | Tensor,
        endings: Sequence[Sequence[str]],
    ) -> None:
        """loglikelihoods: [batch, n_choices] summed over each ending's tokens; gold: gold index per row;
        endings: the ending strings per row, in the same order."""
        if len(loglikelihoods) == 0:
            _gold(gold, 0)
            return
        lls = _padded(loglikelihoods, float("-inf"))
        lengths = _padded([[max(len(e), 1) for e in row] for row in endings], 1.0)
        if lengths.shape != lls.shape:
            raise ValueError(f"endings {tuple(lengths.shape)} do not match log-likelihoods {tuple(lls.shape)}")
        gold_t = _gold(gold, len(lls))
        self.correct += int((lls.argmax(1) == gold_t).sum())
        self.correct_norm += int(((lls / lengths).argmax(1) == gold_t).sum())
        self.total += len(lls)

    def compute(self) -> dict[str, float]:
        return {"acc": ratio(self.correct, self.total), "acc_norm": ratio(self.correct_norm, self.total)}
