import copy

import pytest
import torch

from llava_circuits.attention.extract import (AttentionRecord, encode, extract_attention, prompt_attention,
                                              parse_indices)

PROMPT = "is there a cat in the image ?"


@pytest.fixture(scope="module")
def eager(llava):
    model = copy.deepcopy(llava)
    model.set_attn_implementation("eager")
    return model


def full_eager_attention(eager, inputs: dict, seq: torch.Tensor) -> tuple:
    """Every layer's attention [1, heads, T, T] over `seq` in one no-cache forward."""
    with torch.no_grad():
        out = eager(input_ids=seq, attention_mask=torch.ones_like(seq), pixel_values=inputs["pixel_values"],
                    output_attentions=True, use_cache=False)
    return out.attentions


def test_steps_inside_generate_equal_full_eager_attention(tiny, eager, noise_images):
    record = extract_attention(tiny, noise_images[0], PROMPT, layers=[0, 2], heads="all", steps="all", max_new_tokens=5)
    inputs = encode(tiny, noise_images[0], PROMPT)
    with torch.no_grad():
        seq = tiny.model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)
    length = inputs["input_ids"].shape[1]
    generated = seq[0, length:].tolist()
    assert record.steps == list(range(len(generated))) and len(generated) >= 2
    assert record.tokens == tiny.tokenizer.convert_ids_to_tokens(generated)
    assert record.query_tokens[1:] == record.tokens[:-1]  # step t reads the token step t-1 produced
    reference = full_eager_attention(eager, inputs, seq[:, :-1])  # step t's query sits at length - 1 + t
    image_cols = tiny.anatomy.image_mask(seq[0, :-1])
    assert record.probs.shape == (len(generated), 2, tiny.anatomy.n_heads, 16)
    for li, layer in enumerate([0, 2]):
        for s in record.steps:
            expected = reference[layer][0, :, length - 1 + s][:, image_cols]  # [heads, n_image]
            torch.testing.assert_close(record.probs[s, li], expected, rtol=1e-5, atol=1e-6)


def test_asked_steps_and_heads_are_the_rows_of_the_full_record(tiny, noise_images):
    full = extract_attention(tiny, noise_images[1], PROMPT, layers="all", heads="all", steps="all", max_new_tokens=4)
    part = extract_attention(tiny, noise_images[1], PROMPT, layers="1", heads="1,3", steps="1-2,40", max_new_tokens=4)
    assert part.steps == [1, 2]  # step 40 lies past the end of generation
    assert part.layers == [1] and part.heads == [1, 3]
    assert part.tokens == full.tokens[1:3] and part.positions == full.positions[1:3]
    torch.testing.assert_close(part.probs, full.probs[1:3, 1:2][:, :, [1, 3]])
    assert all(tiny.anatomy.attn(i).config._attn_implementation == "sdpa" for i in range(3))


def test_prompt_attention_of_a_left_padded_batch_equals_eager(tiny, eager, noise_images):
    prompts = [PROMPT, "the", "what colour is the ball ?"]
    got = prompt_attention(tiny, list(zip(noise_images, prompts)), batch_size=2)  # batches of 2 and 1
    assert got.shape == (3, 3, 4, 16)
    for b, (image, prompt) in enumerate(zip(noise_images, prompts)):
        inputs = encode(tiny, image, prompt)
        with torch.no_grad():
            reference = eager(**inputs, output_attentions=True).attentions
        cols = tiny.anatomy.image_mask(inputs["input_ids"][0])
        for layer in range(3):
            torch.testing.assert_close(got[b, layer], reference[layer][0, :, -1][:, cols], rtol=1e-5, atol=1e-6)


def test_a_word_query_reads_the_words_last_column_in_a_left_padded_batch(tiny, eager, noise_images):
    prompts = [PROMPT, "the ball and the cat", "what colour is the ball ?"]
    words = ["cat", "the", "ball"]
    got = prompt_attention(tiny, list(zip(noise_images, prompts)), batch_size=3, words=words)
    for b, (image, prompt) in enumerate(zip(noise_images, prompts)):
        inputs = encode(tiny, image, prompt)
        ids = inputs["input_ids"][0].tolist()
        col = max(i for i, t in enumerate(ids) if t == tiny.tokenizer.encode(words[b], add_special_tokens=False)[-1])
        assert col < len(ids) - 1  # not the last token: the query really moved
        with torch.no_grad():
            reference = eager(**inputs, output_attentions=True).attentions
        cols = tiny.anatomy.image_mask(inputs["input_ids"][0])
        for layer in range(3):
            torch.testing.assert_close(got[b, layer], reference[layer][0, :, col][:, cols], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\['dog'\] do not occur"):
        prompt_attention(tiny, [(noise_images[0], PROMPT)], words=["dog"])


def test_record_round_trips_through_safetensors(tiny, noise_images, tmp_path):
    record = extract_attention(tiny, noise_images[2], PROMPT, layers=[2], heads=[0, 1], max_new_tokens=2)
    loaded = AttentionRecord.load(record.save(tmp_path))
    assert torch.equal(loaded.probs, record.probs)
    assert loaded.meta() == record.meta() and loaded.grid == (4, 4)
    first = {"step": 0, "position": record.positions[0], "query_token": ":", "token": record.tokens[0]}
    assert loaded.step_table()[0] == first  # the template ends with "ASSISTANT:"


@pytest.mark.parametrize("spec, expected", [
    ("all", [0, 1, 2, 3, 4]), (None, [0, 1, 2, 3, 4]), (3, [3]), ("3", [3]), ("0,2, 4", [0, 2, 4]),
    ("1-3", [1, 2, 3]), ("0-1,4", [0, 1, 4]), ([4, 1, 1], [1, 4]), (range(2), [0, 1]),
])
def test_parse_indices(spec, expected):
    assert parse_indices(spec, 5) == expected


def test_parse_indices_errors_name_the_problem():
    with pytest.raises(ValueError, match="heads: \\[7\\] out of range, there are 5"):
        parse_indices("7", 5, "heads")
    with pytest.raises(ValueError, match="cannot read 'x'"):
        parse_indices("1,x", 5, "steps")
    assert parse_indices("all", None) is None
