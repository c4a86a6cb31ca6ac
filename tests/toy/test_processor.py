import random

import numpy as np
import torch
from transformers import AutoProcessor, AutoTokenizer, LlavaProcessor

from llava_circuits.toy import tasks
from llava_circuits.toy.model import ToyModelConfig, build_model
from llava_circuits.toy.processor import format_prompt
from llava_circuits.toy.scenes import render, sample_scene, scene_from_seed
from llava_circuits.toy.train import ToyDataConfig, training_example


def test_tokenizer_words_and_special_tokens(toy_processor):
    tok = toy_processor.tokenizer
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids("<image>") == 4
    ids = tok("Is there a ball in the image?\n(A) red").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "Is", "there", "a", "ball", "in", "the", "image", "?", "(", "A", ")", "red"]
    assert tok("<image><image>", add_special_tokens=False).input_ids == [4, 4]


def test_every_task_word_is_in_the_vocabulary(toy_processor):
    tok = toy_processor.tokenizer
    rng = random.Random(3)
    cfg = ToyDataConfig()
    for kind in cfg.mix:
        for _ in range(50):
            ex = training_example(rng, cfg, kind)
            ids = tok(ex["prompt"] + " " + ex["answer"]).input_ids
            assert tok.unk_token_id not in ids, (kind, ex["prompt"], ex["answer"])


def test_tokenizer_and_processor_round_trip(toy_processor, tmp_path):
    toy_processor.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = tasks.mc_text("What colour is the kite?", ["red", "blue", "green", "yellow"])
    assert tok(text).input_ids == toy_processor.tokenizer(text).input_ids
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, LlavaProcessor)
    image = render(scene_from_seed(5))
    a = toy_processor(text=format_prompt("Is there a cup in the image?"), images=image, return_tensors="pt")
    b = loaded(text=format_prompt("Is there a cup in the image?"), images=image, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_processor_expands_image_into_one_token_per_cell(toy_processor):
    image = render(scene_from_seed(7))
    enc = toy_processor(text=format_prompt("Describe this image."), images=image, return_tensors="pt")
    assert (enc["input_ids"] == 4).sum() == 16  # 4x4 patches; CLS dropped by the "default" strategy
    assert enc["pixel_values"].shape == (1, 3, 64, 64)
    mean = torch.tensor(toy_processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(toy_processor.image_processor.image_std)[:, None, None]
    raw = torch.tensor(np.asarray(image)).permute(2, 0, 1).float() / 255
    assert torch.allclose(enc["pixel_values"][0], (raw - mean) / std, atol=1e-5)  # no resampling of 64x64 scenes


def test_chat_template_renders_the_llava_prompt(toy_processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a cup in the image?"}]}]
    rendered = toy_processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == format_prompt("Is there a cup in the image?")


def test_model_forward_and_image_token_count(toy_processor):
    model = build_model(toy_processor.tokenizer, ToyModelConfig(text_layers=1, vision_layers=2, text_mlp=64, vision_mlp=64))
    image = render(sample_scene(random.Random(0)))
    enc = toy_processor(text=[format_prompt("Is there a cup in the image?")], images=[image], return_tensors="pt")
    out = model(**enc)
    assert out.logits.shape == (1, enc["input_ids"].shape[1], len(toy_processor.tokenizer))
    assert model.config.image_token_id == 4 and model.config.vision_config.patch_size == 16
