"""The replacement model: the original model with chosen MLPs replaced by transcoders.

While attached, every replaced layer's `mlp.out` becomes the transcoder's prediction from that layer's
`mlp.in` (for a cross-layer transcoder: the sum of what the features of this and earlier layers write
here). With `error_term=True` the MLP's own output is kept and only the effect of feature edits is
added, `mlp.out + decode(edited) - decode(original)`, so an unedited forward equals the original's
exactly (circuit-tracer's error nodes). With `record=True` the feature activations of every forward of an
attachment (prefill, then each decode step of `generate`) are recorded per layer as [batch, pos, d_tc].

    rm = ReplacementModel.load("runs/toy/transcoders", loaded, record=True)
    rm.edit(2, FeatureEdit(feature=17, scale=0.0))          # silence feature 17 of layer 2
    with rm.applied(loaded):
        out = loaded.model.generate(**inputs, max_new_tokens=8)
    acts = rm.activations()                                 # {layer: [batch, pos, d_tc]}
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from llava_circuits.models.load import Loaded
from llava_circuits.sites import HookContext, intervene
from llava_circuits.steering.base import Intervention
from llava_circuits.transcoders.transcoder import TranscoderSet

Edit = Callable[[Tensor, HookContext], Tensor]
"""fn(acts [n, d_tc], ctx) -> edited acts [n, d_tc] for the n positions of one forward."""


@dataclass
class FeatureEdit:
    """Set (`value`) or scale (`scale`) some features of one layer at some positions."""

    feature: int | list[int]
    """Feature index or indices."""
    value: float | None = None
    """New activation (None: scale instead)."""
    scale: float | None = None
    """Factor on the activation (used when value is None)."""
    positions: str | list[int] = "all"
    """"all", "last" (last position of each forward) or absolute positions of the sequence."""

    def __call__(self, acts: Tensor, ctx: HookContext) -> Tensor:
        if (self.value is None) == (self.scale is None):
            raise ValueError("FeatureEdit needs exactly one of value and scale")
        rows = self._rows(ctx, acts.device)
        cols = torch.as_tensor(self.feature if isinstance(self.feature, list) else [self.feature], device=acts.device)
        out = acts.clone()
        picked = out[rows][:, cols]
        new = torch.full_like(picked, self.value) if self.value is not None else picked * self.scale
        out[rows.nonzero()[:, :1], cols[None, :]] = new
        return out

    def _rows(self, ctx: HookContext, device) -> Tensor:
        pos = ctx.pos.to(device)
        if self.positions == "all":
            return torch.ones_like(pos, dtype=torch.bool)
        if self.positions == "last":
            return pos == ctx.past_len + ctx.shape[1] - 1
        return torch.isin(pos, torch.as_tensor(list(self.positions), device=device))


class ReplacementModel(Intervention):
    """Transcoders in place of MLPs, with optional error terms, recorded features and feature edits."""

    kind = "transcoders"

    def __init__(self, transcoders: TranscoderSet, error_term: bool = False, layers: Sequence[int] | None = None,
                 record: bool = True, config: dict | None = None, fingerprint=None):
        """
        Args:
            transcoders: the transcoder set (per-layer or cross-layer).
            error_term: keep each MLP's own output and add only the effect of edits (outputs equal the original's).
            layers: layers to replace (per-layer sets only; default: every layer of the set).
            record: keep the dense feature activations of the latest attachment's forwards (see `activations`).
            config: how the transcoders were made (written by `save`).
            fingerprint: the model they were made for (written by `save`).
        """
        self.transcoders = transcoders
        if layers is not None and transcoders.cross_layer and sorted(layers) != transcoders.layers:
            raise ValueError("a cross-layer transcoder replaces all of its layers together")
        self.layers = sorted(layers) if layers is not None else list(transcoders.layers)
        missing = sorted(set(self.layers) - set(transcoders.layers))
        if missing:
            raise ValueError(f"no transcoder for layer(s) {missing}; the set covers {transcoders.layers}")
        self.error_term, self.record, self.config, self.fingerprint = error_term, record, dict(config or {}), fingerprint
        self.edits: dict[int, list[Edit]] = defaultdict(list)
        self.recorded: dict[int, list[Tensor]] = defaultdict(list)
        self._stack: contextlib.ExitStack | None = None
        self._x: dict[int, Tensor] = {}
        self._acts: dict[int, Tensor] = {}  # this forward's activations, as computed
        self._edited: dict[int, Tensor] = {}  # ... and after the edits

    # --- edits and recorded activations ----------------------------------------------------------
    def edit(self, layer: int, fn: Edit) -> "ReplacementModel":
        """Apply fn to layer's feature activations in every forward while attached."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not replaced (replaced: {self.layers})")
        self.edits[layer].append(fn)
        return self

    def clear_edits(self) -> None:
        self.edits.clear()

    def activations(self) -> dict[int, Tensor]:
        """Recorded activations {layer: [batch, positions, d_tc]} of the latest attachment (one forward, or the
        forwards of one generate concatenated along positions)."""
        return {l: torch.cat(chunks, dim=1) for l, chunks in self.recorded.items()}

    def clear(self) -> None:
        """Forget recorded activations."""
        self.recorded.clear()

    # --- Intervention protocol ------------------------------------------------------------------
    def attach(self, loaded: Loaded) -> None:
        if self._stack is not None:
            raise RuntimeError("ReplacementModel is already attached")
        self.recorded.clear()  # an attachment records its own forwards: nothing piles up across runs
        device = next(loaded.model.parameters()).device
        self.transcoders.to(device)
        sites: dict[str, Callable] = {}
        for layer in self.layers:
            sites[f"layers.{layer}.mlp.in"] = self._reader(layer)
            sites[f"layers.{layer}.mlp.out"] = self._writer(layer)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(intervene(loaded.model, sites, anatomy=loaded.anatomy))
        if self.fingerprint is None:
            self.fingerprint = loaded.fingerprint()

    def detach(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        for per_layer in (self._x, self._acts, self._edited):
            per_layer.clear()

    def describe(self) -> dict:
        return {"kind": self.kind, "layers": self.layers, "error_term": self.error_term,
                "cross_layer": self.transcoders.cross_layer, "n_features": self.transcoders.cfg.n_features,
                "edited_layers": sorted(l for l, fns in self.edits.items() if fns)}

    def save(self, path: str | Path) -> Path:
        from llava_circuits.transcoders.io import save_transcoders

        if self.fingerprint is None:
            raise ValueError("save needs the model fingerprint: attach the model once, or pass fingerprint=")
        return save_transcoders(self.transcoders, path, self.fingerprint, self.config).path

    @classmethod
    def load(cls, path: str | Path, loaded: Loaded, error_term: bool = False, record: bool = False) -> "ReplacementModel":
        """The artifact at `path` for `loaded`. Not recording by default: as an `eval --intervention` it would
        otherwise hold [batch, positions, d_tc] per layer of every batch."""
        from llava_circuits.transcoders.io import load_transcoders, read_config

        transcoders = load_transcoders(path, loaded.fingerprint())
        return cls(transcoders, error_term=error_term, record=record, config=read_config(path),
                   fingerprint=loaded.fingerprint())

    # --- convenience ----------------------------------------------------------------------------
    def forward(self, loaded: Loaded, **inputs):
        """loaded.model(**inputs) with the replacement attached."""
        with self.applied(loaded):
            return loaded.model(**inputs)

    def generate(self, loaded: Loaded, **kwargs):
        """loaded.model.generate(**kwargs) with the replacement attached."""
        with self.applied(loaded):
            return loaded.model.generate(**kwargs)

    # --- hooks ----------------------------------------------------------------------------------
    def _reader(self, layer: int):
        def read(x: Tensor, ctx: HookContext) -> None:
            self._x[layer] = x  # [n, d_model]
            return None

        return read

    def _writer(self, layer: int):
        tcs = self.transcoders

        def write(y: Tensor, ctx: HookContext) -> Tensor:
            x = self._x.pop(layer)
            acts = tcs.encode(layer, x)  # [n, d_tc]
            edited = acts
            for fn in self.edits.get(layer, []):
                edited = fn(edited, ctx)
            self._acts[layer], self._edited[layer] = acts, edited
            if self.record:
                self.recorded[layer].append(edited.reshape(*ctx.shape, -1).detach())
            xs = {layer: x}
            if not self.error_term:
                return tcs.decode(layer, self._edited, xs)
            if not any(self._edited[s] is not self._acts[s] for s in tcs.sources(layer)):
                return y  # nothing edited upstream: the original output, exactly
            delta = tcs.decode(layer, self._edited, xs) - tcs.decode(layer, self._acts, xs)
            return y + delta.to(y.dtype)

        return write
