"""ReplacementModel: exact with error terms, transcoder outputs without, recorded features, edits, save/load."""
import pytest
import torch

from llava_circuits.models.anatomy import Anatomy
from llava_circuits.models.load import Loaded
from llava_circuits.models.tiny import tiny_processor
from llava_circuits.sites import capture
from llava_circuits.steering.base import load_intervention
from llava_circuits.transcoders.replacement import FeatureEdit, ReplacementModel
from llava_circuits.transcoders.transcoder import TranscoderConfig, TranscoderSet


@pytest.fixture(scope="module")
def loaded(llava):
    return Loaded(llava, tiny_processor(), Anatomy.of(llava), name_or_path="tiny-llava")


def _transcoders(loaded, inputs, cross_layer=False, activation="topk"):
    """Transcoders for every layer, initialised from the batch's own activations."""
    a = loaded.anatomy
    layers = list(range(a.n_layers))
    sites = [f"layers.{l}.mlp.{k}" for l in layers for k in ("in", "out")]
    with torch.no_grad(), capture(loaded.model, sites) as cap:
        loaded.model(**inputs)
    xs = {l: cap[f"layers.{l}.mlp.in"].flatten(0, 1) for l in layers}
    ys = {l: cap[f"layers.{l}.mlp.out"].flatten(0, 1) for l in layers}
    cfg = TranscoderConfig(n_features=48, k=6, activation=activation, cross_layer=cross_layer)
    tcs = TranscoderSet(a.d_model, cfg, layers)
    tcs.init_from_data(xs, ys, torch.ones(len(xs[0])))
    with torch.no_grad():  # identical tokens seed identical features: break the ties
        for p in tcs.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return tcs, xs, ys


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("cross_layer", [False, True])
def test_error_terms_give_the_original_logits(loaded, llava_inputs, cross_layer):
    tcs, _, _ = _transcoders(loaded, llava_inputs, cross_layer)
    base = _logits(loaded.model, llava_inputs)
    rm = ReplacementModel(tcs, error_term=True)
    with rm.applied(loaded):
        out = _logits(loaded.model, llava_inputs)
    assert (out - base).abs().max() <= 1e-5
    without = ReplacementModel(tcs, error_term=False)
    with without.applied(loaded):
        assert (_logits(loaded.model, llava_inputs) - base).abs().max() > 1e-3  # the transcoders are not exact


def test_without_error_terms_each_mlp_output_is_the_transcoders_prediction(loaded, llava_inputs):
    tcs, _, _ = _transcoders(loaded, llava_inputs)
    rm = ReplacementModel(tcs)
    sites = [f"layers.{l}.mlp.{k}" for l in tcs.layers for k in ("in", "out")]
    with rm.applied(loaded), capture(loaded.model, sites) as cap, torch.no_grad():
        loaded.model(**llava_inputs)
    acts = rm.activations()
    b, s = llava_inputs["input_ids"].shape
    for l in tcs.layers:
        x = cap[f"layers.{l}.mlp.in"].flatten(0, 1)
        t = tcs[l]
        pre = (x / t.x_scale) @ t.W_enc.T + t.b_enc  # direct TopK formula
        keep = pre >= pre.topk(6, dim=-1).values[:, -1:]
        f = torch.where(keep, pre.relu(), 0.0)
        assert acts[l].shape == (b, s, 48)
        assert torch.allclose(acts[l].flatten(0, 1), f, atol=1e-4)
        expected = (f @ t.W_dec + t.b_dec) * t.y_scale
        assert torch.allclose(cap[f"layers.{l}.mlp.out"].flatten(0, 1), expected, atol=1e-4)


def test_feature_edit_with_error_term_changes_the_output_by_the_features_decoder_vector(loaded, llava_inputs):
    tcs, _, _ = _transcoders(loaded, llava_inputs, activation="relu")
    rm = ReplacementModel(tcs, error_term=True, record=True)
    site = "layers.1.mlp.out"
    with rm.applied(loaded), capture(loaded.model, [site]) as plain, torch.no_grad():
        loaded.model(**llava_inputs)
    f = rm.activations()[1].flatten(0, 1)  # [n, d_tc]
    feature = int(f.sum(0).argmax())
    rm.clear()
    rm.edit(1, FeatureEdit(feature=feature, scale=3.0))
    with rm.applied(loaded), capture(loaded.model, [site]) as edited, torch.no_grad():
        loaded.model(**llava_inputs)
    delta = (edited[site] - plain[site]).flatten(0, 1)
    t = tcs[1]
    expected = 2.0 * f[:, feature : feature + 1] * t.W_dec[feature] * t.y_scale
    assert torch.allclose(delta, expected, atol=1e-4)
    assert torch.allclose(rm.activations()[1].flatten(0, 1)[:, feature], 3.0 * f[:, feature], atol=1e-5)


def test_feature_edits_reach_generate_and_positions_select(loaded, llava_inputs):
    tcs, _, _ = _transcoders(loaded, llava_inputs, activation="relu")
    rm = ReplacementModel(tcs, error_term=True)
    kwargs = dict(**llava_inputs, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        base = loaded.model.generate(**kwargs)
        assert torch.equal(rm.generate(loaded, **kwargs), base)
        n_forwards = 4
        assert rm.activations()[0].shape[1] == llava_inputs["input_ids"].shape[1] + n_forwards - 1
        rm.clear()
        last = llava_inputs["input_ids"].shape[1] - 1
        rm.edit(0, FeatureEdit(feature=list(range(48)), value=50.0, positions=[last]))
        rm.generate(loaded, **kwargs)
    acts = rm.activations()[0]
    assert torch.all(acts[:, last] == 50.0)
    assert not torch.all(acts[:, last - 1] == 50.0)


def test_save_load_as_an_intervention(loaded, llava_inputs, tmp_path):
    tcs, _, _ = _transcoders(loaded, llava_inputs, cross_layer=True, activation="jumprelu")
    rm = ReplacementModel(tcs, config={"note": "test"}, fingerprint=None)
    with rm.applied(loaded):
        before = _logits(loaded.model, llava_inputs)
    path = rm.save(tmp_path / "tc")
    back = load_intervention(path, loaded)
    assert isinstance(back, ReplacementModel) and back.transcoders.cross_layer
    assert back.describe()["layers"] == [0, 1, 2] and back.config["note"] == "test"
    with back.applied(loaded):
        assert torch.allclose(_logits(loaded.model, llava_inputs), before, atol=1e-4)
    other = Loaded(loaded.model, loaded.processor, loaded.anatomy, name_or_path="x")
    other.anatomy = Anatomy.of(loaded.model)
    other.anatomy.d_model = 65
    with pytest.raises(ValueError, match="d_model"):
        ReplacementModel.load(path, other)


def test_hooks_are_removed_on_detach(loaded, llava_inputs):
    tcs, _, _ = _transcoders(loaded, llava_inputs)
    count = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.model.modules())  # noqa: E731
    before = count()
    rm = ReplacementModel(tcs, layers=[1])
    with rm.applied(loaded):
        assert count() > before
    assert count() == before
    with pytest.raises(ValueError, match="no transcoder"):
        ReplacementModel(tcs, layers=[7])


def test_loaded_artifact_records_nothing_and_attachments_start_afresh(loaded, llava_inputs, tmp_path):
    tcs, _, _ = _transcoders(loaded, llava_inputs, activation="relu")
    path = ReplacementModel(tcs, fingerprint=loaded.fingerprint()).save(tmp_path / "tc")
    with torch.no_grad():
        quiet = ReplacementModel.load(path, loaded)
        quiet.forward(loaded, **llava_inputs)
        assert quiet.activations() == {}  # as an eval intervention it holds no [batch, pos, d_tc] per batch
        rm = ReplacementModel.load(path, loaded, record=True)
        rm.forward(loaded, **llava_inputs)
        first = rm.activations()[0]
        rm.forward(loaded, **llava_inputs)
    assert torch.equal(rm.activations()[0], first)  # the second attachment's own, not both concatenated
