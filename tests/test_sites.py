import copy

import pytest
import torch

from llava_circuits.models.anatomy import Anatomy
from llava_circuits.sites import KINDS, Site, all_sites, capture, intervene

KINDS_NO_PROBS = [k for k in KINDS if k != "attn.probs"]


def n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(params=["llava", "qwen2"])
def case(request):
    return request.getfixturevalue(request.param), request.getfixturevalue(f"{request.param}_inputs")


def test_site_names_parse_and_reject():
    assert Site.parse("layers.3.attn.heads") == Site(3, "attn.heads")
    with pytest.raises(ValueError, match="unknown site"):
        Site.parse("blocks.3.hook_resid_pre")


def test_capture_leaves_logits_bit_identical(case):
    model, inputs = case
    base = logits(model, inputs)
    with capture(model, all_sites(Anatomy.of(model), KINDS)) as cap:  # attn.probs too: the kernel's own output
        out = logits(model, inputs)
    assert torch.equal(base, out)
    assert len(cap.keys()) == Anatomy.of(model).n_layers * len(KINDS)


@pytest.mark.parametrize("positions", ["all", "last", "text", [2, 4]])
def test_identity_edit_bit_identical_and_real_edit_changes(case, positions):
    model, inputs = case
    anatomy = Anatomy.of(model)
    base = logits(model, inputs)
    with intervene(model, {s: (lambda x: x) for s in all_sites(anatomy, KINDS)}, positions=positions):
        assert torch.equal(base, logits(model, inputs))
    for kind in KINDS:
        with intervene(model, {f"layers.1.{kind}": lambda x: x * 0.5}, positions=positions):
            assert not torch.equal(base, logits(model, inputs)), kind


def test_probs_identity_edit_equals_probs_capture(llava, llava_inputs):
    with capture(llava, ["layers.1.attn.probs"]):
        probed = logits(llava, llava_inputs)
    with intervene(llava, {"layers.1.attn.probs": lambda p: p}):
        assert torch.equal(probed, logits(llava, llava_inputs))
    real = llava_inputs["attention_mask"].bool()  # padded rows are fully masked: sdpa and eager differ there
    torch.testing.assert_close(probed[real], logits(llava, llava_inputs)[real], atol=1e-5, rtol=0)


def test_nested_probs_edit_ends_with_its_block(case):
    model, inputs = case
    base = logits(model, inputs)
    uniform = lambda p: torch.full_like(p, 1.0 / p.shape[-1])  # noqa: E731
    with capture(model, ["layers.1.attn.probs"]):
        with intervene(model, {"layers.1.attn.probs": uniform}):
            edited = logits(model, inputs)
        after = logits(model, inputs)
        assert not torch.equal(edited, base) and torch.equal(after, base)  # the inner edit left with its block
    config = Anatomy.of(model).attn(1).config
    assert config._attn_implementation != "llava_circuits_probe" and not hasattr(Anatomy.of(model).attn(1), "_lc_probes")


def test_loop_lambdas_with_defaults_get_no_context(llava, llava_inputs):
    scales = [1.0, 0.5, 0.25]
    with intervene(llava, {f"layers.{i}.mlp.out": (lambda act, i=i: act * scales[i]) for i in range(3)}):
        edited = logits(llava, llava_inputs)
    assert not torch.equal(edited, logits(llava, llava_inputs))


def test_probs_of_a_flash_attention_mask_are_refused():
    from llava_circuits.sites import _additive_mask

    q, k = torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 5, 8)
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        _additive_mask(torch.ones(2, 5, dtype=torch.long), q, k)


def test_a_row_that_selected_nothing_is_not_dropped(llava, llava_inputs):
    def first_row_only(step):
        mask = torch.zeros(step.input_ids.shape, dtype=torch.bool)
        mask[0, -3:] = True
        return mask

    with capture(llava, ["layers.0.mlp.out"], positions=first_row_only) as cap:
        logits(llava, llava_inputs)
    assert cap.chunks("layers.0.mlp.out")[0].rows == llava_inputs["input_ids"].shape[0]
    with pytest.raises(ValueError, match="rows selected different numbers of positions"):
        cap["layers.0.mlp.out"]  # not a [1, 3, d] tensor that silently stands for the whole batch


def test_no_hook_survives_even_on_error(llava, llava_inputs):
    before = n_hooks(llava)
    config = Anatomy.of(llava).attn(1).config
    with pytest.raises(RuntimeError, match="boom"):
        with capture(llava, ["layers.0.mlp.in", "layers.1.attn.probs"]), intervene(llava, {"layers.2.resid_pre": lambda x: x}):
            assert n_hooks(llava) > before
            raise RuntimeError("boom")
    assert n_hooks(llava) == before
    assert Anatomy.of(llava).attn(1).config is config


def test_sites_agree_with_direct_module_calls(case):
    model, inputs = case
    a = Anatomy.of(model)
    with capture(model, all_sites(a, KINDS_NO_PROBS)) as cap, torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    with torch.no_grad():  # outside the block, so these direct calls are not captured again
        for i in range(a.n_layers):
            torch.testing.assert_close(a.proj(i, "o_proj")(cap[f"layers.{i}.attn.heads"].flatten(2)), cap[f"layers.{i}.attn.out"], rtol=0, atol=0)
            torch.testing.assert_close(a.mlp(i)(cap[f"layers.{i}.mlp.in"]), cap[f"layers.{i}.mlp.out"], rtol=0, atol=0)
            torch.testing.assert_close(a.proj(i, "down_proj")(cap[f"layers.{i}.mlp.neurons"]), cap[f"layers.{i}.mlp.out"], rtol=0, atol=0)
            resid = cap[f"layers.{i}.resid_post"]
            if i < a.n_layers - 1:
                assert torch.equal(resid, hidden[i + 1])
            else:  # transformers applies the final norm to the last entry of hidden_states
                assert torch.equal(a.final_norm(resid), hidden[i + 1])
            assert torch.equal(cap[f"layers.{i}.resid_pre"], hidden[i])
    assert cap["layers.0.attn.heads"].shape[2:] == (a.n_heads, a.head_dim)


def record_positions(model, inputs, positions, site="layers.1.resid_pre", new_tokens=3):
    calls = []

    def edit(act, ctx):
        calls.append((ctx.phase, sorted(zip(ctx.batch.tolist(), ctx.pos.tolist()))))
        return act + 1.0  # a real edit: it must not derail which positions later calls see

    with intervene(model, {site: edit}, positions=positions), torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return calls


def test_positions_inside_generate_with_cache_and_left_padding(llava, llava_inputs):
    ids, mask = llava_inputs["input_ids"], llava_inputs["attention_mask"]
    batch, length = ids.shape
    assert len(set(mask.sum(1).tolist())) == 3, "the fixture must be left-padded to different lengths"
    rows = range(batch)
    decode_steps = [[(b, length + t) for b in rows] for t in range(2)]
    prompt_last = [(b, length - 1) for b in rows]

    assert record_positions(llava, llava_inputs, "last") == [("prefill", prompt_last)] + [("decode", d) for d in decode_steps]
    assert record_positions(llava, llava_inputs, "decode") == [("decode", d) for d in decode_steps]
    assert record_positions(llava, llava_inputs, "prompt_last") == [("prefill", prompt_last)]
    image = sorted((b, p) for b, p in (ids == Anatomy.of(llava).image_token_id).nonzero().tolist())
    assert record_positions(llava, llava_inputs, "image") == [("prefill", image)]
    text = sorted(tuple(x) for x in (mask.bool() & (ids != Anatomy.of(llava).image_token_id)).nonzero().tolist())
    calls = record_positions(llava, llava_inputs, "text")
    assert calls[0] == ("prefill", text) and [c[1] for c in calls[1:]] == decode_steps
    explicit = record_positions(llava, llava_inputs, [1, length + 1])
    assert explicit == [("prefill", [(b, 1) for b in rows]), ("decode", decode_steps[1])]


def test_edit_touches_only_selected_positions(llava, llava_inputs):
    a = Anatomy.of(llava)
    with capture(llava, ["layers.0.resid_post"]) as clean:
        logits(llava, llava_inputs)
    with intervene(llava, {"layers.0.resid_post": lambda x: x + 3.0}, positions="image"):
        with capture(llava, ["layers.0.resid_post"]) as edited:
            logits(llava, llava_inputs)
    changed = (edited["layers.0.resid_post"] != clean["layers.0.resid_post"]).any(-1)
    assert torch.equal(changed, a.image_mask(llava_inputs["input_ids"]))


def test_attn_probs_on_two_layers_equal_eager(llava, llava_inputs):
    eager = copy.deepcopy(llava)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        reference = eager(**llava_inputs, output_attentions=True).attentions  # per layer [batch, heads, q, k]
    a = Anatomy.of(llava)
    chosen = [0, 2]
    with capture(llava, [f"layers.{i}.attn.probs" for i in chosen]) as cap:
        assert a.attn(1).config._attn_implementation == "sdpa"
        assert all(a.attn(i).config._attn_implementation != "sdpa" for i in chosen)
        logits(llava, llava_inputs)
    real = llava_inputs["attention_mask"].bool()
    for i in chosen:
        probs = cap[f"layers.{i}.attn.probs"]  # [batch, q, heads, k]
        torch.testing.assert_close(probs.sum(-1)[real], torch.ones_like(probs.sum(-1)[real]))
        torch.testing.assert_close(probs[real], reference[i].transpose(1, 2)[real], rtol=1e-5, atol=1e-6)
    assert all(a.attn(i).config._attn_implementation == "sdpa" for i in range(a.n_layers))


def test_attn_probs_keeps_only_rows_and_columns_asked(llava, llava_inputs):
    a = Anatomy.of(llava)
    with capture(llava, ["layers.1.attn.probs"]) as full:
        logits(llava, llava_inputs)
    with capture(llava, ["layers.1.attn.probs"], positions="last", key_positions="image") as part:
        logits(llava, llava_inputs)
    image_cols = a.image_mask(llava_inputs["input_ids"])
    got = part["layers.1.attn.probs"]
    assert got.shape == (3, 1, a.n_heads, a.n_image_tokens)
    for b in range(3):
        assert torch.equal(got[b, 0], full["layers.1.attn.probs"][b, -1][:, image_cols[b]])


def test_attn_probs_gqa(qwen2, qwen2_inputs):
    eager = copy.deepcopy(qwen2)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        reference = eager(**qwen2_inputs, output_attentions=True).attentions[1]
    with capture(qwen2, ["layers.1.attn.probs"]) as cap:
        logits(qwen2, qwen2_inputs)
    real = qwen2_inputs["attention_mask"].bool()
    torch.testing.assert_close(cap["layers.1.attn.probs"][real], reference.transpose(1, 2)[real], rtol=1e-5, atol=1e-6)


def test_capture_in_generate_stacks_decode_steps(llava, llava_inputs):
    with capture(llava, ["layers.0.mlp.out"], positions="last") as cap, torch.no_grad():
        llava.generate(**llava_inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    length = llava_inputs["input_ids"].shape[1]
    assert cap["layers.0.mlp.out"].shape[:2] == (3, 4)
    assert cap.positions("layers.0.mlp.out")[0].tolist() == [length - 1, length, length + 1, length + 2]
