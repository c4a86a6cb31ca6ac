import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from llava_circuits.data.readers import read_benchmark
from llava_circuits.pruning.influence import (
    InfluenceConfig,
    context_influence,
    item_prompt,
    kl_divergence,
    option_token_ids,
    scored_items,
    twins,
)

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture(scope="module")
def bbq():
    return read_benchmark("bbq", FIXTURES / "bbq")


def direct_kl(p, q) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_kl_matches_the_direct_sum():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(3), size=5), rng.dirichlet(np.ones(3), size=5)
    got = kl_divergence(torch.tensor(p), torch.tensor(q))
    assert torch.allclose(got, torch.tensor([direct_kl(a, b) for a, b in zip(p, q)], dtype=torch.float64), atol=1e-12)
    assert float(kl_divergence(torch.tensor(p[0]), torch.tensor(p[0]))) == 0.0


def test_twins_pair_each_ambiguous_item_with_its_disambiguated_version(bbq):
    ids = [s.id for s in bbq]
    pairs = {ids[i]: [ids[j] for j in js] for i, js in twins(bbq).items()}
    assert pairs["Age-0"] == ["Age-1"] and pairs["Age-2"] == ["Age-3"]
    assert pairs["Gender_identity-0"] == []  # its disambiguated version is not in the fixture
    assert "SES-0" not in pairs  # disambiguated items are not scored themselves


def test_context_variant_scores_the_chosen_conditions(bbq):
    ambig = scored_items(bbq, InfluenceConfig(variant="context", conditions=["ambig"]))
    assert all(bbq[i].meta["context_condition"] == "ambig" for i in ambig) and len(ambig) == 7
    assert len(scored_items(bbq, InfluenceConfig(conditions=["ambig", "disambig"]))) == len(bbq)
    assert [bbq[i].id for i in scored_items(bbq, InfluenceConfig(variant="ambig_disambig"))] == ["Age-0", "Age-2"]
    with pytest.raises(ValueError, match="variant"):
        scored_items(bbq, InfluenceConfig(variant="nope"))


def test_ambig_disambig_aligns_options_by_text_not_position(bbq):
    ambig, twin = bbq[0], bbq[1]
    # the twin shows its options in another order and words "unknown" differently
    order = [2, 0, 1]
    shuffled = replace(twin, choices=["Unknown", twin.choices[0], twin.choices[1]],
                       meta={**twin.meta, "unknown_index": 0})
    p_ambig = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    p_twin = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)  # in the twin's original order
    probs = torch.stack([p_ambig, p_twin[order]])
    ci = context_influence([ambig, shuffled], [0], probs, None, "ambig_disambig")
    assert float(ci[0]) == pytest.approx(direct_kl(p_twin.tolist(), p_ambig.tolist()), abs=1e-12)


def test_context_variant_is_kl_with_against_without(bbq):
    p = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
    q = torch.tensor([[0.3, 0.3, 0.4], [0.2, 0.2, 0.6]], dtype=torch.float64)
    ci = context_influence(bbq[:2], [0, 1], p, q, "context")
    assert ci.tolist() == pytest.approx([direct_kl(p[0].tolist(), q[0].tolist()), 0.0], abs=1e-12)
    with pytest.raises(ValueError, match="without"):
        context_influence(bbq[:2], [0], p, None, "context")


def test_prompt_without_context_drops_only_the_context(llama, bbq):
    sample = bbq[0]
    with_context, without = item_prompt(llama, sample, True), item_prompt(llama, sample, False)
    assert sample.context in with_context and without == with_context.replace(sample.context + "\n", "")


def test_option_tokens_are_distinct_and_explained_when_not(llama):
    ids = option_token_ids(llama.tokenizer, 3)
    assert len(set(ids)) == 3 and llama.tokenizer.convert_ids_to_tokens(ids) == ["A", "B", "C"]
    with pytest.raises(ValueError, match="answer_prefix"):
        option_token_ids(llama.tokenizer, 3, prefix="the ")
