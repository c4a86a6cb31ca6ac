"""Transcoder artifacts (circuit-tracer's per-layer layout), checkpoint export, and co-activation statistics.

A `transcoders` artifact holds `layer_{i}.safetensors` per layer with `W_enc [d_tc, d_model]`,
`b_enc [d_tc]`, `W_dec [d_tc, d_model]` (cross-layer: `[d_tc, n_targets, d_model]`, targets = this
layer and every later layer of the set), `b_dec [d_model]`, optional `W_skip [d_model, d_model]`,
`threshold [d_tc]` (jumprelu) and `k` (topk). Features read `mlp.in` and write `mlp.out`:

    f = act(x @ W_enc.T + b_enc);   mlp.out ~ f @ W_dec + b_dec (+ x @ W_skip.T)

`artifact.json`'s config records `activation`, `k`, `cross_layer`, `layers` and the training settings.
`read_circuit_tracer` also reads a bare circuit-tracer folder (per-layer `layer_{i}.safetensors`, or a
CLT's `W_enc_{i}` / `W_dec_{i}` files); `import_circuit_tracer` wraps one as an artifact.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from llava_circuits.artifacts import Artifact, ModelFingerprint, check_compatible, read_artifact, write_artifact
from llava_circuits.transcoders.transcoder import TranscoderConfig, TranscoderSet

LAYER_FILE = re.compile(r"^layer_(\d+)$")


def artifact_config(transcoders: TranscoderSet, extra: dict | None = None) -> dict:
    """What artifact.json records about a transcoder set."""
    cfg = transcoders.cfg
    return {
        "format": "circuit-tracer per-layer (layer_{i}.safetensors)",
        "feature_input_site": "mlp.in", "feature_output_site": "mlp.out",
        "layers": list(transcoders.layers), "d_model": transcoders.d_model, "n_features": cfg.n_features,
        "activation": cfg.activation, "k": cfg.k, "cross_layer": cfg.cross_layer, "skip": cfg.skip,
        "transcoder": dataclasses.asdict(cfg), **(extra or {}),
    }


def save_transcoders(transcoders: TranscoderSet, out: str | Path, fingerprint: ModelFingerprint,
                     extra_config: dict | None = None) -> Artifact:
    """Write a transcoder set as a `transcoders` artifact (atomic)."""
    tensors = {f"layer_{l}": t for l, t in transcoders.export().items()}
    return write_artifact(out, "transcoders", fingerprint, tensors, artifact_config(transcoders, extra_config))


def read_config(path: str | Path) -> dict:
    return read_artifact(path, expected_kind="transcoders").config


def load_transcoders(path_or_repo_id: str | Path, fingerprint: ModelFingerprint | None = None,
                     revision: str | None = None) -> TranscoderSet:
    """The transcoder set of an artifact (local or Hub), checked against `fingerprint` when given."""
    artifact = read_artifact(path_or_repo_id, revision=revision, expected_kind="transcoders")
    if fingerprint is not None:
        check_compatible(artifact, fingerprint)
    tensors = {}
    for stem in artifact.stems:
        match = LAYER_FILE.match(stem)
        if match:
            tensors[int(match.group(1))] = artifact.tensors(stem)
    if not tensors:
        raise ValueError(f"{artifact.path}: a transcoders artifact with no layer_{{i}}.safetensors")
    known = {f.name for f in dataclasses.fields(TranscoderConfig)}
    cfg = TranscoderConfig(**{k: v for k, v in artifact.config.get("transcoder", {}).items() if k in known})
    return TranscoderSet.from_tensors(tensors, cfg)


def read_circuit_tracer(folder: str | Path, activation: str | None = None) -> TranscoderSet:
    """A transcoder set from a bare circuit-tracer folder; the activation is read from the tensors if not given."""
    folder = Path(folder)
    tensors: dict[int, dict[str, Tensor]] = {}
    for path in folder.glob("*.safetensors"):
        plt = LAYER_FILE.match(path.stem)
        clt = re.match(r"^W_(enc|dec)_(\d+)$", path.stem)
        if plt:
            raw = load_file(path)
            if "activation_function.threshold" in raw:
                raw["threshold"] = raw.pop("activation_function.threshold")
            tensors[int(plt.group(1))] = raw
        elif clt:
            i = int(clt.group(2))
            raw = {re.sub(rf"_{i}$", "", k): v for k, v in load_file(path).items()}
            tensors.setdefault(i, {}).update(raw)
    if not tensors:
        raise ValueError(f"{folder}: no layer_{{i}}.safetensors (per-layer) or W_enc_{{i}}.safetensors (CLT) files")
    first = tensors[min(tensors)]
    if activation is None:
        activation = "jumprelu" if "threshold" in first else "topk" if "k" in first else "relu"
    cross = first["W_dec"].ndim == 3
    k = int(first["k"]) if "k" in first else TranscoderConfig.k
    cfg = TranscoderConfig(n_features=first["W_enc"].shape[0], activation=activation, k=k, cross_layer=cross)
    return TranscoderSet.from_tensors(tensors, cfg)


def import_circuit_tracer(folder: str | Path, out: str | Path, fingerprint: ModelFingerprint,
                          activation: str | None = None) -> Artifact:
    """Wrap a bare circuit-tracer folder as a `transcoders` artifact made for `fingerprint`'s model."""
    transcoders = read_circuit_tracer(folder, activation)
    if transcoders.d_model != fingerprint.dims.get("d_model", transcoders.d_model):
        raise ValueError(f"{folder}: transcoders have d_model={transcoders.d_model}, the model {fingerprint.dims['d_model']}")
    return save_transcoders(transcoders, out, fingerprint, {"imported_from": str(folder)})


def checkpoint_file(ckpt: str | Path) -> Path:
    """A checkpoint file, or last.ckpt in a checkpoint directory (or its checkpoints/ folder)."""
    path = Path(ckpt)
    for candidate in (path, path / "last.ckpt", path / "checkpoints" / "last.ckpt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{ckpt}: no checkpoint file (nor last.ckpt inside it)")


def transcoders_from_checkpoint(ckpt: str | Path) -> tuple[TranscoderSet, ModelFingerprint, dict]:
    """(transcoders, model fingerprint, checkpoint info) from a TranscoderModule checkpoint, without the model."""
    path = checkpoint_file(ckpt)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    meta = state.get("transcoders")
    if meta is None:
        raise ValueError(f"{path}: not a TranscoderModule checkpoint (no 'transcoders' entry)")
    transcoders = TranscoderSet(meta["d_model"], TranscoderConfig(**meta["config"]), meta["layers"])
    prefix = "transcoders."
    weights = {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    transcoders.load_state_dict(weights)
    info = {"checkpoint": str(path), "global_step": int(state.get("global_step", 0)), **meta.get("info", {})}
    return transcoders, ModelFingerprint(**meta["model"]), info


def transcoders_export(ckpt: str, out: str) -> Path:
    """Export the transcoders of a training checkpoint as a `transcoders` artifact (circuit-tracer layout).

    Args:
        ckpt: a TranscoderModule checkpoint file, or a directory holding last.ckpt (or checkpoints/last.ckpt).
        out: the artifact directory to write.
    """
    transcoders, fingerprint, info = transcoders_from_checkpoint(ckpt)
    artifact = save_transcoders(transcoders, out, fingerprint, info)
    print(f"transcoders export: {len(transcoders.layers)} layers from {info['checkpoint']} -> {artifact.path}")
    return artifact.path


class CoactivationStats(L.Callback):
    """Accumulates, per layer, how MLP neurons (`mlp.neurons`) behave when each feature fires; saved as safetensors.

    `{out}/layer_{i}.safetensors` holds, over the trained tokens (those with weight > 0):
        coact_sum [d_tc, d_mlp]   sum of neuron activations over the tokens where the feature is active
        feature_count [d_tc]      tokens where the feature is active
        feature_act_sum [d_tc]    sum of the feature's activation
        neuron_sum [d_mlp]        sum of neuron activations over all tokens
        tokens []                 number of tokens
    so coact_sum / feature_count is a neuron's mean when the feature fires and neuron_sum / tokens its
    mean overall: the feature -> neuron mapping the reference pipeline ships. Each rank writes the layers
    it trains, at the end of fit; the sums cover the steps of that fit call.
    """

    def __init__(self, out: str | None = None, every_n_steps: int = 1):
        """
        Args:
            out: folder for the statistics (default: {default_root_dir}/coactivation).
            every_n_steps: accumulate on every n-th training step.
        """
        self.out, self.every_n_steps = out, every_n_steps
        self.stats: dict[int, dict[str, Tensor]] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        pl_module.capture_neurons = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = getattr(pl_module, "last_step", None)
        if step is None or (trainer.global_step - 1) % self.every_n_steps:
            return
        width = pl_module.transcoders.cfg.n_features
        for layer, terms in step["terms"].items():
            self._update(layer, width, terms.acts, terms.indices, step["neurons"][layer])

    @torch.no_grad()
    def _update(self, layer: int, width: int, acts: Tensor, indices: Tensor | None, neurons: Tensor) -> None:
        """acts [n, d_tc] (or [n, k] values at indices [n, k]), neurons [n, d_mlp]."""
        n_tok, d_mlp = neurons.shape
        if indices is None:
            tok, feat = (acts > 0).nonzero(as_tuple=True)
            vals = acts[tok, feat]
        else:
            live = acts > 0
            tok = torch.arange(n_tok, device=acts.device)[:, None].expand_as(indices)[live]
            feat, vals = indices[live], acts[live]
        s = self.stats.get(layer)
        if s is None:
            s = self.stats[layer] = self._empty(width, d_mlp, neurons.device)
        s["coact_sum"].index_add_(0, feat, neurons[tok].float())
        s["feature_count"].index_add_(0, feat, torch.ones_like(vals, dtype=torch.float32))
        s["feature_act_sum"].index_add_(0, feat, vals.float())
        s["neuron_sum"] += neurons.float().sum(0)
        s["tokens"] += n_tok

    @staticmethod
    def _empty(width: int, d_mlp: int, device) -> dict[str, Tensor]:
        z = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        return {"coact_sum": z(width, d_mlp), "feature_count": z(width), "feature_act_sum": z(width),
                "neuron_sum": z(d_mlp), "tokens": z(())}

    def on_train_end(self, trainer, pl_module) -> None:
        out = Path(self.out or Path(trainer.default_root_dir) / "coactivation")
        out.mkdir(parents=True, exist_ok=True)
        for layer, stats in self.stats.items():
            target = out / f"layer_{layer}.safetensors"
            tmp = target.with_name(f".{target.name}.tmp-{trainer.global_rank}")
            save_file({k: v.detach().cpu().contiguous() for k, v in stats.items()}, str(tmp))
            tmp.replace(target)
