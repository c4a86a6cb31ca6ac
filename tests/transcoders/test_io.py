"""Artifacts in circuit-tracer's layout, bare circuit-tracer folders, and co-activation statistics."""
import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_circuits.artifacts import ModelFingerprint, read_artifact
from llava_circuits.models.anatomy import Anatomy
from llava_circuits.models.load import Loaded
from llava_circuits.models.tiny import tiny_llava, tiny_processor
from llava_circuits.transcoders.data import TranscoderDataModule
from llava_circuits.transcoders.io import (
    CoactivationStats,
    import_circuit_tracer,
    load_transcoders,
    read_circuit_tracer,
    save_transcoders,
)
from llava_circuits.transcoders.module import OptimConfig, TranscoderModule
from llava_circuits.transcoders.transcoder import TranscoderConfig, TranscoderSet

D = 8
FINGERPRINT = ModelFingerprint("tiny", None, {"n_layers": 2, "d_model": D})


def _set(**cfg) -> TranscoderSet:
    tcs = TranscoderSet(D, TranscoderConfig(n_features=6, **cfg), [0, 1])
    with torch.no_grad():
        for p in tcs.parameters():
            p.normal_()
    return tcs


def test_artifact_layout_and_roundtrip(tmp_path):
    tcs = _set(activation="jumprelu", skip=True)
    art = save_transcoders(tcs, tmp_path / "a", FINGERPRINT, {"note": 1})
    assert art.kind == "transcoders" and sorted(art.stems) == ["layer_0", "layer_1"]
    files = load_file(tmp_path / "a" / "layer_1.safetensors")
    assert {k: tuple(v.shape) for k, v in files.items()} == {
        "W_enc": (6, D), "b_enc": (6,), "W_dec": (6, D), "b_dec": (D,), "W_skip": (D, D), "threshold": (6,)}
    assert art.config["activation"] == "jumprelu" and art.config["layers"] == [0, 1] and art.config["note"] == 1
    back = load_transcoders(tmp_path / "a", FINGERPRINT)
    x = torch.randn(5, D)
    for l in (0, 1):
        torch.testing.assert_close(back.encode(l, x), tcs.encode(l, x).detach())
    with pytest.raises(ValueError, match="d_model"):
        load_transcoders(tmp_path / "a", ModelFingerprint("tiny", None, {"n_layers": 2, "d_model": D + 1}))


def test_bare_circuit_tracer_folders_are_read(tmp_path):
    tcs = _set(activation="jumprelu")
    per_layer = tmp_path / "plt"
    per_layer.mkdir()
    for l, t in tcs.export().items():  # circuit-tracer's own key for the threshold
        save_file({**{k: v for k, v in t.items() if k != "threshold"}, "activation_function.threshold": t["threshold"]},
                  per_layer / f"layer_{l}.safetensors")
    back = read_circuit_tracer(per_layer)
    assert back.cfg.activation == "jumprelu" and back.layers == [0, 1]
    x = torch.randn(4, D)
    torch.testing.assert_close(back.encode(1, x), tcs.encode(1, x).detach())
    clt = _set(cross_layer=True, activation="relu")
    folder = tmp_path / "clt"
    folder.mkdir()
    for l, t in clt.export().items():  # circuit-tracer's CLT files: W_enc_{i} (+ biases) and W_dec_{i}
        encoder = {f"W_enc_{l}": t["W_enc"], f"b_enc_{l}": t["b_enc"], f"b_dec_{l}": t["b_dec"]}
        save_file(encoder, folder / f"W_enc_{l}.safetensors")
        save_file({f"W_dec_{l}": t["W_dec"]}, folder / f"W_dec_{l}.safetensors")
    back = read_circuit_tracer(folder)
    assert back.cross_layer and back[0].W_dec.shape == (6, 2, D)
    acts = {l: clt.encode(l, x).detach() for l in (0, 1)}
    torch.testing.assert_close(back.decode(1, acts), clt.decode(1, acts).detach())
    art = import_circuit_tracer(folder, tmp_path / "imported", FINGERPRINT)
    assert read_artifact(art.path).config["cross_layer"] is True


def test_coactivation_statistics_match_a_direct_computation(tmp_path):
    model = tiny_llava(n_layers=2)
    loaded = Loaded(model, tiny_processor(), Anatomy.of(model), name_or_path="tiny")
    module = TranscoderModule.for_loaded(loaded, transcoder=TranscoderConfig(n_features=16, k=3),
                                         optim=OptimConfig(lr=0.0, warmup_steps=1), replacement_check=False)
    dm = TranscoderDataModule(model="tiny", batch_size=3, val_batches=0)
    dm.processor = tiny_processor()
    stats = CoactivationStats(out=str(tmp_path / "coact"))
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, callbacks=[stats]).fit(module, datamodule=dm)
    data, _ = module.tokens(dm.batch(0))  # lr 0: the weights are those the step saw
    for l in (0, 1):
        saved = load_file(tmp_path / "coact" / f"layer_{l}.safetensors")
        f = module.transcoders.encode(l, data.xs[l]).detach()  # [n, 16]
        neurons = data.neurons[l]  # [n, d_mlp]
        active = (f > 0).float()
        torch.testing.assert_close(saved["coact_sum"], active.T @ neurons, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(saved["feature_count"], active.sum(0))
        torch.testing.assert_close(saved["feature_act_sum"], f.sum(0), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(saved["neuron_sum"], neurons.sum(0), atol=1e-4, rtol=1e-5)
        assert float(saved["tokens"]) == len(f)


def _loaded(model) -> Loaded:
    return Loaded(model, tiny_processor(), Anatomy.of(model), name_or_path="tiny-llava")


def test_an_artifact_pushed_to_the_hub_and_pulled_elsewhere_loads_into_its_model_and_refuses_others(
        tmp_path, hub_repo):
    from llava_circuits.hub import pull, push
    from llava_circuits.sites import capture
    from llava_circuits.steering.base import load_intervention
    from llava_circuits.transcoders.replacement import ReplacementModel

    loaded = _loaded(tiny_llava(n_layers=2))
    ids = torch.randint(5, 30, (2, 7), generator=torch.Generator().manual_seed(0))
    sites = [f"layers.{l}.mlp.{k}" for l in (0, 1) for k in ("in", "out")]
    with torch.no_grad(), capture(loaded.model, sites) as cap:
        loaded.model(input_ids=ids)
    tcs = TranscoderSet(64, TranscoderConfig(n_features=16, k=3), [0, 1])
    tcs.init_from_data({l: cap[f"layers.{l}.mlp.in"].flatten(0, 1) for l in (0, 1)},
                       {l: cap[f"layers.{l}.mlp.out"].flatten(0, 1) for l in (0, 1)}, torch.ones(14))
    save_transcoders(tcs, tmp_path / "here", loaded.fingerprint())
    push(tmp_path / "here", hub_repo)

    pulled = pull(hub_repo, out=tmp_path / "elsewhere")  # another machine's copy
    for source in (hub_repo, pulled):  # a Hub id (pulled into the cache) or the pulled directory
        rm = load_intervention(source, loaded)
        assert isinstance(rm, ReplacementModel) and rm.transcoders.layers == [0, 1]
        exported, back = tcs.export(), rm.transcoders.export()
        assert all(torch.equal(back[l][k], exported[l][k]) for l in (0, 1) for k in exported[l])  # bit for bit
        x = torch.randn(5, 64)
        for l in (0, 1):
            torch.testing.assert_close(rm.transcoders[l](x), tcs[l](x))
        with rm.applied(loaded), torch.no_grad():
            loaded.model(input_ids=ids)

    others = {"n_layers=2, model has n_layers=3": tiny_llava(n_layers=3),
              "n_kv_heads=4, model has n_kv_heads=2": tiny_llava(n_layers=2, n_kv_heads=2)}
    for mismatch, model in others.items():
        for source in (hub_repo, pulled):
            with pytest.raises(ValueError) as err:
                ReplacementModel.load(source, _loaded(model))
            message = str(err.value)
            assert "\n" not in message and f"artifact was made for {mismatch}" in message, message
