"""TranscoderModule: one early-stopped forward feeds every layer, metrics, checkpoints, resume, DDP, sharding."""
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from llava_circuits.artifacts import read_artifact
from llava_circuits.models.anatomy import Anatomy
from llava_circuits.models.load import Loaded
from llava_circuits.models.tiny import save_tiny, tiny_llava, tiny_processor
from llava_circuits.sites import capture
from llava_circuits.transcoders.data import TranscoderDataModule
from llava_circuits.transcoders.io import transcoders_export, transcoders_from_checkpoint
from llava_circuits.transcoders.module import FVU, TranscoderModule, clip_grad_norms, transcoders_cli
from llava_circuits.transcoders.replacement import ReplacementModel
from llava_circuits.transcoders.transcoder import TranscoderConfig

ROOT = Path(__file__).resolve().parents[2]
SMALL = TranscoderConfig(n_features=32, k=4, dead_tokens=50, resample_every=3)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tiny_llava(n_layers=2), tmp_path_factory.mktemp("tiny") / "model")


def _trainer(steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def _data(model_dir, **kwargs) -> TranscoderDataModule:
    dm = TranscoderDataModule(model=str(model_dir), batch_size=4, val_batches=1, **kwargs)
    dm.processor = tiny_processor()
    return dm


def _fit(tiny_dir, steps=4, **kwargs):
    model = tiny_llava(n_layers=2)
    loaded = Loaded(model, tiny_processor(), Anatomy.of(model), name_or_path=str(tiny_dir))
    module = TranscoderModule.for_loaded(loaded, transcoder=SMALL, log_every=1, **kwargs)
    dm = _data(tiny_dir)
    trainer = _trainer(steps, limit_val_batches=1, val_check_interval=steps, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=dm)
    return module, dm, trainer


def test_one_forward_captures_every_layer_and_stops_after_the_last(tiny_dir):
    model = tiny_llava(n_layers=2)
    loaded = Loaded(model, tiny_processor(), Anatomy.of(model), name_or_path="tiny")
    module = TranscoderModule.for_loaded(loaded, layers=[0], transcoder=SMALL)
    module.layers = [0]  # what setup() chooses from layers=[0]
    dm = _data(tiny_dir)
    dm.setup()
    batch = dm.batch(0)
    calls = []
    handles = [loaded.anatomy.layer(1).register_forward_pre_hook(lambda *a: calls.append("layer1")),
               loaded.anatomy.lm_head.register_forward_pre_hook(lambda *a: calls.append("lm_head"))]
    data, logits = module.tokens(batch)
    for h in handles:
        h.remove()
    assert calls == [] and logits is None  # the forward ended after layer 0's MLP
    with capture(model, ["layers.0.mlp.in", "layers.0.mlp.out"]) as cap, torch.no_grad():
        model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    keep = batch["token_weight"].flatten() > 0
    assert not keep.all()  # BOS and padding are left out
    assert torch.equal(data.xs[0], cap["layers.0.mlp.in"].flatten(0, 1)[keep])
    assert torch.equal(data.ys[0], cap["layers.0.mlp.out"].flatten(0, 1)[keep])
    assert torch.equal(data.w, batch["token_weight"].flatten()[keep])


def test_fit_logs_per_layer_metrics_and_validation_runs_the_replacement_check(tiny_dir):
    module, _, trainer = _fit(tiny_dir)
    logged = trainer.callback_metrics
    for key in ("train/fvu/layer_0", "train/fvu/layer_1", "train/l0_fraction_max", "val/fvu_max", "val/dead_fraction_max",
                "val/kl", "val/agreement", "val/ce_recovered"):
        assert key in logged, key
    res = module.val_results
    assert math.isclose(res["l0_fraction_max"], 4 / 32, rel_tol=1e-6)  # topk: exactly k of 32 features fire
    assert 0 <= res["agreement"] <= 1 and res["kl"] >= 0
    gap = res["ce_zero"] - res["ce_orig"]
    assert math.isclose(res["ce_recovered"], (res["ce_zero"] - res["ce_replaced"]) / gap, rel_tol=1e-9)


def test_fvu_metric_matches_float64_over_batches():
    metric = FVU()
    gen = torch.Generator().manual_seed(0)
    ys, preds = [], []
    for _ in range(3):
        y = torch.randn(20, 6, generator=gen) + 2
        p = y + 0.3 * torch.randn(20, 6, generator=gen)
        mean = y.mean(0)
        metric.update((p - y).pow(2).sum(), (y - mean).pow(2).sum())
        ys.append(y.double()), preds.append(p.double())
    err = sum((p - y).pow(2).sum() for p, y in zip(preds, ys))
    var = sum((y - y.mean(0)).pow(2).sum() for y in ys)
    assert math.isclose(float(metric.compute()), float(err / var), rel_tol=1e-6)  # float32 inputs


def test_checkpoint_holds_transcoders_only_and_loads_with_weights_only(tiny_dir, tmp_path):
    module, dm, trainer = _fit(tiny_dir, steps=3)
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)
    assert state["state_dict"] and all(k.startswith("transcoders.") for k in state["state_dict"])
    assert state["TranscoderDataModule"]["next_batch"] == 3
    names = {f"{l}.{p}" for l in (0, 1) for p in ("W_enc", "b_enc", "W_dec", "b_dec")}
    assert set(state["optimizer_states"][0]["state"]) == names  # optimizer state by parameter name
    out = transcoders_export(str(path), str(tmp_path / "artifact"))
    art = read_artifact(out, expected_kind="transcoders")
    assert art.stems == ["layer_0", "layer_1"] and art.config["activation"] == "topk"
    assert art.tensors("layer_1")["W_enc"].shape == (32, 64)
    rm = ReplacementModel.load(out, module.loaded)
    torch.testing.assert_close(rm.transcoders.export()[0]["W_dec"], module.transcoders.export()[0]["W_dec"])


def _config(tmp_path, model_dir, steps=8, every=3) -> Path:
    text = f"""
    seed_everything: 0
    checkpoint_every: {every}
    trainer:
      accelerator: cpu
      devices: 1
      max_steps: {steps}
      logger: false
      enable_progress_bar: false
      enable_model_summary: false
      limit_val_batches: 0
    model:
      model: {model_dir}
      transcoder: {{n_features: 32, k: 4, dead_tokens: 50, resample_every: 3}}
      optim: {{lr: 0.003, warmup_steps: 2, total_steps: {steps}}}
      replacement_check: false
      log_every: 2
    data:
      source: toy
      batch_size: 4
      val_batches: 1
    """
    path = tmp_path / "tc.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _max_diff(a, b) -> float:
    ta, tb = transcoders_from_checkpoint(a)[0].export(), transcoders_from_checkpoint(b)[0].export()
    return max(float((ta[l][k] - tb[l][k]).abs().max()) for l in ta for k in ta[l])


@pytest.mark.slow
def test_stop_at_half_and_resume_with_ckpt_path_last_equals_an_uninterrupted_run(tiny_dir, tmp_path):
    cfg = _config(tmp_path, tiny_dir)
    transcoders_cli(["fit", "-c", str(cfg), "--trainer.default_root_dir", str(tmp_path / "full")])
    half = ["fit", "-c", str(cfg), "--trainer.default_root_dir", str(tmp_path / "half")]
    transcoders_cli(half + ["--trainer.max_steps", "4"])
    assert transcoders_from_checkpoint(tmp_path / "half")[2]["global_step"] == 4
    transcoders_cli(half + ["--ckpt_path", "last"])
    assert transcoders_from_checkpoint(tmp_path / "half")[2]["global_step"] == 8
    assert _max_diff(tmp_path / "full", tmp_path / "half") <= 1e-6


KILLER = """
import os, signal, lightning as L

class KillAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
"""


def _run(args: list[str], cwd: Path, env_extra: dict | None = None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(ROOT)]), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "llava_circuits.transcoders.module", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(tiny_dir, tmp_path):
    cfg = _config(tmp_path, tiny_dir)
    (tmp_path / "killer.py").write_text(KILLER)
    transcoders_cli(["fit", "-c", str(cfg), "--trainer.default_root_dir", str(tmp_path / "full")])
    step = random.Random(6).randint(4, 7)  # a seeded "random" step, between checkpoints or on one
    run = ["fit", "-c", str(cfg), "--trainer.default_root_dir", str(tmp_path / "killed")]
    proc = _run(run + ["--trainer.callbacks+=killer.KillAt", f"--trainer.callbacks.step={step}"], tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    saved = transcoders_from_checkpoint(tmp_path / "killed")[2]["global_step"]
    assert saved == (step - 1) // 3 * 3  # killed before that step's own checkpoint was written
    transcoders_cli(run + ["--ckpt_path", "last"])
    assert _max_diff(tmp_path / "full", tmp_path / "killed") <= 1e-6, f"killed at step {step}"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "layer_sharded"])
def test_two_process_runs_train_export_and_match_one_process(tiny_dir, tmp_path, strategy):
    cfg = _config(tmp_path, tiny_dir, steps=4, every=2)
    transcoders_cli(["fit", "-c", str(cfg), "--trainer.default_root_dir", str(tmp_path / "one")])
    proc = _run(["fit", "-c", str(cfg), "--trainer.default_root_dir", str(tmp_path / "two"),
                 "--trainer.devices", "2", "--trainer.strategy", strategy], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = transcoders_export(str(tmp_path / "two"), str(tmp_path / "artifact"))
    rm = ReplacementModel.load(out, _loaded(tiny_dir))
    assert rm.transcoders.layers == [0, 1]
    assert _max_diff(tmp_path / "one", tmp_path / "two") <= 1e-5  # the same global batches, the same steps


def _loaded(model_dir) -> Loaded:
    from llava_circuits.models.load import load_model

    return load_model(model_dir, dtype="float32")


def test_clip_grad_norms_clips_each_group_as_clip_grad_norm_does():
    gen = torch.Generator().manual_seed(0)
    groups = [[torch.nn.Parameter(torch.zeros(shape)) for shape in shapes] for shapes in ([(4, 3), (3,)], [(5,)], [(2, 2), (2,)])]
    for g, scale in zip(groups, (10.0, 0.01, 3.0)):  # above, below and near the limit
        for p in g:
            p.grad = torch.randn(p.shape, generator=gen) * scale
    groups[2][1].grad = None  # a parameter without a gradient is skipped, as clip_grad_norm_ skips it
    reference = [[torch.nn.Parameter(p.detach().clone()) for p in g] for g in groups]
    for g, r in zip(groups, reference):
        for p, q in zip(g, r):
            q.grad = None if p.grad is None else p.grad.clone()
        torch.nn.utils.clip_grad_norm_(r, 1.0)
    clip_grad_norms(groups, 1.0)
    for g, r in zip(groups, reference):
        for p, q in zip(g, r):
            assert (p.grad is None) == (q.grad is None)
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad)
    assert torch.stack([p.grad.norm() for p in groups[0]]).norm() == pytest.approx(1.0, rel=1e-5)  # clipped
