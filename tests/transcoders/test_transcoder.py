"""Transcoder maths against direct formulas: encoders, FVU, decoders, CLT contributions, init, export."""
import math

import pytest
import torch

from llava_circuits.transcoders.transcoder import (
    Transcoder,
    TranscoderConfig,
    TranscoderSet,
    dense,
    row_topk,
    sparse_decode,
    sparse_t_mm,
    topk_encode,
    weighted_fvu,
)

D, N = 12, 40


def _data(layers=(0, 1, 2), n=N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = {l: torch.randn(n, D, generator=gen) * 3 + 1 for l in layers}
    ys = {l: torch.randn(n, D, generator=gen) * 5 - 2 for l in layers}
    return xs, ys, torch.rand(n, generator=gen) + 0.5


def test_topk_encode_matches_direct_formula_and_its_gradients():
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(30, D, generator=gen), torch.randn(20, D, generator=gen), torch.randn(20, generator=gen)
    w1, b1 = w.clone().requires_grad_(), b.clone().requires_grad_()
    values, indices = topk_encode(x, w1, b1, 5)
    # direct: keep the 5 largest pre-activations of each row, then relu
    pre = x.double() @ w.double().T + b.double()
    keep = pre >= pre.sort(dim=1, descending=True).values[:, 4:5]
    expected = torch.where(keep, pre.relu(), torch.zeros_like(pre))
    assert torch.allclose(dense(values, indices, 20).double(), expected, atol=1e-5)
    # gradients against autograd through the dense formula
    probe = torch.randn(30, 20, generator=gen)
    (dense(values, indices, 20) * probe).sum().backward()
    w2, b2 = w.double().requires_grad_(), b.double().requires_grad_()
    pre2 = x.double() @ w2.T + b2
    (torch.where(keep, pre2.relu(), 0.0) * probe.double()).sum().backward()
    assert torch.allclose(w1.grad.double(), w2.grad, atol=1e-4)
    assert torch.allclose(b1.grad.double(), b2.grad, atol=1e-4)


@pytest.mark.parametrize("m,k", [(512, 16), (640, 5), (4096, 64), (100, 7)])
def test_row_topk_values_are_torch_topks_with_ties_and_infinities(m, k):
    gen = torch.Generator().manual_seed(m + k)
    x = torch.randint(-20, 20, (64, m), generator=gen).float()  # many ties
    x[:8] = float("-inf")  # rows where AuxK masked out most features
    x[:8, torch.randperm(m, generator=gen)[: k // 2]] = 3.0
    x[8:16] = torch.randn(8, m, generator=gen)
    values, indices = row_topk(x, k)
    assert torch.equal(values.sort(-1).values, x.topk(k, dim=-1).values.sort(-1).values)
    assert torch.equal(x.gather(1, indices), values)
    assert all(len(set(row.tolist())) == k for row in indices)  # k distinct features per row


def test_sparse_decode_is_the_dense_product_with_its_gradients():
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(30, 5, dtype=torch.float64, generator=gen)
    indices = torch.stack([torch.randperm(20, generator=gen)[:5] for _ in range(30)])
    weight = torch.randn(20, D, dtype=torch.float64, generator=gen)
    assert torch.allclose(sparse_decode(values, indices, weight), dense(values, indices, 20) @ weight)
    assert torch.autograd.gradcheck(lambda v, w: sparse_decode(v, indices, w),
                                    (values.requires_grad_(), weight.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sparse_t_mm_is_the_transposed_dense_product(dtype):
    gen = torch.Generator().manual_seed(4)
    values = torch.randn(30, 5, dtype=torch.float64, generator=gen)
    indices = torch.stack([torch.randperm(20, generator=gen)[:5] for _ in range(30)])
    rhs = torch.randn(30, D, dtype=torch.float64, generator=gen)
    want = torch.zeros(20, D, dtype=torch.float64)
    for t in range(30):  # token by token, feature by feature
        for j in range(5):
            want[indices[t, j]] += values[t, j] * rhs[t]
    got = sparse_t_mm(values.to(dtype), indices, 20, rhs.to(dtype))
    assert got.dtype == dtype and got.shape == (20, D)
    assert torch.allclose(got.double(), want, rtol=0, atol={torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 0.2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_decode_gradients_in_half_precision_match_float32(dtype):
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(30, 5, generator=gen)
    indices = torch.stack([torch.randperm(20, generator=gen)[:5] for _ in range(30)])
    weight = torch.randn(20, D, generator=gen)
    grads = {}
    for dt in (torch.float32, dtype):
        v, w = values.to(dt).detach().requires_grad_(), weight.to(dt).detach().requires_grad_()
        sparse_decode(v, indices, w).sum().backward()
        grads[dt] = (v.grad.float(), w.grad.float())
    for got, want in zip(grads[dtype], grads[torch.float32]):
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.05)


def test_jumprelu_encode_is_pre_times_step_and_threshold_gradient_is_the_rectangle_estimator():
    cfg = TranscoderConfig(n_features=8, activation="jumprelu", threshold_init=0.3, bandwidth=0.5)
    t = Transcoder(D, cfg)
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(2))
    pre = t.pre(x).detach()
    acts = t.encode(x)
    assert torch.equal(acts.detach(), pre * (pre > 0.3))
    acts.sum().backward()
    theta = torch.full((8,), 0.3)
    inside = ((pre - theta).abs() < 0.25).float()  # rectangle((pre - theta) / bandwidth)
    d_theta = (-(theta / 0.5) * inside).sum(0)  # d acts / d theta, summed over tokens
    assert torch.allclose(t.log_threshold.grad, d_theta * theta, atol=1e-5)  # chain rule through exp


def test_fvu_matches_float64_formula_and_shards_add_up():
    y = torch.randn(60, D) * 4 + 3
    pred = y + torch.randn(60, D)
    w = torch.rand(60) + 0.1
    fvu, err, var = weighted_fvu((pred - y).pow(2).sum(-1), y, w)
    y64, p64, w64 = y.double(), pred.double(), w.double()
    mean = (w64[:, None] * y64).sum(0) / w64.sum()
    expected = (w64 * (p64 - y64).pow(2).sum(-1)).sum() / (w64 * (y64 - mean).pow(2).sum(-1)).sum()
    assert math.isclose(float(fvu), float(expected), rel_tol=1e-5)
    # two "ranks" holding halves: reduce answers with the sums over both; averaging their shares (as DDP
    # averages gradients) gives the global FVU
    stats = torch.cat([(w[:, None] * y).sum(0), w.sum()[None]])
    total_var = (w * (y - stats[:-1] / stats[-1]).pow(2).sum(-1)).sum()
    shares = []
    for h in (slice(0, 25), slice(25, 60)):
        answers = iter([stats, total_var])
        shares.append(weighted_fvu((pred[h] - y[h]).pow(2).sum(-1), y[h], w[h], lambda t, a=answers: next(a), world=2)[0])
    assert math.isclose(float(sum(shares) / 2), float(expected), rel_tol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
@pytest.mark.parametrize("cross_layer", [False, True])
def test_training_terms_agree_with_the_inference_path_and_export_roundtrips(activation, cross_layer):
    cfg = TranscoderConfig(n_features=24, activation=activation, k=4, skip=True, cross_layer=cross_layer)
    tcs = TranscoderSet(D, cfg, [0, 1, 2])
    xs, ys, w = _data()
    tcs.init_from_data(xs, ys, w)
    terms = tcs.terms(xs, ys, w)
    with torch.no_grad():
        acts = {l: tcs.encode(l, xs[l]) for l in tcs.layers}
        for l in tcs.layers:
            scale = tcs[l].y_scale[0] if cross_layer else tcs[l].y_scale
            pred = tcs.decode(l, acts, xs)
            fvu = weighted_fvu(((pred - ys[l]) / scale).pow(2).sum(-1), ys[l] / scale, w)[0]
            assert math.isclose(float(fvu), float(terms[l].fvu), rel_tol=1e-4)
            assert math.isclose(float(terms[l].l0), float((acts[l] > 0).sum(-1).float().mean()), rel_tol=1e-6)
    back = TranscoderSet.from_tensors(tcs.export(), cfg)
    with torch.no_grad():
        acts2 = {l: back.encode(l, xs[l]) for l in back.layers}
        for l in tcs.layers:
            assert torch.allclose(acts2[l], acts[l], atol=1e-4)
            assert torch.allclose(back.decode(l, acts2, xs), tcs.decode(l, acts, xs), atol=1e-4)


def test_exported_tensors_follow_circuit_tracers_raw_space_formula():
    cfg = TranscoderConfig(n_features=16, activation="jumprelu", skip=True)
    tcs = TranscoderSet(D, cfg, [3])
    xs, ys, w = _data((3,))
    tcs.init_from_data(xs, ys, w)
    with torch.no_grad():
        tcs[3].W_skip.normal_()
    t = tcs.export()[3]
    assert t["W_enc"].shape == (16, D) and t["W_dec"].shape == (16, D) and t["W_skip"].shape == (D, D)
    x = xs[3]
    pre = x @ t["W_enc"].T + t["b_enc"]
    f = pre * (pre > t["threshold"])
    y = f @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T
    with torch.no_grad():
        assert torch.allclose(tcs.encode(3, x), f, atol=1e-4)
        assert torch.allclose(tcs.decode(3, {3: tcs.encode(3, x)}, xs), y, atol=1e-3)


def test_cross_layer_decoder_shapes_and_contributions():
    layers = [1, 2, 4]
    cfg = TranscoderConfig(n_features=10, activation="relu", cross_layer=True)
    tcs = TranscoderSet(D, cfg, layers)
    assert [tcs[l].W_dec.shape for l in layers] == [(10, 3, D), (10, 2, D), (10, 1, D)]
    xs, ys, w = _data(layers)
    tcs.init_from_data(xs, ys, w)
    with torch.no_grad():
        for l in layers:
            tcs[l].W_dec.normal_()
            tcs[l].b_dec.normal_()
        ex = tcs.export()
        acts = {l: tcs.encode(l, xs[l]) for l in layers}
        for j, target in enumerate(layers):
            # direct: sum over sources s <= target of f_s @ W_dec_s[:, target - s] + b_dec
            direct = sum(acts[s] @ ex[s]["W_dec"][:, j - i] for i, s in enumerate(layers) if i <= j) + ex[target]["b_dec"]
            assert torch.allclose(tcs.decode(target, acts, xs), direct, atol=1e-3)
        # features of layer 2 write to layers 2 and 4, never to layer 1
        silenced = {**acts, 2: torch.zeros_like(acts[2])}
        assert torch.equal(tcs.decode(1, silenced, xs), tcs.decode(1, acts, xs))
        assert not torch.allclose(tcs.decode(4, silenced, xs), tcs.decode(4, acts, xs))


def test_data_driven_init_centres_preactivations_and_sets_the_output_mean():
    tcs = TranscoderSet(D, TranscoderConfig(n_features=32, activation="relu"), [0])
    xs, ys, w = _data((0,))
    tcs.init_from_data(xs, ys, w)
    t = tcs[0]
    wmean = lambda v: (w[:, None] * v).sum(0) / w.sum()  # noqa: E731
    assert torch.allclose(t.b_dec * t.y_scale, wmean(ys[0]), atol=1e-4)
    assert torch.allclose(wmean(t.pre(xs[0]).detach()), torch.zeros(32), atol=1e-4)
    rms = ((w * xs[0].pow(2).sum(-1)).sum() / (w.sum() * D)).sqrt()
    assert math.isclose(float(t.x_scale), float(rms), rel_tol=1e-5)


def test_decoder_norm_handling():
    xs, ys, w = _data((0,))
    unit = TranscoderSet(D, TranscoderConfig(n_features=16, activation="topk", k=3, normalize_decoder=True), [0])
    with torch.no_grad():
        unit[0].W_dec.mul_(7.0)
    unit.after_step()
    assert torch.allclose(unit[0].W_dec.norm(dim=1), torch.ones(16), atol=1e-5)
    # relu: the L1 penalty weighs activations by decoder norms, so rescaling a feature does not cheat it
    relu = TranscoderSet(D, TranscoderConfig(n_features=16, activation="relu"), [0])
    relu.init_from_data(xs, ys, w)
    before = relu.terms(xs, ys, w)[0]
    with torch.no_grad():
        t = relu[0]
        t.W_enc[3] *= 0.25
        t.b_enc[3] *= 0.25
        t.W_dec[3] *= 4.0
    after = relu.terms(xs, ys, w)[0]
    assert math.isclose(float(before.loss.detach()), float(after.loss.detach()), rel_tol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_training_reduces_fvu_on_a_sparse_problem(activation):
    gen = torch.Generator().manual_seed(3)
    codes = (torch.rand(400, 32, generator=gen) < 0.08) * torch.rand(400, 32, generator=gen) * 3
    x = codes @ torch.randn(32, D, generator=gen)
    y = codes @ torch.randn(32, D, generator=gen)
    w = torch.ones(400)
    tcs = TranscoderSet(D, TranscoderConfig(n_features=64, activation=activation, k=6, l1_coeff=1e-4, l0_coeff=1e-4), [0])
    tcs.init_from_data({0: x}, {0: y}, w)
    opt = torch.optim.Adam(tcs.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        terms = tcs.terms({0: x}, {0: y}, w)[0]
        first = first if first is not None else float(terms.fvu)
        opt.zero_grad()
        terms.loss.backward()
        opt.step()
    assert float(terms.fvu) < 0.3 * first, (first, float(terms.fvu))


def test_fired_is_the_dense_codes_any_positive_column():
    t = Transcoder(D, TranscoderConfig(n_features=10, activation="topk", k=3))
    values = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]])
    indices = torch.tensor([[4, 7, 1], [7, 9, 4], [2, 3, 5]])  # 7 is zero in both rows; 4 is live in one of two
    expected = (dense(values, indices, 10) > 0).any(0)
    assert torch.equal(t.fired(values, indices), expected)
    assert t.fired(values, indices).nonzero().flatten().tolist() == [1, 4]


def test_dead_tracking_and_aux_k():
    xs, ys, w = _data((0,))
    tcs = TranscoderSet(D, TranscoderConfig(n_features=16, activation="topk", k=2, dead_tokens=100), [0])
    tcs.init_from_data(xs, ys, w)
    t = tcs[0]
    fired = torch.zeros(16, dtype=torch.bool)
    fired[:4] = True
    t.track_dead(fired, 150.0)
    assert torch.equal(t.tokens_since_fired > 100, ~fired)
    with_aux = tcs.terms(xs, ys, w)[0]
    no_aux = TranscoderSet(D, TranscoderConfig(n_features=16, activation="topk", k=2, dead_tokens=100, aux_k_coeff=0), [0])
    no_aux.load_state_dict(tcs.state_dict())
    plain = no_aux.terms(xs, ys, w)[0]
    assert float(with_aux.loss.detach()) > float(plain.loss.detach())  # the dead features' AuxK term is added
    assert math.isclose(float(with_aux.fvu), float(plain.fvu), rel_tol=1e-6)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="activation"):
        TranscoderConfig(activation="gelu").check()
    with pytest.raises(ValueError, match="k="):
        TranscoderConfig(n_features=4, k=8).check()
    with pytest.raises(ValueError, match="cross-layer"):
        TranscoderSet(D, TranscoderConfig(cross_layer=True), [0], all_layers=[0, 1])


def test_revive_raises_only_dead_features_biases():
    xs, ys, w = _data((0,))
    tcs = TranscoderSet(D, TranscoderConfig(n_features=16, activation="topk", k=2, dead_tokens=100, revive_rate=0.5), [0])
    tcs.init_from_data(xs, ys, w)
    t = tcs[0]
    fired = torch.arange(16) < 4
    t.track_dead(fired, 150.0)
    before = t.b_enc.detach().clone()
    tcs.after_step()
    assert torch.allclose(t.b_enc.detach() - before, torch.where(fired, 0.0, 0.5))
