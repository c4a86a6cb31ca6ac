"""`features steer`: amplify or suppress chosen transcoder features, as an Intervention `eval` accepts.

Ops on a feature's activation a, at the steered positions (by tag), where it fires (or everywhere):
scale (a * value), add (a + value), clamp (value). Two ways to apply the same change:

- transcoders in the loop: the replacement model (every MLP replaced by its transcoder) with the features
  edited, the reference pipeline's Phase 7;
- the original model: each MLP keeps its own output and gains (a' - a) times the feature's decoder
  direction (at every layer a cross-layer feature writes to), i.e. the replacement model with error terms.
  Only the steered features' encoder rows and decoder directions are needed (all of a touched layer's
  encoder for top-k transcoders, whose firing depends on every feature), so the artifact stays small.

The artifact (kind `feature-analysis`) holds the reduced transcoders as `layer_{i}.safetensors`
(circuit-tracer layout) and `steering.safetensors` (`layer`, `feature`, `column` [n]: each steered feature
and its row in the reduced layer); in-the-loop steering stores no weights and reloads the transcoders.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from llava_circuits.artifacts import (
    ModelFingerprint,
    check_compatible,
    read_artifact,
    write_artifact,
)
from llava_circuits.features.capture import PositionTagger
from llava_circuits.features.config import TAGS, SteerConfig, load_config, override
from llava_circuits.models.load import Loaded
from llava_circuits.sites import HookContext
from llava_circuits.steering.base import Intervention
from llava_circuits.transcoders.replacement import ReplacementModel
from llava_circuits.transcoders.transcoder import TranscoderConfig, TranscoderSet


def reduce(transcoders: TranscoderSet, features: list[tuple[int, int]]) -> tuple[dict[int, dict[str, Tensor]], list[int]]:
    """(raw-space tensors per layer holding only what steering `features` needs, each feature's row there).

    ReLU / JumpReLU features are elementwise, so a feature's activation needs only its own encoder row:
    each touched layer keeps the steered rows (padded with rows that never fire). Top-k firing depends on
    every feature, so touched layers are kept whole. Biases and skips cancel in the edit's effect and are
    zeroed. A cross-layer set keeps every layer (sources write to later layers).
    """
    full = transcoders.export()
    layers = transcoders.layers if transcoders.cross_layer else sorted({l for l, _ in features})
    keep_whole = transcoders.cfg.activation == "topk"
    per_layer = {l: [f for ll, f in features if ll == l] for l in layers}
    width = max(1, max(len(v) for v in per_layer.values()))
    tensors, columns = {}, []
    for l in layers:
        src = full[l]
        rows = torch.arange(src["W_enc"].shape[0]) if keep_whole else torch.tensor(per_layer[l], dtype=torch.long)
        n = len(rows) if keep_whole else width
        out = {"W_enc": torch.zeros(n, src["W_enc"].shape[1]), "b_enc": torch.full((n,), -1.0),
               "W_dec": torch.zeros(n, *src["W_dec"].shape[1:]), "b_dec": torch.zeros_like(src["b_dec"])}
        out["W_enc"][: len(rows)], out["b_enc"][: len(rows)] = src["W_enc"][rows], src["b_enc"][rows]
        out["W_dec"][: len(rows)] = src["W_dec"][rows]
        if "threshold" in src:
            out["threshold"] = torch.ones(n)
            out["threshold"][: len(rows)] = src["threshold"][rows]
        tensors[l] = out
    for l, f in features:
        columns.append(f if keep_whole else per_layer[l].index(f))
    return tensors, columns


class FeatureSteering(Intervention):
    """Scale, add to or clamp chosen features, through the replacement model or directly in the original model."""

    kind = "feature-analysis"

    def __init__(self, transcoders: TranscoderSet, features: list[tuple[int, int]], columns: list[int] | None = None,
                 cfg: SteerConfig | None = None, fingerprint: ModelFingerprint | None = None, source: str | None = None):
        """
        Args:
            transcoders: the full set (transcoders in the loop) or a reduced one (see `reduce`)
            features: (layer, feature index in the original set) of each steered feature
            columns: each feature's row in `transcoders` (default: its own index)
            cfg: the op, value, where, tags and mode
            fingerprint: the model it is made for
            source: the transcoders artifact the features come from (reloaded for in-the-loop steering)
        """
        self.transcoders, self.features = transcoders, [(int(l), int(f)) for l, f in features]
        self.columns = list(columns) if columns is not None else [f for _, f in self.features]
        self.cfg, self.fingerprint, self.source = cfg or SteerConfig(), fingerprint, source
        self.replacement: ReplacementModel | None = None

    @classmethod
    def build(cls, transcoders: TranscoderSet, features: list[tuple[int, int]], cfg: SteerConfig,
              fingerprint: ModelFingerprint | None = None, source: str | None = None) -> FeatureSteering:
        """Steering of `features` of a full transcoder set, reduced to what it needs unless transcoders_in_loop."""
        if cfg.transcoders_in_loop:
            return cls(transcoders, features, None, cfg, fingerprint, source)
        tensors, columns = reduce(transcoders, features)
        return cls(TranscoderSet.from_tensors(tensors, transcoders.cfg), features, columns, cfg, fingerprint, source)

    def edit(self, tagger: PositionTagger, columns: list[int]):
        """The feature edit of one layer: acts [n, d_tc] -> steered acts (the same tensor when nothing changes)."""
        cfg, steer_tags = self.cfg, torch.tensor([TAGS.index(t) for t in self.cfg.tags if t in TAGS], dtype=torch.uint8)
        prompt_last = "prompt_last" in cfg.tags

        def steer(acts: Tensor, ctx: HookContext) -> Tensor:
            tag, real, _ = tagger(ctx)
            rows, cols = ctx.batch, ctx.pos - ctx.past_len  # [n]
            at = real[rows, cols] & torch.isin(tag[rows, cols], steer_tags.to(tag.device))  # [n]
            if prompt_last:
                at = at | tagger.last[rows, cols]
            idx = torch.tensor(columns, device=acts.device)
            cur = acts[:, idx]  # [n, m]
            mask = at[:, None] & ((cur != 0) if cfg.where == "fires" else torch.ones_like(cur, dtype=torch.bool))
            if not bool(mask.any()):
                return acts
            new = {"scale": cur * cfg.value, "add": cur + cfg.value, "clamp": torch.full_like(cur, cfg.value)}[cfg.op]
            out = acts.clone()
            out[:, idx] = torch.where(mask, new, cur)
            return out

        return steer

    # --- Intervention protocol ------------------------------------------------------------------
    def attach(self, loaded: Loaded) -> None:
        tcs = self.transcoders
        layers = None if tcs.cross_layer else sorted({l for l, _ in self.features})
        self.replacement = ReplacementModel(tcs, error_term=not self.cfg.transcoders_in_loop,
                                            layers=None if self.cfg.transcoders_in_loop else layers, record=False)
        tagger = PositionTagger(loaded)
        for layer in sorted({l for l, _ in self.features}):
            cols = [c for (l, _), c in zip(self.features, self.columns) if l == layer]
            self.replacement.edit(layer, self.edit(tagger, cols))
        self.replacement.attach(loaded)
        if self.fingerprint is None:
            self.fingerprint = loaded.fingerprint()

    def detach(self) -> None:
        if self.replacement is not None:
            self.replacement.detach()
            self.replacement = None

    def describe(self) -> dict:
        return {"kind": self.kind, "n_features": len(self.features), "layers": sorted({l for l, _ in self.features}),
                **dataclasses.asdict(self.cfg), "source": self.source}

    def save(self, path: str | Path) -> Path:
        if self.fingerprint is None:
            raise ValueError("save needs the model fingerprint: attach the model once, or pass fingerprint=")
        steering = {"layer": torch.tensor([l for l, _ in self.features]), "feature": torch.tensor([f for _, f in self.features]),
                    "column": torch.tensor(self.columns)}
        tensors = {"steering": steering}
        if not self.cfg.transcoders_in_loop:
            tensors |= {f"layer_{l}": t for l, t in self.transcoders.export().items()}
        config = {"steer": dataclasses.asdict(self.cfg), "transcoder": dataclasses.asdict(self.transcoders.cfg),
                  "source": self.source, "features": [{"layer": l, "feature_idx": f} for l, f in self.features]}
        return write_artifact(path, self.kind, self.fingerprint, tensors, config).path

    @classmethod
    def load(cls, path: str | Path, loaded: Loaded) -> FeatureSteering:
        from llava_circuits.features.config import FeaturesConfig, check
        from llava_circuits.transcoders.io import load_transcoders

        artifact = read_artifact(path, expected_kind=cls.kind)
        check_compatible(artifact, loaded.fingerprint())
        if "steer" not in artifact.config:
            raise ValueError(f"{path}: a feature-analysis artifact without a steering section is not an intervention")
        cfg = SteerConfig(**artifact.config["steer"])
        check(FeaturesConfig(steer=cfg))
        s = artifact.tensors("steering")
        features, columns = list(zip(s["layer"].tolist(), s["feature"].tolist())), s["column"].tolist()
        if cfg.transcoders_in_loop:
            tcs = load_transcoders(artifact.config["source"], loaded.fingerprint())
        else:
            tensors = {int(stem.split("_")[1]): artifact.tensors(stem) for stem in artifact.stems if stem.startswith("layer_")}
            tcs = TranscoderSet.from_tensors(tensors, TranscoderConfig(**artifact.config["transcoder"]))
        return cls(tcs, features, columns, cfg, loaded.fingerprint(), artifact.config.get("source"))


def selected(run: str | Path, which: str, top: int, dataset: str | None = None) -> list[tuple[int, int]]:
    """The first `top` (layer, feature) of an analyzed run's good or bad selection."""
    run = Path(run)
    dataset = dataset or json.loads((run / "capture.json").read_text())["bench"]
    analysis = json.loads((run / "analysis" / f"{dataset}_{which}_features.json").read_text())
    return [(e["layer"], e["feature_idx"]) for e in analysis["features"][:top]]


def random_like(run: str | Path, features: list[tuple[int, int]], seed: int = 0) -> list[tuple[int, int]]:
    """As many random features, layer for layer, among those active in some classified sample, none of `features`."""
    from safetensors import safe_open

    path = Path(run) / "analysis" / "stats.safetensors"
    with safe_open(str(path), "pt") as f:
        layers = json.loads(f.metadata()["layers"])
        alive = (f.get_tensor("good_count") + f.get_tensor("bad_count")).numpy() > 0  # [n_layers, d_tc]
    rng = np.random.default_rng(seed)
    out = []
    for layer in sorted({l for l, _ in features}):
        taken = {f for l, f in features if l == layer}
        pool = [f for f in np.flatnonzero(alive[layers.index(layer)]).tolist() if f not in taken]
        n = sum(1 for l, _ in features if l == layer)
        if len(pool) < n:
            raise ValueError(f"layer {layer}: only {len(pool)} other active features to draw {n} random ones from")
        out += [(layer, int(f)) for f in rng.choice(pool, size=n, replace=False)]
    return out


def features_steer(run: str, transcoders: str, out: str, config: str | None = None, which: str | None = None,
                   top: int | None = None, op: str | None = None, value: float | None = None, where: str | None = None,
                   transcoders_in_loop: bool | None = None, random: bool = False, seed: int = 0,
                   dataset: str | None = None) -> Path:
    """Write a steering intervention for an analyzed run's selected features (run it with `eval --intervention OUT`).

    Args:
        run: an analyzed `features capture` run directory
        transcoders: the transcoders artifact the run was captured with
        out: artifact directory to write
        config: features recipe YAML; its steer section
        which: steer the "good" or the "bad" selection
        top: how many of the selected features, in the selection's order
        op: scale, add or clamp
        value: factor, offset or clamp value
        where: fires (only where the feature is active) or all (every steered position)
        transcoders_in_loop: edit the features in the replacement model instead of the original model
        random: steer as many random active features, layer for layer, instead (the control)
        seed: seed of the random features
        dataset: name used in the analysis files (default: the benchmark)
    """
    from llava_circuits.features.config import FeaturesConfig, check
    from llava_circuits.transcoders.io import load_transcoders

    cfg = override(load_config(config).steer, which=which, top=top, op=op, value=value, where=where,
                   transcoders_in_loop=transcoders_in_loop)
    check(FeaturesConfig(steer=cfg))
    features = selected(run, cfg.which, cfg.top, dataset)
    if not features:
        raise ValueError(f"{run}: no {cfg.which} features were selected; nothing to steer")
    if random:
        features = random_like(run, features, seed)
    fingerprint = read_artifact(transcoders, expected_kind="transcoders").model
    steering = FeatureSteering.build(load_transcoders(transcoders), features, cfg, fingerprint, str(transcoders))
    path = steering.save(out)
    print(f"features steer: {len(features)} {'random' if random else cfg.which} features, {cfg.op} {cfg.value} -> {path}")
    return path
