import copy
import random
import re

import pytest
import torch
import yaml

from llava_circuits.toy import tasks
from llava_circuits.toy.model import ToyModelConfig, build_model
from llava_circuits.toy.plant import HeadNormPenalty, gate_heads, head_masks, reset_head_outputs, train_only_heads
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


def test_train_only_heads_changes_nothing_but_their_q_rows_kv_group_rows_and_o_columns(tiny):
    model = copy.deepcopy(tiny)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handles = train_only_heads(model, [[1, 3]])
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
    with gate_heads(tiny, [[0, 2]]):
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
    reset_head_outputs(a, [[0, 1]], 0.02, seed=5)
    reset_head_outputs(b, [[0, 1]], 0.02, seed=5)
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


def _plant_recipe(tmp_path, weight_decay: float = 0.0) -> str:
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
    path = tmp_path / f"plant{weight_decay}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_toy_train_runs_the_plant_stage_and_a_resume_retrains_nothing(tmp_path):
    from safetensors.torch import load_file

    cfg = load_config(_plant_recipe(tmp_path))
    assert cfg.plant.heads == [[1, 0]] and cfg.plant.plant.weight_decay == 0.0
    out = toy_train(str(tmp_path / "m"), _plant_recipe(tmp_path))
    for phase in ("stage3_unlearn", "stage3_plant", "stage3_settle"):
        assert torch.load(out / "lightning" / phase / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    first = load_file(out / "model.safetensors")
    again = load_file(toy_train(str(tmp_path / "m"), _plant_recipe(tmp_path), ckpt_path="last") / "model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(ValueError, match="weight_decay must be 0"):
        toy_train(str(tmp_path / "wd"), _plant_recipe(tmp_path, weight_decay=0.01))
