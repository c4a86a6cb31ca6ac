"""Soft pruning of attention heads: scale each selected head down by (1 - alpha), reversibly.

Two modes, one `pruning` artifact (tensor `alpha [n_layers, n_heads]`, the mode in its config):

- ``gate``: a per-head gate on the input of o_proj. Site `layers.{i}.attn.heads` (the concatenated head
  outputs, [.., n_heads, head_dim]) is multiplied by (1 - alpha[i, h]) per query head, so alpha = 1
  removes exactly head h's contribution to the residual stream and alpha = 0 changes nothing. The gate
  acts on query heads, so it is exact under grouped-query attention too. It is a hook: nothing in the
  weights changes, and a fine-tuned model trains around it with the gate itself frozen.
- ``qkv``: the reference pipeline's weight edit W <- (1 - alpha) W of the head's rows of q_proj, k_proj
  and v_proj (and of their biases, when the projection has one, e.g. Qwen2), so the projections' outputs
  scale by (1 - alpha). Scaling Q and K flattens the head's attention (logits times (1 - a_q)(1 - a_kv)),
  scaling V shrinks its output. Under grouped-query attention a K/V head serves `n_heads / n_kv_heads`
  query heads, so its rows are scaled once per KV group, by 1 - mean(alpha of the group's query heads);
  q rows use each query head's own alpha. When every query head of a group has alpha = 1 the group's
  heads output exactly nothing, as with the gate. The original rows are kept, so detach restores the
  weights bit for bit. Models that normalise queries and keys per head (q_norm / k_norm, e.g. Qwen3) would
  undo the Q/K scaling, so the edit refuses them; the gate works there.

`bake` makes either mode permanent (gate: o_proj's input columns of each head scaled by 1 - alpha,
which is the same map), for exporting a standalone pruned or pruned-and-fine-tuned model.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import Tensor

from llava_circuits.artifacts import (
    ModelFingerprint,
    check_compatible,
    read_artifact,
    write_artifact,
)
from llava_circuits.models.anatomy import Anatomy
from llava_circuits.models.load import Loaded
from llava_circuits.sites import intervene
from llava_circuits.steering.base import Intervention

MODES = ("gate", "qkv")


def qkv_scales(alpha: Tensor, n_kv_heads: int) -> tuple[Tensor, Tensor]:
    """Scale factors of one layer: q [n_heads] = 1 - alpha, kv [n_kv_heads] = 1 - mean alpha of each KV group."""
    n_heads = alpha.shape[0]
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    group = alpha.reshape(n_kv_heads, n_heads // n_kv_heads)  # query heads h*g .. h*g+g-1 share KV head h
    return 1 - alpha, 1 - group.mean(1)


def weight_edits(anatomy: Anatomy, alpha: Tensor, mode: str) -> list[tuple[torch.nn.Parameter, int, Tensor]]:
    """(parameter, dim, scale per index of that dim) for every projection the pruning scales."""
    d = anatomy.head_dim
    edits = []
    for i in range(anatomy.n_layers):
        if not bool((alpha[i] != 0).any()):
            continue
        q_scale, kv_scale = qkv_scales(alpha[i].double(), anatomy.n_kv_heads)
        if mode == "gate":  # o_proj(x * s) == (W_o * s) x: the gate as o_proj input columns
            edits.append((anatomy.proj(i, "o_proj").weight, 1, q_scale.repeat_interleave(d)))
            continue
        normed = [n for n in ("q_norm", "k_norm") if getattr(anatomy.attn(i), n, None) is not None]
        if normed:
            raise ValueError(f"layer {i} normalises queries/keys per head ({', '.join(normed)}), which undoes the "
                             "Q/K row scaling; use mode 'gate'")
        for name, scale in (("q_proj", q_scale), ("k_proj", kv_scale), ("v_proj", kv_scale)):
            proj = anatomy.proj(i, name)
            for param in (proj.weight, proj.bias):
                if param is not None:
                    edits.append((param, 0, scale.repeat_interleave(d)))
    for param, _, _ in edits:
        if not param.dtype.is_floating_point:
            raise ValueError(f"soft pruning edits weights and needs floating-point weights, got {param.dtype} "
                             "(quantized model?); use mode 'gate', which only hooks activations")
    return edits


class SoftPruning(Intervention):
    """Attention heads scaled by (1 - alpha): a gate on o_proj's input, or the Q/K/V row edit."""

    kind = "pruning"

    def __init__(self, alpha: Tensor, mode: str = "gate", fingerprint: ModelFingerprint | None = None,
                 config: dict | None = None, extra_tensors: dict[str, Tensor] | None = None):
        if mode not in MODES:
            raise ValueError(f"pruning mode must be one of {MODES}, got {mode!r}")
        if alpha.ndim != 2 or bool((alpha < 0).any() | (alpha > 1).any()):
            raise ValueError(f"alpha must be [n_layers, n_heads] with values in [0, 1], got shape {tuple(alpha.shape)}")
        self.alpha = alpha.detach().float().cpu()  # [n_layers, n_heads]
        self.mode, self.fingerprint, self.config = mode, fingerprint, dict(config or {})
        self.extra_tensors = dict(extra_tensors or {})
        self._stack: contextlib.ExitStack | None = None
        self._saved: list[tuple[torch.nn.Parameter, int, Tensor, Tensor]] = []

    @property
    def heads(self) -> list[tuple[int, int, float]]:
        """(layer, head, alpha) of every pruned head."""
        return [(l, h, float(self.alpha[l, h])) for l, h in self.alpha.nonzero().tolist()]

    def _check(self, loaded: Loaded) -> None:
        a = loaded.anatomy
        if tuple(self.alpha.shape) != (a.n_layers, a.n_heads):
            raise ValueError(f"pruning alpha is {tuple(self.alpha.shape)}, "
                             f"the model has {a.n_layers} layers x {a.n_heads} heads")
        if self._stack is not None or self._saved:
            raise RuntimeError("this SoftPruning is already attached; detach it first")
        self.fingerprint = self.fingerprint or loaded.fingerprint()

    def attach(self, loaded: Loaded) -> None:
        self._check(loaded)
        if self.mode == "gate":
            edits = {f"layers.{i}.attn.heads": _gate(1 - self.alpha[i])
                     for i in range(self.alpha.shape[0]) if bool((self.alpha[i] != 0).any())}
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(intervene(loaded.model, edits, anatomy=loaded.anatomy))
            return
        self._saved = _scale(weight_edits(loaded.anatomy, self.alpha, "qkv"), keep=True)

    def detach(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        with torch.no_grad():
            for param, dim, index, original in reversed(self._saved):
                param.index_copy_(dim, index, original)
        self._saved = []

    def bake(self, loaded: Loaded) -> None:
        """Make the pruning permanent in the weights (not undoable): Q/K/V rows, or o_proj columns for the gate."""
        self._check(loaded)
        _scale(weight_edits(loaded.anatomy, self.alpha, self.mode), keep=False)

    def describe(self) -> dict:
        return {"kind": self.kind, "mode": self.mode, "n_pruned": len(self.heads),
                "heads": [{"layer": l, "head": h, "alpha": round(a, 4)} for l, h, a in self.heads]}

    def save(self, path: str | Path) -> Path:
        if self.fingerprint is None:
            raise ValueError("SoftPruning.save needs the model fingerprint: pass fingerprint= or attach it once")
        tensors = {"pruning": {"alpha": self.alpha}}
        if self.extra_tensors:
            tensors["localization"] = self.extra_tensors
        config = {**self.config, "mode": self.mode, "heads": self.describe()["heads"]}
        return write_artifact(path, self.kind, self.fingerprint, tensors, config).path

    @classmethod
    def load(cls, path: str | Path, loaded: Loaded | None = None, mode: str | None = None) -> SoftPruning:
        """Read a pruning artifact (checked against `loaded` when given); `mode` overrides the saved mode."""
        artifact = read_artifact(path, expected_kind=cls.kind)
        if loaded is not None:
            check_compatible(artifact, loaded.fingerprint())
        extra = artifact.tensors("localization") if "localization" in artifact.stems else None
        config = {k: v for k, v in artifact.config.items() if k not in ("mode", "heads")}
        return cls(artifact.tensors("pruning")["alpha"], mode or artifact.config.get("mode", "gate"),
                   artifact.model, config, extra)


def _gate(scale: Tensor):
    """The hook of one layer: act [n, n_heads, head_dim] times scale [n_heads] per head."""
    def gate(act: Tensor) -> Tensor:
        return act * scale.to(act.device, act.dtype)[:, None]
    return gate


def _scale(edits, keep: bool) -> list[tuple[torch.nn.Parameter, int, Tensor, Tensor]]:
    """Multiply each edited parameter along `dim` by its scale; return the original slices when `keep`."""
    saved = []
    with torch.no_grad():
        for param, dim, scale in edits:
            index = (scale != 1).nonzero().flatten().to(param.device)
            if index.numel() == 0:
                continue
            if keep:
                saved.append((param, dim, index, param.index_select(dim, index).clone()))
            shape = [1] * param.ndim
            shape[dim] = -1
            param.mul_(scale.to(param.device, torch.float64).reshape(shape).to(param.dtype))
    return saved
