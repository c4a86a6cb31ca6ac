"""The linearised replacement model: it reproduces the model, and its edges equal autograd through the real modules."""
import pytest
import torch

from llava_circuits.attribution.linear import LinearModel, raw_transcoders, record
from llava_circuits.sites import intervene

from .conftest import KINDS, make_transcoders, prompt_inputs


def _linear(loaded, kind, dtype=torch.float64):
    rec = record(loaded, prompt_inputs(loaded))
    return rec, LinearModel(loaded, rec, raw_transcoders(make_transcoders(kind)), dtype)


@pytest.mark.parametrize("kind", list(KINDS))
def test_with_error_terms_the_replacement_reproduces_the_models_logits(loaded64, kind):
    rec, lin = _linear(loaded64, kind)
    logits, mlp_in = lin.replay()
    scale = rec.logits.abs().max()
    # the model's RMSNorms compute in float32 even in a float64 model: that rounding is all that is left
    assert (logits - rec.logits.double()).abs().max() <= 1e-6 * scale
    for layer, m in enumerate(mlp_in):
        assert torch.allclose(m, rec.mlp_in[layer], atol=1e-6)
    assert len(lin.active) > 0


def test_transcoders_alone_do_not_reproduce_the_logits(loaded64):
    """Guards the test above: the error terms carry something."""
    rec, lin = _linear(loaded64, "plt-relu")
    lin.err = [torch.zeros_like(e) for e in lin.err]
    assert (lin.replay()[0] - rec.logits.double()).abs().max() > 1e-3


def autograd_edges(loaded, rec, lin: LinearModel, target: str, where=None):
    """Direct edges by autograd through the real model's modules: attention probabilities replaced by the
    recorded ones (no gradient), norms by weight * x * frozen scale, each MLP by decode(features) + error with
    features and errors as leaves. Returns (features [n_active], errors [L, T], embeds [T], value)."""
    a = loaded.anatomy
    embeds = rec.embeds.double().clone().requires_grad_(True)
    acts = {l: lin.acts[l].clone().requires_grad_(True) for l in lin.tcs.layers}
    errs = [e.clone().requires_grad_(True) for e in lin.err]
    xs = {}

    def probs(l):
        return lambda act: rec.probs[l].permute(1, 0, 2).to(act.dtype)

    def read(l):
        def fn(x):
            xs[l] = x
            return x
        return fn

    def mlp(l):
        def fn(y):
            if l not in lin.tcs.layers:
                return errs[l]
            return lin.tcs.decode(l, acts, {l: xs[l]}) + errs[l]
        return fn

    def frozen(scale):
        return lambda module, args, out: module.weight * args[0] * scale[:, None].to(args[0].dtype)

    edits = {}
    for l in range(a.n_layers):
        edits[f"layers.{l}.attn.probs"] = probs(l)
        edits[f"layers.{l}.mlp.in"] = read(l)
        edits[f"layers.{l}.mlp.out"] = mlp(l)
    norms = [(a.input_norm(l), rec.s_in[l]) for l in range(a.n_layers)]
    norms += [(a.post_attn_norm(l), rec.s_post[l]) for l in range(a.n_layers)] + [(a.final_norm, rec.s_final)]
    handles = [module.register_forward_hook(frozen(s)) for module, s in norms]
    try:
        with intervene(a.language_model, edits, anatomy=a):
            hidden = a.language_model(inputs_embeds=embeds[None]).last_hidden_state[0]
    finally:
        for h in handles:
            h.remove()
    if target == "logit":
        token, other, pos = where
        value = (a.lm_head.weight[token] - a.lm_head.weight[other]) @ hidden[pos]
    else:
        layer, pos, feat = where
        value = lin.tcs[layer].W_enc[feat] @ xs[layer][pos]  # pre-activation minus b_enc
    leaves = [embeds] + [acts[l] for l in lin.tcs.layers] + errs
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    g_embeds, g_acts, g_errs = grads[0], grads[1 : 1 + len(acts)], grads[1 + len(acts):]
    g_acts = {l: g if g is not None else torch.zeros_like(acts[l]) for l, g in zip(lin.tcs.layers, g_acts)}
    features = torch.stack([g_acts[l][p, f] * acts[l][p, f] for l, p, f in lin.active.tolist()])
    errors = torch.stack([(g * e).sum(-1) if g is not None else torch.zeros(e.shape[0], dtype=e.dtype)
                          for g, e in zip(g_errs, errs)])
    return features.detach(), errors.detach(), (g_embeds * embeds).sum(-1).detach(), float(value.detach())


@pytest.mark.parametrize("kind", list(KINDS))
def test_edges_into_the_logit_equal_autograd(loaded64, kind):
    rec, lin = _linear(loaded64, kind)
    T = lin.T
    yes, no = 10, 11
    w = loaded64.anatomy.lm_head.weight
    rows = lin.backward([lin.logit_seed(w[yes] - w[no], T - 1)])
    features, errors, embeds, value = autograd_edges(loaded64, rec, lin, "logit", (yes, no, T - 1))
    scale = max(features.abs().max(), errors.abs().max(), embeds.abs().max())
    assert torch.allclose(rows.features[0], features, atol=1e-10 * scale, rtol=1e-8)
    assert torch.allclose(rows.errors[0], errors, atol=1e-10 * scale, rtol=1e-8)
    assert torch.allclose(rows.embeds[0], embeds, atol=1e-10 * scale, rtol=1e-8)
    # the biases' share is what autograd's edges leave of the (linearised) target
    rest = value - features.sum() - errors.sum() - embeds.sum()
    assert abs(float(rows.bias[0]) - float(rest)) <= 1e-9 * abs(value)
    assert features.abs().max() > 0 and embeds[rec.input_ids == loaded64.anatomy.image_token_id].abs().max() > 0


@pytest.mark.parametrize("kind,gqa", [("plt-topk-skip", False), ("clt-jumprelu", False), ("plt-relu", True)])
def test_edges_into_a_feature_equal_autograd(loaded64, loaded64_gqa, kind, gqa):
    loaded64 = loaded64_gqa if gqa else loaded64
    rec, lin = _linear(loaded64, kind)
    last_layer = lin.active[:, 0] == max(lin.tcs.layers)
    layer, pos, feat = lin.active[last_layer][-1].tolist()  # a late feature at the last position: a deep row
    rows = lin.backward([lin.feature_seed(layer, pos, feat)])
    features, errors, embeds, value = autograd_edges(loaded64, rec, lin, "feature", (layer, pos, feat))
    scale = max(features.abs().max(), errors.abs().max(), embeds.abs().max())
    assert torch.allclose(rows.features[0], features, atol=1e-10 * scale, rtol=1e-8)
    assert torch.allclose(rows.errors[0], errors, atol=1e-10 * scale, rtol=1e-8)
    assert torch.allclose(rows.embeds[0], embeds, atol=1e-10 * scale, rtol=1e-8)
    # features only read lower layers, at positions up to their own
    src = lin.active
    assert rows.features[0][(src[:, 0] >= layer) | (src[:, 1] > pos)].abs().max() == 0
    assert features[(src[:, 0] < layer) & (src[:, 1] <= pos)].abs().max() > 0
    total = rows.features.sum() + rows.errors.sum() + rows.embeds.sum() + rows.bias.sum()
    assert abs(float(total) - lin.feature_pre(layer, pos, feat)) <= 1e-6 * abs(value)


def test_batched_rows_equal_one_at_a_time(loaded64):
    _, lin = _linear(loaded64, "clt-jumprelu")
    seeds = [lin.feature_seed(*lin.active[i].tolist()) for i in (-1, -7, len(lin.active) // 2)]
    seeds.append(lin.logit_seed(loaded64.anatomy.lm_head.weight[3], lin.T - 2))
    together = lin.backward(seeds)
    lin.chunk_elems = 64 * 70  # one position per decoder block
    for b, seed in enumerate(seeds):
        alone = lin.backward([seed])
        for name in ("features", "errors", "embeds", "bias"):
            assert torch.allclose(getattr(together, name)[b], getattr(alone, name)[0], atol=1e-12)


def test_a_norm_that_is_not_rms_is_refused(loaded64):
    from llava_circuits.attribution.linear import inv_rms

    layer_norm = torch.nn.LayerNorm(64).double()
    with pytest.raises(ValueError, match="cannot freeze"):
        inv_rms(layer_norm, torch.randn(5, 64, dtype=torch.float64), 1e-6)
