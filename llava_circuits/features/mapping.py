"""`features map`: each selected feature -> the MLP neurons that carry it.

A feature's decoder direction lives in d_model (it writes `mlp.out`), the neurons in d_mlp (`mlp.neurons`,
the input of down_proj), so the decoder row itself names no neurons. Two mappings that do:

- through down_proj: which neurons' output directions (columns of W_down [d_model, d_mlp]) rebuild the
  decoder direction. Orthogonal matching pursuit picks top_k columns greedily and refits their weights by
  least squares, so `weight` is how much each neuron's activation must move to write one unit of the
  feature, and `explained` the share of the direction's squared norm they rebuild. A cross-layer feature
  is mapped at every layer it writes to.
- through co-activation (when transcoder training saved it, transcoders/io.py CoactivationStats): each
  neuron's mean activation on the tokens where the feature fires minus its mean on all tokens.

    RUN/analysis/{dataset}_{direction}_neuron_mapping.json   one entry per selected feature
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from llava_circuits.evaluation.run import write_json
from llava_circuits.features.config import MapConfig, load_config, override
from llava_circuits.models.load import Loaded
from llava_circuits.transcoders.transcoder import TranscoderSet


@torch.no_grad()
def matching_pursuit(w: Tensor, target: Tensor, k: int) -> tuple[list[int], list[float], float]:
    """(columns, weights, explained): k columns of w [d, n] whose least-squares combination rebuilds target [d]."""
    w, target = w.double(), target.double()
    norms = w.norm(dim=0).clamp_min(1e-12)
    chosen: list[int] = []
    residual, coef = target.clone(), torch.zeros(0, dtype=torch.float64)
    for _ in range(min(k, w.shape[1])):
        scores = (w.T @ residual).abs() / norms
        scores[chosen] = -1.0
        chosen.append(int(scores.argmax()))
        sub = w[:, chosen]
        coef = torch.linalg.lstsq(sub, target[:, None]).solution[:, 0]
        residual = target - sub @ coef
    explained = 1.0 - float(residual.pow(2).sum() / target.pow(2).sum().clamp_min(1e-30))
    order = coef.abs().argsort(descending=True).tolist()
    return [chosen[i] for i in order], [float(coef[i]) for i in order], explained


def decoder_targets(transcoders: TranscoderSet, layer: int, feature: int) -> list[tuple[int, Tensor]]:
    """(target layer, raw-space decoder direction [d_model]) for each layer the feature writes to."""
    exported = transcoders[layer]
    w_dec = exported.W_dec.detach()
    if not transcoders.cross_layer:
        return [(layer, w_dec[feature] * exported.y_scale)]
    targets = transcoders.all_layers[transcoders.all_layers.index(layer):]
    return [(t, w_dec[feature, slot] * exported.y_scale[slot]) for slot, t in enumerate(targets)]


def coactivation_neurons(stats: dict[str, Tensor], feature: int, k: int) -> list[dict]:
    """Neurons whose mean activation moves most when the feature fires (vs their mean on all tokens)."""
    fires = float(stats["feature_count"][feature])
    if fires == 0:
        return []
    lift = stats["coact_sum"][feature].double() / fires - stats["neuron_sum"].double() / float(stats["tokens"])
    top = lift.abs().topk(min(k, len(lift))).indices
    return [{"neuron_idx": int(j), "weight": float(lift[j])} for j in top]


def map_features(loaded: Loaded, transcoders: TranscoderSet, features: list[dict], cfg: MapConfig,
                 amplification: float | None = None) -> list[dict]:
    """One mapping entry per feature ({"layer", "feature_idx", ...} as in the analysis JSON)."""
    coact = {}
    out = []
    for entry in features:
        layer, f = entry["layer"], entry["feature_idx"]
        targets = []
        for target, direction in decoder_targets(transcoders, layer, f):
            w_down = loaded.anatomy.proj(target, "down_proj").weight.detach().float().cpu()  # [d_model, d_mlp]
            cols, weights, explained = matching_pursuit(w_down, direction.float().cpu(), cfg.top_k)
            targets.append({"layer": target, "explained": explained,
                            "top_mlp_neurons": [{"neuron_idx": j, "weight": w} for j, w in zip(cols, weights)]})
        item = {"feature": {k: v for k, v in entry.items() if k in ("layer", "feature_idx", "goodness_score", "badness_score")},
                "top_mlp_neurons": targets[0]["top_mlp_neurons"], "explained": targets[0]["explained"]}
        if len(targets) > 1:
            item["targets"] = targets
        if cfg.coactivation:
            path = Path(cfg.coactivation) / f"layer_{layer}.safetensors"
            if path.is_file():
                coact.setdefault(layer, load_file(str(path)))
                item["coactivation_neurons"] = coactivation_neurons(coact[layer], f, cfg.top_k)
        if amplification is not None:
            item["amplification_factor"] = amplification
        out.append(item)
    return out


def features_map(run: str, model: str, transcoders: str, config: str | None = None, direction: str = "good",
                 dataset: str | None = None, top_k: int | None = None, coactivation: str | None = None,
                 dtype: str = "float32") -> list[dict]:
    """Map the selected features of an analyzed run to MLP neurons (through down_proj, and co-activation).

    Args:
        run: an analyzed `features capture` run directory
        model: Hub id or local model directory (its down_proj weights are read)
        transcoders: the transcoders artifact the run was captured with
        config: features recipe YAML; its map section
        direction: map the "good" or the "bad" selection
        dataset: name used in the analysis files (default: the benchmark)
        top_k: neurons per feature
        coactivation: folder of co-activation statistics from transcoder training (layer_{i}.safetensors)
        dtype: model dtype to load (float32 keeps the weights exact)
    """
    from llava_circuits.models.load import load_model
    from llava_circuits.transcoders.io import load_transcoders

    cfg = load_config(config)
    map_cfg = override(cfg.map, top_k=top_k, coactivation=coactivation)
    run = Path(run)
    dataset = dataset or json.loads((run / "capture.json").read_text())["bench"]
    analysis = json.loads((run / "analysis" / f"{dataset}_{direction}_features.json").read_text())
    loaded = load_model(model, dtype=dtype)
    tcs = load_transcoders(transcoders, loaded.fingerprint())
    entries = map_features(loaded, tcs, analysis["features"], map_cfg, amplification=cfg.steer.value)
    path = run / "analysis" / f"{dataset}_{direction}_neuron_mapping.json"
    write_json(path, entries)
    explained = [e["explained"] for e in entries]
    print(f"features map: {len(entries)} features -> {path} (median explained "
          f"{sorted(explained)[len(explained) // 2] if explained else float('nan'):.3f})")
    return entries
