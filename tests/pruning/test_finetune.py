import json

import pytest
import torch

from llava_circuits.finetune import FinetuneConfig
from llava_circuits.models.load import load_model
from llava_circuits.pruning.config import RestoreConfig
from llava_circuits.pruning.finetune import (
    StepBatches,
    read_examples,
    restore,
    toy_examples,
    trainable,
)
from llava_circuits.pruning.prune import SoftPruning

WORDS = ["cat", "dog", "ball", "cup", "red", "blue", "green"]


def examples_file(folder, n: int = 24):
    path = folder / "restore.jsonl"
    lines = [json.dumps({"prompt": f"what colour is the {WORDS[i % 4]} ?", "answer": WORDS[4 + i % 3]}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def config(data, steps: int, **kw) -> RestoreConfig:
    optim = FinetuneConfig(lr=1e-2, warmup_steps=1, total_steps=4)
    return RestoreConfig(data=str(data), steps=steps, batch_size=4, ckpt_every=1, optim=optim, **kw)


def alpha(loaded, values):
    a = torch.zeros(loaded.anatomy.n_layers, loaded.anatomy.n_heads)
    for (layer, head), v in values.items():
        a[layer, head] = v
    return a


def test_read_examples_formats(tmp_path):
    rows = read_examples(examples_file(tmp_path, 3))
    assert rows[0] == {"prompt": "what colour is the cat ?", "answer": "red", "image": None}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: missing field 'answer'"):
        read_examples(tmp_path / "bad.jsonl")
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    instruct = [{"id": "a", "conversations": turns}]
    (tmp_path / "instruct.json").write_text(json.dumps(instruct))
    assert read_examples(tmp_path / "instruct.json")[0]["answer"] == "A cat."


def test_toy_restore_set_has_no_ambiguous_bbq_item():
    rows = toy_examples(40)
    bbq = [r for r in rows if "Zorbish" in r["prompt"]]
    assert len(bbq) == 20 and all(r["answer"] in "ABC" for r in bbq)
    assert not any(u in r["answer"] for r in bbq for u in ("Unknown", "determined"))


def test_batches_are_fixed_by_seed_and_step(llama):
    rows = toy_examples(50)
    a = StepBatches(llama, rows, 4, 10, 0, seed=1)
    b = StepBatches(llama, rows, 4, 5, 5, seed=1)  # a resumed run starting at step 5
    assert [x["prompt"] for x in a[7]] == [x["prompt"] for x in b[2]]


def test_gate_stays_frozen_and_is_baked_after_training(llama, tmp_path):
    pruning = SoftPruning(alpha(llama, {(1, 2): 1.0, (0, 0): 0.5}), "gate")
    before = {n: p.detach().clone() for n, p in llama.model.named_parameters()}
    record = restore(llama, pruning, config(examples_file(tmp_path), 3), tmp_path / "run")
    assert record["steps"] == 3 and record["mode"] == "gate" and record["pruning_baked"]
    o_proj = llama.anatomy.proj(1, "o_proj").weight
    d = llama.anatomy.head_dim
    assert torch.equal(o_proj[:, 2 * d : 3 * d], torch.zeros_like(o_proj[:, 2 * d : 3 * d]))
    assert any(not torch.equal(before[n], p) for n, p in llama.model.named_parameters())
    assert all(p.requires_grad for p in llama.model.parameters())  # flags restored
    assert not any(len(m._forward_pre_hooks) for m in llama.model.modules())  # the gate hooks are gone
    assert (tmp_path / "run" / "lightning" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny_llama_dir, tmp_path):
    data = examples_file(tmp_path)
    head = {(2, 1): 0.8}
    straight = load_model(tiny_llama_dir, dtype="float32")
    restore(straight, SoftPruning(alpha(straight, head)), config(data, 4), tmp_path / "straight")
    resumed = load_model(tiny_llama_dir, dtype="float32")
    restore(resumed, SoftPruning(alpha(resumed, head)), config(data, 2), tmp_path / "resumed")
    again = load_model(tiny_llama_dir, dtype="float32")
    record = restore(again, SoftPruning(alpha(again, head)), config(data, 4), tmp_path / "resumed")
    assert record["resumed_from"].endswith("last.ckpt") and record["steps"] == 4
    a, b = dict(straight.model.named_parameters()), dict(again.model.named_parameters())
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_language_model_only_leaves_the_vision_tower_alone(llava_loaded, tmp_path):
    vision = {n: p.detach().clone() for n, p in llava_loaded.model.named_parameters() if "language_model" not in n
              and "lm_head" not in n}
    restore(llava_loaded, SoftPruning(alpha(llava_loaded, {(0, 1): 0.5}), "qkv"), config(examples_file(tmp_path), 2),
            tmp_path / "run")
    assert vision and all(torch.equal(p, vision[n]) for n, p in llava_loaded.model.named_parameters() if n in vision)


def test_pruned_layers_trains_only_the_layers_that_hold_a_pruned_head(llama, tmp_path):
    before = {n: p.detach().clone() for n, p in llama.model.named_parameters()}
    restore(llama, SoftPruning(alpha(llama, {(1, 3): 0.5}), "gate"),
            config(examples_file(tmp_path), 2, trainable="pruned_layers"), tmp_path / "run")
    changed = {n for n, p in llama.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.layers.1.") for n in changed)


@pytest.mark.parametrize("which, trains", [
    ("mlp", lambda n: ".mlp." in n),
    ("attention", lambda n: ".self_attn." in n),
    ("pruned_layers", lambda n: n.startswith("model.layers.1.")),
    ("not_pruned_attention", lambda n: not n.startswith("model.layers.1.self_attn.")),
    ("language_model", lambda n: True),
])
def test_trainable_selects_the_parameters_that_train(llama, which, trains):
    pruning = SoftPruning(alpha(llama, {(1, 0): 0.5}))
    before = trainable(llama, which, pruning)
    assert all(before.values())
    assert {n for n, p in llama.model.named_parameters() if p.requires_grad} == \
        {n for n, _ in llama.model.named_parameters() if trains(n)}
    with pytest.raises(ValueError, match="trainable"):
        trainable(llama, "everything", pruning)
