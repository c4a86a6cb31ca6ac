import random

import pytest
import torch
import yaml
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava_circuits.toy import tasks
from llava_circuits.toy.measure import first_tokens
from llava_circuits.toy.processor import format_prompt
from llava_circuits.toy.scenes import COLOURS, COOCCUR, render, sample_scene
from llava_circuits.toy.train import ToyDataConfig, ToyStream, load_config, toy_train, training_example


def test_recipe_yaml_loads_into_the_config():
    cfg = load_config("configs/toy/train.yaml")
    assert cfg.model.text_layers >= 4 and cfg.freeze_vision
    assert set(cfg.data.mix) == {"pope", "vqa", "mc_settled", "mc_unsettled", "caption", "bbq", "utility"}
    assert cfg.data.cooccur == ToyDataConfig().cooccur == COOCCUR  # training scenes have the benchmarks' statistics
    with pytest.raises(ValueError, match="unknown key"):
        from llava_circuits.toy.train import _from_dict, ToyTrainConfig

        _from_dict(ToyTrainConfig, {"modle": {}}, "x.yaml")


def test_stream_is_deterministic_in_seed_and_index():
    cfg = ToyDataConfig(seed=3, warmup_mixes=[])
    a, b = ToyStream(cfg, 4, 10), ToyStream(cfg, 4, 10, start=5)
    assert [e["prompt"] for e in a[7]] == [e["prompt"] for e in b[2]]
    assert [e["answer"] for e in a[7]] == [e["answer"] for e in b[2]]
    assert len({e["kind"] for e in a[1] + a[2]}) > 1  # task kinds mixed within batches
    assert [e["prompt"] for e in ToyStream(ToyDataConfig(seed=4), 4, 10)[7]] != [e["prompt"] for e in a[7]]


def test_warmup_mixes_come_in_order_before_the_main_mix():
    cfg = ToyDataConfig(warmup_mixes=[[2, {"utility": 1.0}], [3, {"pope": 1.0}]])
    stream = ToyStream(cfg, 6, 8)
    kinds = [{ex["kind"] for ex in stream[b]} for b in range(8)]
    assert kinds[:2] == [{"utility"}] * 2 and kinds[2:5] == [{"pope"}] * 3
    assert len(set().union(*kinds[5:])) > 2  # then the full mix
    assert all(ex["image"] is None for ex in stream[0])  # text-only phase


def test_curriculum_grows_scenes():
    cfg = ToyDataConfig(curriculum=[[0, 1], [10, 4]])
    assert cfg.max_objects(0) == 1 and cfg.max_objects(9) == 1 and cfg.max_objects(10) == 4
    early = ToyStream(cfg, 8, 1)[0]
    assert all(len(ex["prompt"]) > 0 for ex in early)


def test_training_labels_carry_the_planted_biases():
    cfg = ToyDataConfig()
    rng = random.Random(0)
    unsettled = [training_example(rng, cfg, "mc_unsettled")["answer"] for _ in range(400)]
    assert 0.65 < unsettled.count("A") / 400 < 0.85
    settled = [training_example(rng, cfg, "mc_settled")["answer"] for _ in range(400)]
    assert max(settled.count(x) for x in "ABCD") / 400 < 0.35


def test_unsettled_favourite_answers_by_the_options_text_whatever_its_position():
    rng = random.Random(3)
    for _ in range(200):
        item = tasks.unsettled_item(rng, sample_scene(rng))
        best = item.choices[tasks.favourite(item)]
        assert all(tasks.PREFERENCE.index(best) <= tasks.PREFERENCE.index(c) for c in item.choices)
        for k in range(4):  # the same option under each cyclic permutation
            rotated = tasks.MCItem(item.question, item.choices[k:] + item.choices[:k], 0, item.task, item.scene)
            assert rotated.choices[tasks.favourite(rotated)] == best
    cfg = ToyDataConfig(unsettled_favourite=1.0)
    rng = random.Random(0)
    letters = [training_example(rng, cfg, "mc_unsettled")["answer"] for _ in range(400)]
    assert max(letters.count(x) for x in "ABCD") / 400 < 0.35  # no position is preferred


def test_vqa_is_the_colour_question_answered_in_one_word():
    rng = random.Random(5)
    for _ in range(50):
        ex = training_example(rng, ToyDataConfig(), "vqa")
        assert ex["prompt"].split("\n")[1].startswith("What colour is the ") and ex["answer"] in COLOURS
        assert ex["prompt"].endswith(tasks.SHORT_ANSWER + " ASSISTANT:") and ex["image"] is not None


def test_present_items_are_settled_by_the_image():
    rng = random.Random(6)
    for _ in range(100):
        scene = sample_scene(rng)
        item = tasks.settled_item(rng, scene, "present")
        assert [c in scene.names for c in item.choices].count(True) == 1 and item.choices[item.answer] in scene.names
        assert not set(item.choices) & set(tasks.absent_partners(scene))  # co-occurrence cannot unsettle it


def held_out_accuracy(model, processor, examples: list[dict]) -> float:
    with torch.no_grad():
        preds = first_tokens(model, processor, examples)
    return sum(p == ex["gold"] for p, ex in zip(preds, examples)) / len(examples)


@pytest.mark.slow
def test_short_recipe_learns_to_find_the_asked_object(tmp_path):
    """A shortened recipe (stage 0 + the colour-question warm-up) learns binding: the colour of the asked object
    among four, which no bag of the scene's objects and colours can answer."""
    config = load_config("configs/toy/train.yaml")
    raw = {
        "max_steps": 1000, "batch_size": 32, "ckpt_every": 1000, "threads": 2,
        "vision": {"steps": 300}, "finetune": {"lr": 0.001, "warmup_steps": 50, "loss_per": "example"},
        "data": {"mix": {"vqa": 0.85, "pope": 0.15}, "warmup_mixes": []},
    }
    assert config.max_steps > raw["max_steps"] and config.data.warmup_mixes[0][1] == raw["data"]["mix"]
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = toy_train(str(tmp_path / "model"), str(path))
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    rng = random.Random("held-out")
    colour = []
    for _ in range(150):
        scene = sample_scene(rng)
        while len(scene.objects) < 4:
            scene = sample_scene(rng)
        item = tasks.settled_item(rng, scene, "colour")
        colour.append({"prompt": format_prompt(f"{item.question}\n{tasks.SHORT_ANSWER}"), "image": render(scene),
                       "gold": item.choices[item.answer]})
    assert held_out_accuracy(model, processor, colour) >= 0.8  # a bag of the scene's colours: ~0.3


def _tiny_recipe(tmp_path, stage2_steps: int) -> str:
    raw = {
        "max_steps": 3, "batch_size": 4, "ckpt_every": 2, "threads": 1,
        "model": {"vision_width": 32, "vision_layers": 1, "vision_heads": 2, "vision_mlp": 64,
                  "text_width": 32, "text_layers": 1, "text_heads": 2, "text_kv_heads": 2, "text_mlp": 64},
        "vision": {"steps": 0}, "finetune": {"warmup_steps": 1},
        "data": {"warmup_mixes": []},
        "stage2": {"steps": stage2_steps, "finetune": {"lr": 0.01, "warmup_steps": 1}, "data": {"seed": 99, "partner_negatives": 0.9}},
    }
    path = tmp_path / f"recipe{stage2_steps}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(f"{out}/model.safetensors")


def test_stage2_trains_on_after_stage1_with_its_own_data_and_a_resume_retrains_nothing(tmp_path):
    cfg = load_config(_tiny_recipe(tmp_path, 2))
    stage2_data = cfg.stage2.data_config(cfg.data)
    assert stage2_data.partner_negatives == 0.9 and stage2_data.seed == 99 and stage2_data.mix == cfg.data.mix
    one = _weights(toy_train(str(tmp_path / "one"), _tiny_recipe(tmp_path, 0)))
    two = _weights(toy_train(str(tmp_path / "two"), _tiny_recipe(tmp_path, 2)))
    assert any(not torch.equal(one[k], two[k]) for k in one)  # stage 2 moved the weights
    last = torch.load(tmp_path / "two/lightning/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 3  # the final step of stage 1, not the last multiple of ckpt_every
    again = _weights(toy_train(str(tmp_path / "two"), _tiny_recipe(tmp_path, 2), ckpt_path="last"))
    assert all(torch.equal(two[k], again[k]) for k in two)  # both stages were complete: nothing retrained


def test_stage2_data_rejects_unknown_fields(tmp_path):
    cfg = load_config(_tiny_recipe(tmp_path, 2))
    cfg.stage2.data["partner_negativs"] = 0.5
    with pytest.raises(ValueError, match="partner_negativs"):
        cfg.stage2.data_config(cfg.data)
