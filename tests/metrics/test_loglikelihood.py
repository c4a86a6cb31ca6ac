import pytest
import torch

from llava_circuits.metrics.loglikelihood import HellaSwagMetric, MMLUMetric


def test_mmlu_argmax_ties_and_ragged():
    m = MMLUMetric()
    m.update(torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-2.0, -2.0, -1.0, -1.0]]), [0, 3])  # tie -> first max
    m.update([[-3.0, -1.0], [-1.0, -2.0, -0.5]], [1, 0])
    assert m.compute() == {"accuracy": 2 / 4}


def test_hellaswag_acc_norm_divides_by_ending_length():
    m = HellaSwagMetric()
    m.update([[-10.0, -12.0], [-5.0, -5.0]], [1, 0], [["ab", "abcdefgh"], ["x", "y"]])
    # row 0: acc picks 0 (wrong); norm: -5 vs -1.5 picks 1 (right). row 1: tie -> 0, right for both
    assert m.compute() == {"acc": 0.5, "acc_norm": 1.0}


def test_hellaswag_length_in_characters():
    m = HellaSwagMetric()
    m.update([[-6.0, -8.0]], [1], [["éééé", "abcdefg"]])  # characters: -1.5 vs -1.14; bytes: -0.75 vs -1.14
    assert m.compute()["acc_norm"] == 1.0


def test_empty_batches_add_nothing():
    mmlu, hella = MMLUMetric(), HellaSwagMetric()
    mmlu.update([], [])
    hella.update([], [], [])
    mmlu.update([[0.1, 0.5]], [1])
    hella.update([[0.0, -1.0]], [1], [["a", "b"]])
    assert mmlu.compute() == {"accuracy": 1.0}
    assert hella.compute() == {"acc": 0.0, "acc_norm": 0.0}
    with pytest.raises(ValueError, match="got 1 gold indices for 0 rows"):
        mmlu.update([], [0])
