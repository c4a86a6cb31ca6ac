import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from llava_circuits.data.readers import read_benchmark
from llava_circuits.models.load import load_model
from llava_circuits.pruning.influence import InfluenceConfig, item_prompt
from llava_circuits.pruning.localize import (
    ALL,
    Localization,
    LocalizeConfig,
    correlate,
    fisher_interval,
    item_pass,
    localize,
    pearson,
    plot_heatmaps,
)

FIXTURES = Path(__file__).parents[1] / "fixtures"


def test_pearson_per_head_matches_numpy():
    rng = np.random.default_rng(1)
    y = rng.normal(size=40)
    x = rng.normal(size=(40, 3, 4)) + 0.5 * y[:, None, None] * rng.normal(size=(1, 3, 4))
    r = pearson(torch.tensor(x), torch.tensor(y))
    for layer in range(3):
        for head in range(4):
            assert float(r[layer, head]) == pytest.approx(np.corrcoef(x[:, layer, head], y)[0, 1], abs=1e-12)


def test_fisher_interval_matches_a_direct_computation_and_scipy():
    rng = np.random.default_rng(2)
    y = rng.normal(size=30)
    x = y + rng.normal(size=30)
    r = float(np.corrcoef(x, y)[0, 1])
    low, high = fisher_interval(torch.tensor([r], dtype=torch.float64), 30, 0.95)
    z, half = math.atanh(r), stats.norm.ppf(0.975) / math.sqrt(27)
    assert float(low) == pytest.approx(math.tanh(z - half), abs=1e-12)
    assert float(high) == pytest.approx(math.tanh(z + half), abs=1e-12)
    ci = stats.pearsonr(x, y).confidence_interval(0.95)
    assert (float(low), float(high)) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert torch.isnan(fisher_interval(torch.tensor([0.5]), 3)[0]).all()


def test_correlate_gives_each_layer_its_own_r_and_each_category_its_own_rows():
    rng = np.random.default_rng(3)
    n, cats = 24, ["Age"] * 12 + ["SES"] * 12
    ci = torch.tensor(rng.normal(size=n))
    acts = torch.tensor(rng.normal(size=(n, 2, 2)))
    acts[:, 1, 0] = ci * 2 + 1  # perfectly correlated head in layer 1 only
    acts[:, 0, 1] = 5.0  # constant head
    loc = correlate({"attn_max": acts, "head_norm": -acts}, ci, cats, LocalizeConfig())
    assert loc.categories == [ALL, "Age", "SES"] and loc.n.tolist() == [24, 12, 12]
    r = loc.get("attn_max")
    assert float(r[1, 0]) == pytest.approx(1.0) and abs(float(r[0, 0])) < 0.9
    assert float(loc.get("head_norm")[1, 0]) == pytest.approx(-1.0)
    assert float(r[0, 1]) == 0.0 and math.isnan(float(loc.low[0, 0, 0, 1]))
    age = torch.tensor([c == "Age" for c in cats])
    assert float(loc.get("attn_max", "Age")[0, 0]) == pytest.approx(np.corrcoef(acts[age, 0, 0], ci[age])[0, 1], abs=1e-6)


def direct_forward(loaded_eager, prompt: str):
    """Max attention weight, o_proj-input norm per head [L, H] and the vocabulary distribution at the last token
    of one unpadded prompt, from output_attentions and a plain module hook (not the sites machinery)."""
    a = loaded_eager.anatomy
    ids = loaded_eager.tokenizer(prompt, return_tensors="pt")
    inputs = []
    hooks = [a.proj(i, "o_proj").register_forward_pre_hook(lambda m, args: inputs.append(args[0][0, -1]))
             for i in range(a.n_layers)]
    with torch.no_grad():
        out = loaded_eager.model(**ids, output_attentions=True)
    for h in hooks:
        h.remove()
    attn_max = torch.stack([att[0, :, -1].amax(-1) for att in out.attentions]).double()  # [L, H]
    norms = torch.stack([x.view(a.n_heads, a.head_dim).norm(dim=-1) for x in inputs]).double()  # [L, H]
    probs = torch.softmax(out.logits[0, -1].double(), -1)  # [vocab]
    return attn_max, norms, probs


@pytest.fixture(scope="module")
def samples():
    return read_benchmark("bbq", FIXTURES / "bbq")


@pytest.fixture(scope="module")
def direct(tiny_llama_dir, samples):
    """Per item, computed one prompt at a time: activations [n, L, H], option probabilities with and without context."""
    eager = load_model(tiny_llama_dir, dtype="float32", attn_implementation="eager")
    letters = [eager.tokenizer.convert_tokens_to_ids(c) for c in "ABC"]
    rows = []
    for sample in samples:
        attn_max, norms, probs = direct_forward(eager, item_prompt(eager, sample, with_context=True))
        without = direct_forward(eager, item_prompt(eager, sample, with_context=False))[2]
        rows.append((attn_max, norms, probs[letters] / probs[letters].sum(), without[letters] / without[letters].sum()))
    return {key: torch.stack([r[k] for r in rows]) for k, key in enumerate(("attn_max", "head_norm", "p", "q"))}


@pytest.fixture(scope="module")
def localized(tiny_llama_dir, samples):
    loaded = load_model(tiny_llama_dir, dtype="float32")
    return localize(loaded, samples, InfluenceConfig(conditions=["ambig", "disambig"]), LocalizeConfig(batch_size=3))


def test_a_category_with_constant_influence_has_r_zero_and_no_interval():
    acts = torch.randn(12, 2, 3, generator=torch.Generator().manual_seed(0))
    ci = torch.cat([torch.zeros(6), torch.rand(6, generator=torch.Generator().manual_seed(1))]).double()
    loc = correlate({"attn_max": acts}, ci, ["flat"] * 6 + ["varied"] * 6, LocalizeConfig(min_items=4))
    flat, varied = loc.categories.index("flat"), loc.categories.index("varied")
    assert bool((loc.get("attn_max", "flat") == 0).all())
    assert bool(loc.low[0, flat].isnan().all()) and bool(loc.high[0, flat].isnan().all())
    assert not bool(loc.low[0, varied].isnan().any())


def test_one_batched_pass_per_item_matches_unbatched_eager_forwards(llama, samples, direct):
    forwards = []
    hook = llama.model.register_forward_pre_hook(lambda m, args: forwards.append(1))
    try:
        run = item_pass(llama, samples, batch_size=4)  # sdpa model: the probs site switches to eager by itself
    finally:
        hook.remove()
    assert len(forwards) == 3  # 10 items, 4 per forward: every head of every layer from the same forward
    assert run.attn_max.shape == run.head_norm.shape == (len(samples), 3, 4)
    assert torch.allclose(run.attn_max.double(), direct["attn_max"], atol=1e-5)
    assert torch.allclose(run.head_norm.double(), direct["head_norm"], atol=1e-4)
    assert torch.allclose(run.probs.double(), direct["p"], atol=1e-5)


def test_context_influence_of_each_item_is_the_kl_computed_by_hand(localized, samples, direct):
    """CI = sum_k p_k log(p_k / q_k), p over the options with the context, q without it, from separate forwards."""
    for k, item in enumerate(localized.items):
        assert item["id"] == samples[k].id
        p, q = direct["p"][k].tolist(), direct["q"][k].tolist()
        by_hand = sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))
        assert item["ci"] == pytest.approx(by_hand, abs=2e-5, rel=1e-3)
    assert max(item["ci"] for item in localized.items) > 1e-3  # the context does move this model


def test_pearson_of_every_head_is_scipys_on_its_own_activations(localized, direct):
    ci = np.array([item["ci"] for item in localized.items])
    for name in ("attn_max", "head_norm"):
        r = localized.get(name)  # [L, H]
        for layer in range(3):
            for head in range(4):
                x = direct[name][:, layer, head].numpy()
                want = stats.pearsonr(x, ci)
                assert float(r[layer, head]) == pytest.approx(want.statistic, abs=1e-4), (name, layer, head)
                low = float(localized.low[localized.activations.index(name), 0, layer, head])
                assert low == pytest.approx(want.confidence_interval(0.95).low, abs=1e-3)
        assert len({round(float(v), 6) for v in r.flatten()}) > 6  # each layer and head its own r


def test_localize_end_to_end_saves_loads_and_draws(localized, samples, tmp_path):
    loc = localized
    assert loc.r.shape == (2, len(loc.categories), 3, 4) and int(loc.n[0]) == len(samples)
    assert len(loc.items) == len(samples) and all(item["ci"] >= 0 for item in loc.items)
    assert loc.model["dims"]["n_heads"] == 4
    loc.save(tmp_path)
    back = Localization.load(tmp_path)
    assert torch.equal(back.r.nan_to_num(), loc.r.nan_to_num()) and back.categories == loc.categories
    assert back.items == loc.items and back.model == loc.model
    paths = plot_heatmaps(loc, tmp_path, marked=[(0, 1)])
    assert [p.name for p in paths] == ["r_attn_max.png", "r_head_norm.png"] and all(p.stat().st_size > 0 for p in paths)


def test_too_few_items_is_an_error(llama, samples):
    with pytest.raises(ValueError, match="only 2 BBQ items"):
        localize(llama, samples, InfluenceConfig(variant="ambig_disambig"))
