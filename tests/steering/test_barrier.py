import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from llava_circuits.models.anatomy import Anatomy
from llava_circuits.models.load import Loaded
from llava_circuits.models.tiny import tiny_llava, tiny_processor
from llava_circuits.sites import capture
from llava_circuits.steering.barrier import (
    Barrier,
    BarrierConfig,
    LayerMath,
    attention_of,
    autograd_grad,
    barrier_theta,
    closed_form_grad,
    image_attention,
    image_attention_grad,
    logit_effects,
)
from llava_circuits.steering.base import load_intervention


def sharp_llava(dtype=torch.float32) -> Loaded:
    """The tiny LLaVA with q/k weights scaled up: random init attends almost uniformly, this one does not."""
    model = tiny_llava(seed=2).to(dtype)
    a = Anatomy.of(model)
    with torch.no_grad():
        for i in range(a.n_layers):
            a.proj(i, "q_proj").weight.mul_(8)
            a.proj(i, "k_proj").weight.mul_(8)
    return Loaded(model, tiny_processor(), a, name_or_path="tiny-sharp-llava")


@pytest.fixture(scope="module")
def sharp():
    return sharp_llava()


class Stash(Barrier):
    """A Barrier that keeps what each steered call saw: (layer, phase, x, keys), as normal tensors that autograd
    may use (the hooks run in inference mode when every layer has the closed-form gradient)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def _steer(self, layer, x0, keys, step):
        with torch.inference_mode(False):
            kept = type(keys)(**{f: getattr(keys, f).clone() for f in keys.__dataclass_fields__ if f != "shared"})
            self.seen.append((layer, step.phase, x0.clone(), kept))
        return super()._steer(layer, x0, keys, step)


def image_mass(probs: torch.Tensor, ids: torch.Tensor, anatomy: Anatomy) -> torch.Tensor:
    """[batch, pos] mean over heads of the attention on image keys, from attn.probs [batch, pos, H, keys]."""
    image = anatomy.image_mask(ids)[:, : probs.shape[-1]]
    return (probs * image[:, None, None, :]).sum(-1).mean(-1)


def test_h_while_decoding_equals_a_no_cache_forward_of_the_same_sequence(sharp, llava_inputs):
    watch = Barrier(BarrierConfig(tau=1e-6, layers=[0, 2]), record=True)  # never below tau: only measures
    with torch.no_grad(), watch.applied(sharp):
        out = sharp.model.generate(**llava_inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    seq = out[:, :-1]  # the last token was never fed back
    mask = torch.cat([llava_inputs["attention_mask"], torch.ones(3, 3, dtype=torch.long)], dim=1)
    with torch.no_grad(), capture(sharp.model, ["layers.0.attn.probs", "layers.2.attn.probs"]) as cap:
        sharp.model(input_ids=seq, attention_mask=mask, pixel_values=llava_inputs["pixel_values"])
    prompt_last = llava_inputs["input_ids"].shape[1] - 1
    assert len(watch.records) == 2 * 3 * 4  # layers x rows x (prefill + 3 decode forwards)
    for r in watch.records:
        expected = image_mass(cap[f"layers.{r['layer']}.attn.probs"], seq, sharp.anatomy)[r["row"], r["position"]]
        assert r["position"] >= prompt_last and not r["steered"]
        assert r["h_before"] == pytest.approx(float(expected), abs=1e-5)


def rms_norm_float64(self, hidden_states):
    """LlamaRMSNorm without its float32 round trip, so float64 finite differences are exact."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_theta_is_the_closed_form_with_a_finite_difference_gradient(llava_inputs, monkeypatch):
    monkeypatch.setattr(LlamaRMSNorm, "forward", rms_norm_float64)
    sharp64 = sharp_llava(torch.float64)
    stash = Stash(BarrierConfig(tau=1e-6, layers=[1], phases=["prefill"]))
    with torch.no_grad(), stash.applied(sharp64):
        sharp64.model(**{**llava_inputs, "pixel_values": llava_inputs["pixel_values"].double()})
    (layer, _, x, keys), = stash.seen  # x [3, d_model] float64
    h_fn = lambda v: image_attention(v, LayerMath.of(sharp64.anatomy, layer), keys)
    with torch.no_grad():
        tau = float(h_fn(x).max()) + 0.01
    theta, h, g = barrier_theta(x, h_fn, tau)
    eps, d = 1e-6, x.shape[1]
    with torch.no_grad():
        fd = torch.stack([(h_fn(x + eps * e) - h_fn(x - eps * e)) / (2 * eps) for e in torch.eye(d, dtype=x.dtype)], 1)
    torch.testing.assert_close(g.double(), fd, rtol=1e-6, atol=1e-9)
    closed = (tau - h_fn(x))[:, None] / (fd * fd).sum(-1, keepdim=True) * fd
    torch.testing.assert_close(theta, closed, rtol=1e-6, atol=1e-12)
    with torch.no_grad():  # along theta, h rises at rate tau - h: g . theta = tau - h (the linearised barrier)
        t = 1e-4
        torch.testing.assert_close((h_fn(x + t * theta) - h_fn(x - t * theta)) / (2 * t), tau - h, rtol=1e-6, atol=0)
    capped, _, _ = barrier_theta(x, h_fn, tau, max_step=1e-3)
    torch.testing.assert_close(capped.norm(dim=-1), 1e-3 * x.norm(dim=-1), rtol=1e-9, atol=0)
    above, _, _ = barrier_theta(x, h_fn, tau=1e-6)
    assert not above.any()  # rows at or above tau are left alone


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_closed_form_gradient_is_autograds_at_prefill_and_while_decoding(llava_inputs, monkeypatch, n_kv_heads):
    monkeypatch.setattr(LlamaRMSNorm, "forward", rms_norm_float64)
    model = tiny_llava(seed=2, n_kv_heads=n_kv_heads).double()
    loaded = Loaded(model, tiny_processor(), Anatomy.of(model), name_or_path="tiny-llava")
    stash = Stash(BarrierConfig(tau=1e-6))  # measures only
    with torch.no_grad(), stash.applied(loaded):
        model.generate(**{**llava_inputs, "pixel_values": llava_inputs["pixel_values"].double()}, max_new_tokens=3,
                       do_sample=False, pad_token_id=0)
    assert {phase for _, phase, _, _ in stash.seen} == {"prefill", "decode"}
    for layer, _, x, keys in stash.seen:
        assert closed_form_grad(loaded.anatomy, layer)
        m = LayerMath.of(loaded.anatomy, layer)
        _, expected = autograd_grad(x, lambda v: image_attention(v, m, keys))
        with torch.no_grad():
            got = image_attention_grad(attention_of(x, m, keys), m, keys)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_steered_h_after_is_the_attention_the_layer_really_computes(sharp, llava_inputs):
    barrier = Barrier(BarrierConfig(tau=0.8, layers=[1], max_iters=10, max_step=0.5), record=True)
    with torch.no_grad(), barrier.applied(sharp), capture(sharp.model, ["layers.1.attn.probs"], positions="last") as cap:
        out = sharp.model.generate(**llava_inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    image = sharp.anatomy.image_mask(out)
    mass = [(c.values * image[:, None, : c.values.shape[-1]]).sum(-1).mean(-1) for c in cap.chunks("layers.1.attn.probs")]
    records = [r for r in barrier.records if r["layer"] == 1]
    assert sum(r["steered"] for r in records) >= 3
    for k, r in enumerate(records):  # records: forward by forward, row by row; mass[forward]: [batch]
        assert r["h_after"] == pytest.approx(float(mass[k // 3][r["row"]]), abs=1e-5)

        if r["steered"]:
            assert r["h_after"] >= 0.8 and r["theta_ratio"] > 0 and r["iters"] >= 1
        else:
            assert r["h_after"] == r["h_before"] >= 0.8 and r["theta_ratio"] == 0
    assert barrier.summary()["min_h_after_minus_tau"] >= 0


def test_steps_aim_a_margin_above_tau_so_that_no_steered_h_stops_a_rounding_short(sharp, llava_inputs):
    for margin, reaches in [(1e-3, True), (0.0, False)]:  # without the margin, iterates stop at tau - 5e-8
        barrier = Barrier(BarrierConfig(tau=0.8, margin=margin, max_iters=5), record=True)  # when the steps run out
        with torch.no_grad(), barrier.applied(sharp):
            sharp.model.generate(**llava_inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
        steered = [r["h_after"] for r in barrier.records if r["steered"]]
        assert len(steered) > 40
        assert (min(steered) >= 0.8) == reaches


def test_works_under_inference_mode_and_detach_restores_logits_bit_identically(sharp, llava_inputs):
    with torch.inference_mode():
        base = sharp.model(**llava_inputs).logits
        barrier = Barrier(BarrierConfig(tau=0.8), record=True)
        with barrier.applied(sharp):
            steered = sharp.model(**llava_inputs).logits
            sharp.model.generate(**llava_inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
        after = sharp.model(**llava_inputs).logits
    assert barrier.summary()["positions_steered"] > 0
    assert not torch.equal(base[:, -1], steered[:, -1]) and torch.equal(base[:, :-1], steered[:, :-1])
    assert torch.equal(base, after)


def test_a_layer_without_the_closed_form_steers_by_autograd_as_the_closed_form_does(sharp, llava_inputs, monkeypatch):
    records = {}
    for closed in (True, False):
        if not closed:  # as for a norm that is not Llama's RMSNorm: its module is called, autograd takes the gradient
            monkeypatch.setattr("llava_circuits.steering.barrier.closed_form_grad", lambda anatomy, layer: layer != 1)
        barrier = Barrier(BarrierConfig(tau=0.8, layers=[0, 1]), record=True)
        with torch.inference_mode(), barrier.applied(sharp):
            sharp.model.generate(**llava_inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert barrier._inference == closed  # autograd cannot run in inference mode: one such layer keeps it off
        records[closed] = barrier.records
    assert sum(r["steered"] for r in records[False] if r["layer"] == 1) >= 3
    for a, b in zip(records[True], records[False], strict=True):
        assert (a["layer"], a["position"], a["steered"], a["iters"]) == (b["layer"], b["position"], b["steered"], b["iters"])
        assert a["h_after"] == pytest.approx(b["h_after"], abs=1e-5)
        assert b["h_after"] >= 0.8 or not b["steered"]


def test_phases_choose_prefill_or_decode(sharp, llava_inputs):
    for phases, expected in ((["prefill"], {"prefill"}), (["decode"], {"decode"})):
        barrier = Barrier(BarrierConfig(tau=0.5, layers=[0], phases=phases), record=True)
        with torch.no_grad(), barrier.applied(sharp):
            sharp.model.generate(**llava_inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert {r["phase"] for r in barrier.records} == expected


def test_sinks_leave_out_image_tokens_with_outsized_norms(sharp, llava_inputs):
    barrier = Barrier(BarrierConfig(tau=1e-6, layers=[1], sink_ratio=1.0), record=True)
    with torch.no_grad(), barrier.applied(sharp), capture(sharp.model, ["layers.1.resid_pre", "layers.1.attn.probs"]) as cap:
        sharp.model(**llava_inputs)
    ids = llava_inputs["input_ids"]
    image = sharp.anatomy.image_mask(ids)
    norms = cap["layers.1.resid_pre"].norm(dim=-1)  # [batch, pos]
    for r in barrier.records:
        row = r["row"]
        median = norms[row][image[row]].median()
        kept = image[row] & (norms[row] <= median)  # sink_ratio 1: above the median is a sink
        probs = cap["layers.1.attn.probs"][row, -1]  # [H, keys]
        assert r["h_before"] == pytest.approx(float(probs[:, kept].sum(-1).mean()), abs=1e-5)


def test_sinks_found_at_prefill_also_when_only_decoding_is_steered(sharp, llava_inputs):
    h = {}
    for ratio in (None, 1.0):
        barrier = Barrier(BarrierConfig(tau=1e-6, layers=[1], phases=["decode"], sink_ratio=ratio), record=True)
        with torch.no_grad(), barrier.applied(sharp):
            sharp.model.generate(**llava_inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
        h[ratio] = [r["h_before"] for r in barrier.records]
        assert barrier.records and {r["phase"] for r in barrier.records} == {"decode"}
    assert all(with_sinks < without for with_sinks, without in zip(h[1.0], h[None]))  # half the image keys left out


def test_logit_effects_measure_the_answer_margin(sharp, llava_inputs):
    idle = logit_effects(sharp, Barrier(BarrierConfig(tau=1e-6, layers=[0, 2])), llava_inputs, answers=("yes", "no"))
    assert idle["margin_before"] == idle["margin_after"] and len(idle["margin_before"]) == 3
    assert all(v == [0.0, 0.0, 0.0] for v in idle["margin_change_by_layer"].values())
    moved = logit_effects(sharp, Barrier(BarrierConfig(tau=0.9, layers=[0, 2])), llava_inputs, answers=("yes", "no"))
    assert moved["margin_before"] == idle["margin_before"] and moved["margin_after"] != moved["margin_before"]
    assert sorted(moved["margin_change_by_layer"]) == ["0", "2"]


def test_artifact_holds_the_configuration(sharp, tmp_path):
    config = BarrierConfig(tau=0.4, alpha=1.2, layers=[0, 2], phases=["prefill"], max_step=0.3, max_iters=7, sink_ratio=5.0)
    path = Barrier(config, fingerprint=sharp.fingerprint()).save(tmp_path / "barrier")
    back = load_intervention(path, sharp)
    assert isinstance(back, Barrier) and back.config == config
    with pytest.raises(ValueError, match="phases"):
        BarrierConfig(phases=["later"])
