"""The soft-pruning recipe: one YAML file (configs/*/pruning.yaml) read into typed dataclasses.

The defaults are the toy world's recipe (configs/toy/pruning.yaml spells them out). Paths in the file
are relative to the working directory.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llava_circuits.finetune import FinetuneConfig
from llava_circuits.pruning.influence import InfluenceConfig
from llava_circuits.pruning.localize import LocalizeConfig
from llava_circuits.pruning.select import SelectConfig


@dataclass
class BenchmarkSpec:
    """One benchmark the pruning is evaluated on, run by the evaluation harness."""

    bench: str
    """Harness benchmark: bbq, bbq_loglik, stereoset, crows_pairs, mmlu, hellaswag, scienceqa, ..."""
    data: str
    """The benchmark file or folder in its official format."""
    images: str | None = None
    """Image folder, for benchmarks with images."""
    limit: int | None = None
    """Answer only the first N items (None: all)."""


@dataclass
class RestoreConfig:
    """The fine-tuning that restores utility with the pruning in place."""

    data: str | None = "toy"
    """Examples: a .jsonl of {"prompt", "answer", "image"?} (the prompt is the body inside the model's template),
    a LLaVA-Instruct .json (first turn of each conversation), or "toy": the toy world's restore set (text-only
    utility items and disambiguated BBQ-style items with gold answers; no ambiguous item). None: no fine-tuning."""
    images: str | None = None
    """Folder that relative image paths of the examples are resolved against (default: the data file's folder)."""
    n_examples: int = 4000
    """Size of the "toy" restore set."""
    steps: int = 150
    """Optimiser steps."""
    batch_size: int = 16
    """Examples per step."""
    ckpt_every: int = 50
    """Save a Lightning checkpoint (and last.ckpt) every this many steps; a rerun resumes from last.ckpt."""
    seed: int = 0
    """Seed of the batch order and of the "toy" restore set."""
    trainable: str = "language_model"
    """What trains: "all", "language_model" (decoder + lm_head; LLaVA's vision tower and projector stay frozen),
    "attention" (the q/k/v/o projections of every layer), "mlp" (every layer's MLP), "pruned_layers" (the
    decoder layers that hold a pruned head: what a single GPU can fine-tune of a 7B model with AdamW) or
    "not_pruned_attention" (the language model except the attention of layers that hold a pruned head)."""
    precision: str = "32-true"
    """Lightning precision ("32-true", "bf16-mixed", ...)."""
    optim: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(lr=3e-4, warmup_steps=10, grad_clip=1.0))
    """Optimiser and schedule (llava_circuits.finetune.FinetuneConfig)."""


@dataclass
class PruningConfig:
    """Localize, select, prune, fine-tune, evaluate: every setting of `llava-circuits prune ...`."""

    bbq: str | None = None
    """BBQ data the heads are localized on (a category .jsonl or a folder of them, official format)."""
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    """Which Context Influence score (pruning/influence.py)."""
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)
    """How activations are collected and correlated (pruning/localize.py)."""
    select: SelectConfig = field(default_factory=SelectConfig)
    """Head voting and the alpha schedule (pruning/select.py)."""
    mode: str = "gate"
    """"gate" (per-head gate on o_proj's input) or "qkv" (the reference's Q/K/V row scaling); pruning/prune.py."""
    finetune: RestoreConfig = field(default_factory=RestoreConfig)
    """The utility-restoring fine-tuning."""
    benchmarks: dict[str, BenchmarkSpec] = field(default_factory=dict)
    """Name -> benchmark, evaluated before pruning, after pruning and after fine-tuning."""
    eval_batch_size: int = 8
    """Samples per batch in the evaluations."""
    localize_after: bool = True
    """Also localize the pruned and fine-tuned model (bias_localization_after/)."""


def load_config(path: str | Path | None = None) -> PruningConfig:
    """PruningConfig from a YAML file (missing keys keep their defaults, unknown keys are errors)."""
    raw = yaml.safe_load(Path(path).read_text()) if path else {}
    return from_dict(PruningConfig, raw or {}, str(path))


def from_dict(cls, raw: dict, where: str):
    """An instance of dataclass `cls` from a mapping, recursing into nested dataclasses and dicts of them."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    return cls(**{k: _value(hints[k], v, f"{where}:{k}") for k, v in raw.items()})


def _value(hint, value, where: str):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value, where)
    if typing.get_origin(hint) is dict and isinstance(value, dict):
        inner = typing.get_args(hint)[1]
        return {k: _value(inner, v, f"{where}.{k}") for k, v in value.items()}
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def to_dict(config) -> dict:
    """The JSON/YAML-able form of a config (for run records and artifact configs)."""
    return dataclasses.asdict(config)
