"""Building graphs: completeness against the model's own logits, the feature cap, targets."""
import pytest
import torch

from llava_circuits.attribution.build import AttributionConfig, Target, attribute_graph, token_id
from llava_circuits.models.tiny import VOCAB

from .conftest import make_transcoders, prompt_inputs

YES, NO = VOCAB["yes"], VOCAB["no"]


def _graph(loaded, kind="plt-relu", cap=7500, target="yes-no", dtype="float32"):
    target = Target(YES, NO) if target == "yes-no" else target
    cfg = AttributionConfig(max_feature_nodes=cap, batch_size=16, dtype=dtype)
    return attribute_graph(loaded, make_transcoders(kind), prompt_inputs(loaded), target, cfg)


@pytest.mark.parametrize("kind", ["plt-relu", "clt-jumprelu", "plt-topk-skip"])
def test_contributions_sum_to_the_models_target_logit(loaded32, kind):
    """Completeness in float32: edges from every feature, error and embedding, plus biases, give the
    model's own Yes - No logit difference."""
    graph = _graph(loaded32, kind)
    with torch.no_grad():
        logits = loaded32.model(**prompt_inputs(loaded32)).logits[0, -1].double()
    assert graph.target_value == pytest.approx(float(logits[YES] - logits[NO]), rel=1e-5)  # eager vs sdpa
    assert graph.completeness()[-1] <= 1e-4  # the bar
    # every feature row sums to its pre-activation (minus b_enc), up to float32 rounding of its terms
    total = graph.adjacency.double().sum(1) + graph.rest + graph.bias
    scale = graph.row_values.abs() + graph.adjacency.double().abs().sum(1)
    assert ((total - graph.row_values).abs() / scale)[:-1].max() <= 1e-5
    assert graph.rest.abs().max() == 0  # nothing capped away
    assert graph.n_selected == len(graph.active)


def test_a_single_logit_target_and_the_default_target(loaded32):
    given = Target(YES)
    single = _graph(loaded32, target=given)
    assert single.completeness()[-1] <= 1e-4
    assert single.target.pos == single.n_pos - 1 and given.pos == -1  # reusable for prompts of other lengths
    default = _graph(loaded32, target=None)
    with torch.no_grad():
        top = int(loaded32.model(**prompt_inputs(loaded32)).logits[0, -1].argmax())
    assert default.target.token == top and default.target.contrast is None
    assert default.target_prob == pytest.approx(float(default.target_prob))


def test_the_cap_keeps_the_most_influential_features_with_exact_edges(loaded64):
    full = _graph(loaded64, "clt-jumprelu", dtype="float64")
    cap = len(full.active) // 5
    capped = _graph(loaded64, "clt-jumprelu", cap=cap, dtype="float64")
    assert capped.n_selected == cap
    # the feature with the largest direct effect on the target is among the nodes
    direct = full.adjacency[-1, : full.n_selected].abs()
    assert int(direct.argmax()) in capped.selected.tolist()
    # rows of the capped graph hold the same edges as the full graph's, the left-out ones summed in `rest`
    sel = capped.selected
    full_rows = torch.cat([sel, torch.tensor([full.n_selected])])
    cols = torch.cat([sel, torch.arange(full.n_selected, full.n_nodes)])
    assert torch.allclose(capped.adjacency, full.adjacency[full_rows][:, cols], atol=1e-12)
    left_out = torch.ones(full.n_selected, dtype=torch.bool)
    left_out[sel] = False
    assert torch.allclose(capped.rest, full.adjacency[full_rows][:, : full.n_selected][:, left_out].sum(1), atol=1e-12)
    # `rest` keeps the capped graph exactly as complete as the full one (up to the model's float32 norms)
    assert torch.allclose(capped.completeness(), full.completeness()[full_rows], atol=1e-9)
    assert capped.completeness()[-1] <= 1e-4


def test_token_id_names_one_token():
    from llava_circuits.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    assert token_id(tok, "yes") == YES
    with pytest.raises(ValueError, match="2 tokens"):
        token_id(tok, "yes no")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        token_id(tok, "Yes")


def test_image_patches_are_embedding_nodes_with_grid_coordinates(loaded32):
    graph = _graph(loaded32)
    a = loaded32.anatomy
    assert len(graph.image_positions) == a.n_image_tokens == 16
    assert graph.patch_coords[:, 1:].tolist() == [[r, c] for r in range(4) for c in range(4)]
    assert graph.tokens[int(graph.image_positions[5])] == "<patch 1,1>"
    assert graph.direct_patch_effects().abs().max() > 0
