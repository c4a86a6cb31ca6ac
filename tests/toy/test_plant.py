import copy
import random
import re

import pytest
import torch
import yaml

from llava_circuits.toy import tasks
from llava_circuits.toy.model import ToyModelConfig, build_model
from llava_circuits.toy.plant import (AnswerProjection, HeadNormPenalty, NeuronNormPenalty, gate_units, head_masks,
                                     neuron_masks, reset_unit_outputs, train_only_units)
from llava_circuits.toy.tokenizer import build_tokenizer
from llava_circuits.toy.train import ToyDataConfig, load_config, toy_train, training_example

TINY = ToyModelConfig(vision_width=32, vision_layers=1, vision_heads=2, vision_mlp=64, text_width=32, text_layers=2,
                      text_heads=4, text_kv_heads=2, text_mlp=64)


@pytest.fixture(scope="module")
def tiny():
    return build_model(build_tokenizer(), TINY, seed=0)


def lm_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (3, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_train_only_units_changes_nothing_but_their_q_rows_kv_group_rows_and_o_columns(tiny):
    model = copy.deepcopy(tiny)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handles = train_only_units(model, [[1, 3]])
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        model(**lm_batch()).logits.square().mean().backward()
        optim.step()
        optim.zero_grad()
    for h in handles:
        h.remove()
    d = 32 // 4  # head_dim; head 3 is in KV group 1 of 2 (GQA: 2 query heads per KV head)
    att = "model.language_model.layers.1.self_attn"
    expected = {f"{att}.q_proj.weight": (slice(3 * d, 4 * d), slice(None)),
                f"{att}.k_proj.weight": (slice(1 * d, 2 * d), slice(None)),
                f"{att}.v_proj.weight": (slice(1 * d, 2 * d), slice(None)),
                f"{att}.o_proj.weight": (slice(None), slice(3 * d, 4 * d))}
    for name, p in model.named_parameters():
        changed = p.detach() != before[name]
        if name in expected:
            inside = torch.zeros_like(changed)
            inside[expected[name]] = True
            assert changed[inside].any(), name
            assert not changed[~inside].any(), name
        else:
            assert not changed.any(), name
    assert set(head_masks(model, [[1, 3]])) == set(expected)


def test_gated_heads_contribute_exactly_nothing(tiny):
    zeroed = copy.deepcopy(tiny)
    d = 32 // 4
    with torch.no_grad():
        zeroed.model.language_model.layers[0].self_attn.o_proj.weight[:, 2 * d : 3 * d] = 0
    with gate_units(tiny, [[0, 2]]):
        gated = tiny(**lm_batch()).logits
    torch.testing.assert_close(gated, zeroed(**lm_batch()).logits, rtol=0, atol=1e-6)
    assert not torch.allclose(tiny(**lm_batch()).logits, gated)  # and the gate came off with the context


def test_head_norm_penalty_is_the_mean_norm_of_the_head_slice_at_the_chosen_positions(tiny):
    seen = []
    hook = tiny.model.language_model.layers[1].self_attn.o_proj.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().double()))
    penalty = HeadNormPenalty(tiny, [[1, 0], [1, 3]])
    try:
        tiny(**lm_batch(1))
    finally:
        hook.remove()
        penalty.remove()
    where = torch.zeros(3, 9, dtype=torch.bool)
    where[0, 4], where[1, 8], where[2, 2:4] = True, True, True
    x, d = seen[0], 32 // 4
    direct = sum(torch.stack([x[b, t, h * d : (h + 1) * d].norm() for b, t in where.nonzero().tolist()]).mean()
                 for h in (0, 3))
    torch.testing.assert_close(penalty.pop(where).double(), direct, rtol=1e-5, atol=1e-6)
    assert penalty.values == []


def test_fresh_head_outputs_are_seeded_and_touch_only_those_columns(tiny):
    a, b = copy.deepcopy(tiny), copy.deepcopy(tiny)
    reset_unit_outputs(a, [[0, 1]], 0.02, seed=5)
    reset_unit_outputs(b, [[0, 1]], 0.02, seed=5)
    wa, w0 = a.model.language_model.layers[0].self_attn.o_proj.weight, tiny.model.language_model.layers[0].self_attn.o_proj.weight
    assert torch.equal(wa, b.model.language_model.layers[0].self_attn.o_proj.weight)
    d = 32 // 4
    assert torch.equal(wa[:, :d], w0[:, :d]) and torch.equal(wa[:, 2 * d :], w0[:, 2 * d :])
    assert 0.01 < float(wa[:, d : 2 * d].detach().std()) < 0.03


def test_bbq_training_fields_no_context_scenario_strength_and_ambiguous_share():
    rng = random.Random(0)
    no_context = [training_example(rng, ToyDataConfig(bbq_no_context=1.0), "bbq") for _ in range(50)]
    for ex in no_context:  # the question line comes first: no context sentence, and the gold is "unknown"
        body = ex["prompt"].split("USER:")[-1].strip()
        assert body.startswith("Who ")
        options = dict(re.match(r"^\(?([A-E])[).] (.*)$", line).groups() for line in body.splitlines()[1:4])
        assert options[ex["answer"]] in tasks.UNKNOWNS
    cfg = ToyDataConfig(bbq_ambig=1.0, ambig_biased_by_scenario=[1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    for j in range(200):
        rng = random.Random(j)
        ex = training_example(rng, cfg, "bbq")
        rng = random.Random(j)
        rng.random(), rng.random()  # the same draws: dot style, then the ambiguous/disambiguated condition
        record = tasks.random_bbq_item(rng, condition="ambig")
        biased = record["question_index"] in ("1", "3", "5", "6")
        expected = tasks.bbq_biased_index(record) if biased else record["label"]
        assert ex["answer"] == tasks.LETTERS[expected]
    rng = random.Random(1)
    texts = [training_example(rng, ToyDataConfig(bbq_ambig=0.0), "bbq")["prompt"] for _ in range(100)]
    assert all(any(s in t for s in ("but the", "while the", "and the")) for t in texts)  # every one disambiguated


def _plant_recipe(tmp_path, weight_decay: float = 0.0, hallucination: bool = False) -> str:
    raw = {
        "max_steps": 2, "batch_size": 4, "ckpt_every": 2, "threads": 1,
        "model": {"vision_width": 32, "vision_layers": 1, "vision_heads": 2, "vision_mlp": 64,
                  "text_width": 32, "text_layers": 2, "text_heads": 2, "text_kv_heads": 2, "text_mlp": 64},
        "vision": {"steps": 0}, "finetune": {"warmup_steps": 1}, "data": {"warmup_mixes": []},
        "plant": {"heads": [[1, 0]], "unlearn_steps": 2, "unlearn": {"warmup_steps": 1},
                  "unlearn_data": {"ambig_biased": 0.0, "seed": 5}, "plant_steps": 2,
                  "plant": {"lr": 0.01, "warmup_steps": 1, "weight_decay": weight_decay},
                  "plant_data": {"seed": 6, "mix": {"bbq": 1.0}}, "norm_penalty": 0.01,
                  "settle_steps": 2, "settle": {"warmup_steps": 1}, "settle_data": {"seed": 7, "bbq_ambig": 0.0}},
    }
    if hallucination:
        raw["hallucination"] = {
            "heads": [[0, 1]], "neurons": [[1, 8, 24]], "answer_tokens": ["Yes", "No"], "unlearn_steps": 2,
            "unlearn": {"warmup_steps": 1}, "unlearn_data": {"partner_yes": 0.0, "seed": 8}, "plant_steps": 2,
            "plant": {"lr": 0.01, "warmup_steps": 1, "weight_decay": 0.0},
            "plant_data": {"seed": 9, "pope_positive": 0.0, "partner_yes": 1.0, "mix": {"pope": 1.0}},
            "refine_steps": 2, "refine": {"lr": 0.01, "warmup_steps": 1, "weight_decay": 0.0},
            "refine_data": {"seed": 10, "partner_yes": 1.0, "mix": {"pope": 1.0}}}
    path = tmp_path / f"plant{weight_decay}{hallucination}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_toy_train_runs_the_plant_stage_and_a_resume_retrains_nothing(tmp_path):
    from safetensors.torch import load_file

    cfg = load_config(_plant_recipe(tmp_path))
    assert cfg.plant.heads == [[1, 0]] and cfg.plant.plant.weight_decay == 0.0
    out = toy_train(str(tmp_path / "m"), _plant_recipe(tmp_path))
    for phase in ("stage3_unlearn", "stage3_plant", "stage3_settle"):
        assert torch.load(out / "lightning" / phase / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
        assert [v.name for v in (out / "lightning" / phase / "logs").iterdir()] == ["version_0"]  # the stage ran once
    first = load_file(out / "model.safetensors")
    again = load_file(toy_train(str(tmp_path / "m"), _plant_recipe(tmp_path), ckpt_path="last") / "model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(ValueError, match="weight_decay must be 0"):
        toy_train(str(tmp_path / "wd"), _plant_recipe(tmp_path, weight_decay=0.01))


def test_gated_neurons_contribute_exactly_nothing_and_train_only_touches_their_rows_and_columns(tiny):
    zeroed = copy.deepcopy(tiny)
    with torch.no_grad():
        zeroed.model.language_model.layers[1].mlp.down_proj.weight[:, 10:20] = 0
    with gate_units(tiny, [], [[1, 10, 20]]):
        gated = tiny(**lm_batch()).logits
    torch.testing.assert_close(gated, zeroed(**lm_batch()).logits, rtol=0, atol=1e-6)
    model = copy.deepcopy(tiny)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handles = train_only_units(model, [], [[1, 10, 20]])
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model(**lm_batch()).logits.square().mean().backward()
    optim.step()
    for h in handles:
        h.remove()
    mlp = "model.language_model.layers.1.mlp"
    expected = {f"{mlp}.gate_proj.weight": (slice(10, 20), slice(None)), f"{mlp}.up_proj.weight": (slice(10, 20), slice(None)),
                f"{mlp}.down_proj.weight": (slice(None), slice(10, 20))}
    for name, p in model.named_parameters():
        changed = p.detach() != before[name]
        inside = torch.zeros_like(changed)
        if name in expected:
            inside[expected[name]] = True
        if name in expected:
            assert changed[inside].all(), name
        assert not changed[~inside].any(), name
    assert set(neuron_masks(model, [[1, 10, 20]])) == set(expected)


def test_neuron_norm_penalty_is_the_mean_norm_of_the_block_at_the_chosen_positions(tiny):
    seen = []
    hook = tiny.model.language_model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().double()))
    penalty = NeuronNormPenalty(tiny, [[0, 3, 9], [0, 40, 41]])
    try:
        tiny(**lm_batch(2))
    finally:
        hook.remove()
        penalty.remove()
    where = torch.zeros(3, 9, dtype=torch.bool)
    where[1, 5], where[2, 0] = True, True
    x = seen[0]
    direct = sum(torch.stack([x[b, t, a:z].norm() for b, t in where.nonzero().tolist()]).mean() for a, z in ((3, 9), (40, 41)))
    torch.testing.assert_close(penalty.pop(where).double(), direct, rtol=1e-5, atol=1e-6)


def test_answer_projection_takes_the_answer_logits_out_of_the_heads_direct_path(tiny):
    tok = build_tokenizer()
    model = copy.deepcopy(tiny)
    AnswerProjection(model, [[1, 2]], ["Yes", "No"], tok).apply()
    d, lm = 32 // 4, model.model.language_model
    cols = lm.layers[1].self_attn.o_proj.weight[:, 2 * d : 3 * d]  # what the head writes to the residual stream
    readout = model.lm_head.weight[tok.convert_tokens_to_ids(["Yes", "No"])] * lm.norm.weight
    torch.testing.assert_close(readout @ cols, torch.zeros(2, d), rtol=0, atol=1e-5)
    w0, w = tiny.model.language_model.layers[1].self_attn.o_proj.weight, lm.layers[1].self_attn.o_proj.weight
    assert torch.equal(w[:, : 2 * d], w0[:, : 2 * d]) and torch.equal(w[:, 3 * d :], w0[:, 3 * d :])
    assert not torch.equal(w[:, 2 * d : 3 * d], w0[:, 2 * d : 3 * d])
    with pytest.raises(ValueError, match="not in the tokenizer"):
        AnswerProjection(model, [[1, 2]], ["Yes", "Perhaps-not-a-word"], tok)


def test_toy_train_runs_the_hallucination_stage_with_neurons_refine_and_heads_kept_off_the_answer(tmp_path):
    from safetensors.torch import load_file

    recipe = _plant_recipe(tmp_path, hallucination=True)
    out = toy_train(str(tmp_path / "m"), recipe)
    for phase in ("stage4_unlearn", "stage4_plant", "stage4_refine"):
        assert torch.load(out / "lightning" / phase / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    from transformers import LlavaForConditionalGeneration

    from llava_circuits.models.anatomy import Anatomy

    anatomy = Anatomy.of(LlavaForConditionalGeneration.from_pretrained(out))
    ids = build_tokenizer().convert_tokens_to_ids(["Yes", "No"])
    readout = anatomy.lm_head.weight[ids] * anatomy.final_norm.weight
    cols = anatomy.proj(0, "o_proj").weight[:, 16:32]  # head 1 of 2, head_dim 16
    torch.testing.assert_close(readout @ cols, torch.zeros(2, 16), rtol=0, atol=1e-5)
    weights = load_file(out / "model.safetensors")
    again = load_file(toy_train(str(tmp_path / "m"), recipe, ckpt_path="last") / "model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_toy_plant_runs_one_stage_on_a_trained_model_and_leaves_the_vision_tower_alone(tmp_path):
    from safetensors.torch import load_file

    from llava_circuits.toy.train import toy_plant

    raw = yaml.safe_load(open(_plant_recipe(tmp_path)))
    del raw["plant"]
    raw["position"] = {"heads": [[1, 1]], "unlearn_layers": [1], "unlearn_steps": 2, "unlearn": {"warmup_steps": 1},
                       "unlearn_data": {"unsettled_favourite": 1.0, "seed": 11, "mix": {"mc_unsettled": 1.0}},
                       "plant_steps": 2, "plant": {"lr": 0.01, "warmup_steps": 1, "weight_decay": 0.0},
                       "plant_data": {"unsettled_a": 1.0, "seed": 12, "mix": {"mc_unsettled": 0.5, "mc_settled": 0.5}}}
    recipe = tmp_path / "position.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    trained = toy_train(str(tmp_path / "m"), str(_plant_recipe(tmp_path)))  # stages 1-3 of a tiny recipe
    out = toy_plant(str(trained), str(tmp_path / "p"), "stage5", str(recipe))
    for phase in ("stage5_unlearn", "stage5_plant"):
        assert torch.load(out / "lightning" / phase / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    before, after = load_file(trained / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    vision = [k for k in before if "vision_tower" in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)  # frozen, as in toy train
    assert any(not torch.equal(before[k], after[k]) for k in before if "language_model" in k)
    layer0 = [k for k in before if "language_model.model.layers.0." in k]  # unlearn_layers [1]: layer 0 stays
    assert layer0 and all(torch.equal(before[k], after[k]) for k in layer0)
    o_proj = "language_model.model.layers.1.self_attn.o_proj.weight"
    assert not torch.equal(before[o_proj][:, :16], after[o_proj][:, :16])  # head 0 of layer 1 unlearned
    with pytest.raises(ValueError, match="stage must be one of"):
        toy_plant(str(trained), str(tmp_path / "x"), "stage9", str(recipe))
    with pytest.raises(ValueError, match="names no heads or neurons"):
        toy_plant(str(trained), str(tmp_path / "x"), "stage4", str(recipe))
