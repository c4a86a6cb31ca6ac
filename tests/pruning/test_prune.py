import copy

import pytest
import torch

from llava_circuits.models.anatomy import Anatomy
from llava_circuits.models.load import Loaded
from llava_circuits.pruning.prune import SoftPruning, qkv_scales
from llava_circuits.sites import capture
from llava_circuits.steering.base import load_intervention

IDS = torch.randint(5, 30, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(loaded, **inputs):
    with torch.no_grad():
        return loaded.model(**(inputs or {"input_ids": IDS})).logits


def copy_of(loaded) -> Loaded:
    model = copy.deepcopy(loaded.model)
    return Loaded(model, loaded.processor, Anatomy.of(model), loaded.name_or_path)


def without_heads(loaded, heads) -> Loaded:
    """An independent model in which the heads' o_proj input columns are zero: their contribution removed."""
    other = copy_of(loaded)
    d = other.anatomy.head_dim
    with torch.no_grad():
        for layer, head in heads:
            other.anatomy.proj(layer, "o_proj").weight[:, head * d : (head + 1) * d] = 0
    return other


def alpha_for(loaded, values: dict) -> torch.Tensor:
    alpha = torch.zeros(loaded.anatomy.n_layers, loaded.anatomy.n_heads)
    for (layer, head), a in values.items():
        alpha[layer, head] = a
    return alpha


@pytest.mark.parametrize("name", ["llama", "qwen", "llava_loaded"])
def test_gate_at_alpha_one_removes_exactly_the_heads_contribution(name, request):
    loaded = request.getfixturevalue(name)
    heads = [(0, 1), (2, 3), (2, 0)]
    with SoftPruning(alpha_for(loaded, {h: 1.0 for h in heads}), "gate").applied(loaded):
        gated = logits(loaded)
    assert torch.allclose(gated, logits(without_heads(loaded, heads)), atol=1e-5)
    assert not torch.allclose(gated, logits(loaded), atol=1e-3)


def test_gate_on_llava_with_an_image(llava_loaded, llava_inputs):
    heads = [(1, 2)]
    with SoftPruning(alpha_for(llava_loaded, {heads[0]: 1.0}), "gate").applied(llava_loaded):
        gated = logits(llava_loaded, **llava_inputs)
    assert torch.allclose(gated, logits(without_heads(llava_loaded, heads), **llava_inputs), atol=1e-5)


def test_gate_at_alpha_zero_is_bit_identical(qwen):
    base = logits(qwen)
    with SoftPruning(torch.zeros(3, 4), "gate").applied(qwen):
        assert torch.equal(logits(qwen), base)
    # heads at alpha 0 in a gated layer pass through bit for bit; the gated head is scaled by 1 - alpha
    with capture(qwen.model, ["layers.1.attn.heads"]) as plain:
        logits(qwen)
    gate = SoftPruning(alpha_for(qwen, {(1, 2): 0.7}), "gate")
    with gate.applied(qwen), capture(qwen.model, ["layers.1.attn.heads"]) as gated:  # the capture sees the gated input
        logits(qwen)
    before, after = plain["layers.1.attn.heads"], gated["layers.1.attn.heads"]  # [batch, pos, heads, head_dim]
    assert torch.equal(after[:, :, [0, 1, 3]], before[:, :, [0, 1, 3]])
    assert torch.allclose(after[:, :, 2], 0.3 * before[:, :, 2], atol=1e-6)
    assert torch.equal(logits(qwen), base)  # detached


def expected_qkv(loaded, alpha) -> dict[str, torch.Tensor]:
    """The Q/K/V weights and biases the edit should give, built head by head in float64."""
    a, d = loaded.anatomy, loaded.anatomy.head_dim
    group = a.n_heads // a.n_kv_heads
    out = {}
    for layer in range(a.n_layers):
        for name in ("q_proj", "k_proj", "v_proj"):
            proj = a.proj(layer, name)
            for kind, param in (("weight", proj.weight), ("bias", proj.bias)):
                if param is None:
                    continue
                new = param.detach().double().clone()
                for head in range(new.shape[0] // d):
                    if name == "q_proj":
                        scale = 1 - float(alpha[layer, head])
                    else:  # KV head `head` serves query heads head*group ... head*group + group - 1
                        scale = 1 - sum(float(alpha[layer, head * group + j]) for j in range(group)) / group
                    new[head * d : (head + 1) * d] *= scale
                out[f"{layer}.{name}.{kind}"] = new.float()
    return out


def current_qkv(loaded) -> dict[str, torch.Tensor]:
    a = loaded.anatomy
    return {f"{l}.{n}.{k}": getattr(a.proj(l, n), k).detach().clone() for l in range(a.n_layers)
            for n in ("q_proj", "k_proj", "v_proj") for k in ("weight", "bias") if getattr(a.proj(l, n), k) is not None}


def test_qkv_scaling_on_a_gqa_model_scales_q_per_head_and_kv_per_group(qwen):
    assert (qwen.anatomy.n_heads, qwen.anatomy.n_kv_heads) == (4, 2)
    alpha = alpha_for(qwen, {(0, 0): 0.5, (1, 2): 1.0, (1, 3): 0.2, (2, 1): 0.8})
    want, before, base = expected_qkv(qwen, alpha), current_qkv(qwen), logits(qwen)
    assert any(k.endswith("bias") for k in want)  # Qwen2 projections have biases: they scale too
    pruning = SoftPruning(alpha, "qkv")
    pruning.attach(qwen)
    got = current_qkv(qwen)
    assert all(torch.allclose(got[k], want[k], atol=1e-7, rtol=0) for k in want)
    assert not torch.allclose(logits(qwen), base, atol=1e-3)
    pruning.detach()
    assert all(torch.equal(current_qkv(qwen)[k], before[k]) for k in before)  # restored bit for bit
    assert torch.equal(logits(qwen), base)


def test_qkv_scales_per_group_is_the_mean_alpha():
    q, kv = qkv_scales(torch.tensor([0.2, 0.4, 1.0, 0.0]), 2)
    assert q.tolist() == pytest.approx([0.8, 0.6, 0.0, 1.0]) and kv.tolist() == pytest.approx([0.7, 0.5])


def test_qkv_with_a_whole_kv_group_at_alpha_one_equals_the_gate(qwen):
    alpha = alpha_for(qwen, {(1, 2): 1.0, (1, 3): 1.0})  # KV group 1 of layer 1
    with SoftPruning(alpha, "qkv").applied(qwen):
        edited = logits(qwen)
    with SoftPruning(alpha, "gate").applied(qwen):
        gated = logits(qwen)
    assert torch.allclose(edited, gated, atol=1e-5)
    base = logits(qwen)
    with SoftPruning(torch.zeros(3, 4), "qkv").applied(qwen):
        assert torch.equal(logits(qwen), base)


def test_bake_equals_the_gate(llama):
    alpha = alpha_for(llama, {(0, 2): 0.6, (1, 1): 1.0})
    with SoftPruning(alpha, "gate").applied(llama):
        gated = logits(llama)
    baked = copy_of(llama)
    SoftPruning(alpha, "gate").bake(baked)
    assert torch.allclose(logits(baked), gated, atol=1e-6)


def test_artifact_round_trip_and_mismatch(qwen, llava_loaded, tmp_path):
    alpha = alpha_for(qwen, {(2, 1): 0.75})
    pruning = SoftPruning(alpha, "qkv", qwen.fingerprint(), {"note": "test"}, {"r": torch.ones(2, 3)})
    path = pruning.save(tmp_path / "p")
    back = load_intervention(path, qwen)
    assert isinstance(back, SoftPruning) and back.mode == "qkv" and torch.equal(back.alpha, alpha)
    assert back.config["note"] == "test" and torch.equal(back.extra_tensors["r"], torch.ones(2, 3))
    assert back.describe() == {"kind": "pruning", "mode": "qkv", "n_pruned": 1,
                               "heads": [{"layer": 2, "head": 1, "alpha": 0.75}]}
    assert SoftPruning.load(path, qwen, mode="gate").mode == "gate"
    with pytest.raises(ValueError, match="n_kv_heads"):
        SoftPruning.load(path, llava_loaded)
    with pytest.raises(ValueError, match="fingerprint"):
        SoftPruning(alpha).save(tmp_path / "q")


def test_bad_alpha_and_double_attach_are_errors(llama):
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        SoftPruning(torch.full((3, 4), 1.5))
    with pytest.raises(ValueError, match="mode"):
        SoftPruning(torch.zeros(3, 4), "prune")
    with pytest.raises(ValueError, match="3 layers x 4 heads"):
        SoftPruning(torch.zeros(2, 4)).attach(llama)
    pruning = SoftPruning(alpha_for(llama, {(0, 0): 0.5}))
    with pruning.applied(llama), pytest.raises(RuntimeError, match="already attached"):
        pruning.attach(llama)


def test_qkv_refuses_models_that_renormalise_queries_and_keys(qwen):
    attn = qwen.anatomy.attn(1)
    attn.q_norm = torch.nn.Identity()  # what Qwen3-style attention has
    try:
        with pytest.raises(ValueError, match="q_norm.*gate"):
            SoftPruning(alpha_for(qwen, {(1, 0): 0.5}), "qkv").attach(qwen)
    finally:
        del attn.q_norm
