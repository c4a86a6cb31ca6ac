"""features steer: the same change through the replacement model and directly in the original model; save/load; eval."""
import json

import pytest
import torch

from llava_circuits.evaluation.run import evaluate_loaded
from llava_circuits.features.config import SteerConfig
from llava_circuits.features.steer import FeatureSteering
from llava_circuits.sites import capture
from llava_circuits.steering.base import load_intervention
from llava_circuits.transcoders.replacement import FeatureEdit, ReplacementModel

from .conftest import fit_transcoders

FEATURES = [(0, 3), (1, 5), (1, 7), (2, 1)]


def logits(tiny, inputs, intervention=None):
    """[real positions, vocab]: padding is left out (steering skips it, FeatureEdit does not)."""
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        if intervention is None:
            return tiny.model(**inputs).logits[real]
        with intervention.applied(tiny):
            return tiny.model(**inputs).logits[real]


def edited_replacement(tcs, error_term, scale):
    rm = ReplacementModel(tcs, error_term=error_term, record=False)
    for layer in sorted({l for l, _ in FEATURES}):
        rm.edit(layer, FeatureEdit(feature=[f for l, f in FEATURES if l == layer], scale=scale))
    return rm


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_direct_steering_equals_the_replacement_model_with_error_terms(tiny, llava_inputs, activation):
    tcs = fit_transcoders(tiny, llava_inputs, activation=activation)
    steering = FeatureSteering.build(tcs, FEATURES, SteerConfig(op="scale", value=3.0))
    if activation != "topk":  # elementwise activations keep only the steered rows
        assert all(steering.transcoders[l].n_features == 2 for l in steering.transcoders.layers)
    base = logits(tiny, llava_inputs)
    steered = logits(tiny, llava_inputs, steering)
    reference = logits(tiny, llava_inputs, edited_replacement(tcs, error_term=True, scale=3.0))
    torch.testing.assert_close(steered, reference, atol=1e-4, rtol=1e-4)
    assert (steered - base).abs().max() > 1e-3


def test_direct_steering_adds_the_activation_change_times_the_decoder_direction(tiny, tiny_transcoders, llava_inputs):
    """At layer 0's MLP output the steered model differs from the original by (a' - a) W_dec, computed densely."""
    tcs = tiny_transcoders
    steering = FeatureSteering.build(tcs, [(0, 3)], SteerConfig(op="add", value=0.7, where="fires"))
    sites = ["layers.0.mlp.in", "layers.0.mlp.out"]
    with torch.no_grad(), capture(tiny.model, sites) as plain:
        tiny.model(**llava_inputs)
    with torch.no_grad(), steering.applied(tiny), capture(tiny.model, ["layers.0.mlp.out"]) as steered:
        tiny.model(**llava_inputs)
    x = plain["layers.0.mlp.in"].double()
    t = tcs[0]
    a = torch.relu((x / t.x_scale.double()) @ t.W_enc.double()[3] + t.b_enc.double()[3])  # [batch, pos]
    real = llava_inputs["attention_mask"].bool()
    change = torch.where((a > 0) & real, 0.7, 0.0)
    expected = plain["layers.0.mlp.out"].double() + change[..., None] * (t.W_dec.double()[3] * t.y_scale.double())
    torch.testing.assert_close(steered["layers.0.mlp.out"].double(), expected, atol=1e-4, rtol=1e-4)
    assert bool((change != 0).any()) and bool((change == 0).any())


def test_transcoders_in_the_loop_edit_the_replacement_model(tiny, tiny_transcoders, llava_inputs, tmp_path):
    steering = FeatureSteering.build(tiny_transcoders, FEATURES, SteerConfig(op="scale", value=0.0, transcoders_in_loop=True))
    reference = logits(tiny, llava_inputs, edited_replacement(tiny_transcoders, error_term=False, scale=0.0))
    torch.testing.assert_close(logits(tiny, llava_inputs, steering), reference, atol=1e-5, rtol=1e-5)


def test_steering_only_generated_tokens_leaves_the_prompt_alone(tiny, tiny_transcoders, llava_inputs):
    steering = FeatureSteering.build(tiny_transcoders, FEATURES, SteerConfig(op="clamp", value=5.0, where="all",
                                                                             tags=["generated"]))
    torch.testing.assert_close(logits(tiny, llava_inputs, steering), logits(tiny, llava_inputs))  # prefill only
    kwargs = dict(**llava_inputs, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        plain = tiny.model.generate(**kwargs).scores
        with steering.applied(tiny):
            steered = tiny.model.generate(**kwargs).scores
    torch.testing.assert_close(steered[0], plain[0])  # the first token comes from the prompt's last position
    assert any(not torch.allclose(a, b) for a, b in zip(steered[1:], plain[1:]))  # generated tokens are steered


def test_steering_prompt_last_changes_only_each_rows_last_prompt_position_and_no_decode_step(tiny, tiny_transcoders,
                                                                                            llava_inputs):
    steering = FeatureSteering.build(tiny_transcoders, FEATURES, SteerConfig(op="clamp", value=5.0, where="all",
                                                                             tags=["prompt_last"]))
    with torch.no_grad():
        plain = tiny.model(**llava_inputs).logits
        with steering.applied(tiny):
            steered = tiny.model(**llava_inputs).logits
    changed = (steered - plain).abs().amax(-1) > 1e-6  # [batch, pos]; causal: a position sees itself and earlier ones
    assert changed[:, -1].all() and not changed[:, :-1].any()  # left padding: every row's prompt ends at the last column
    kwargs = dict(**llava_inputs, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=tiny.tokenizer.pad_token_id)
    with torch.no_grad(), steering.applied(tiny):
        out = tiny.model.generate(**kwargs)
    # reference: a no-cache forward of the generated sequence with the edit at the prompt's last column only
    n = llava_inputs["input_ids"].shape[1]
    reference = ReplacementModel(tiny_transcoders, error_term=True, record=False)
    for layer in sorted({l for l, _ in FEATURES}):
        reference.edit(layer, FeatureEdit(feature=[f for l, f in FEATURES if l == layer], value=5.0, positions=[n - 1]))
    seq = out.sequences[:, :-1]
    mask = torch.cat([llava_inputs["attention_mask"], torch.ones(3, seq.shape[1] - n, dtype=torch.long)], 1)
    with torch.no_grad(), reference.applied(tiny):
        full = tiny.model(input_ids=seq, attention_mask=mask, pixel_values=llava_inputs["pixel_values"]).logits
    for step, scores in enumerate(out.scores):  # the prefill's last position, then each decode step, unsteered
        torch.testing.assert_close(scores, full[:, n - 1 + step], atol=1e-4, rtol=1e-4)


def test_saved_steering_loads_as_an_intervention_and_eval_runs_it(tiny, tiny_transcoders, llava_inputs, pope_dir,
                                                                  tmp_path):
    steering = FeatureSteering.build(tiny_transcoders, FEATURES, SteerConfig(op="clamp", value=4.0, where="all"),
                                     tiny.fingerprint(), "transcoders-dir")
    path = steering.save(tmp_path / "steer")
    meta = json.loads((path / "artifact.json").read_text())
    assert meta["kind"] == "feature-analysis" and meta["config"]["steer"]["op"] == "clamp"
    back = load_intervention(path, tiny)
    assert isinstance(back, FeatureSteering) and back.features == FEATURES
    torch.testing.assert_close(logits(tiny, llava_inputs, back), logits(tiny, llava_inputs, steering))
    data = pope_dir / "coco_pope_random.json"
    plain = evaluate_loaded(tiny, "pope", data, tmp_path / "plain", pope_dir / "images", progress=False, max_new_tokens=3)
    steered = evaluate_loaded(tiny, "pope", data, tmp_path / "steered", pope_dir / "images", [back], progress=False,
                              max_new_tokens=3)
    assert set(steered) == set(plain)
    answers = lambda d: [json.loads(l)["response"] for l in (tmp_path / d / "responses.jsonl").read_text().splitlines()]
    assert answers("plain") != answers("steered")
    assert back.replacement is None  # detached after the run
    torch.testing.assert_close(logits(tiny, llava_inputs), logits(tiny, llava_inputs))
