"""Typed configs of the attention commands, read from one section of a YAML file (configs/*/attention.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TypeVar

import yaml

T = TypeVar("T")


@dataclass
class ExtractConfig:
    """What `attention extract` records, how it aggregates, and how it draws."""

    steps: str | list[int] = "all"
    """Generation steps to keep: "all", a list, "3", "0,2,5" or an inclusive range "0-4". Step 0 is the
    prompt's last token (it produces the first answer token); step t > 0 is the t-th generated token."""
    layers: str | list[int] = "all"
    """Decoder layers (0-based, transformers' numbering), same syntax as steps; only these switch to eager."""
    heads: str | list[int] = "all"
    """Attention heads (0-based), same syntax as steps."""
    over: list[str] = field(default_factory=lambda: ["heads"])
    """Axes reduced into one map: any of "steps", "layers", "heads". Without "steps", one PNG per step."""
    reduce: str = "mean"
    """"mean" or "max" over the axes in `over`."""
    sinks: bool = False
    """Mask attention-sink image tokens (robust outliers of the map, see aggregate.sink_tokens)."""
    sink_z: float = 8.0
    """Robust z-score (median / MAD) above which an image token counts as a sink."""
    relative: bool = False
    """Divide each map by the map of `baseline_prompt` on the same image (step 0, same layers and heads)."""
    baseline_prompt: str = "Write a general description of the image."
    """The generic prompt of relative attention."""
    max_new_tokens: int = 16
    """Tokens generated per prompt (greedy)."""
    alpha: float = 0.5
    """Opacity of the heatmap over the image."""
    cmap: str = "jet"
    """Matplotlib colormap of the heatmap."""


@dataclass
class HeadSearchConfig:
    """The localization-head search of Kang et al. 2025 (see heads.py)."""

    per_sample: int = 10
    """Heads selected per sample: the lowest spatial entropy among the heads past the elbow."""
    top_k: int = 3
    """How many of the most frequently selected heads are reported as the localization heads."""
    min_layer: int = 0
    """Layers below this are never selected (Kang et al.'s code skips LLaVA's first two layers)."""
    batch_size: int = 8
    """Prompts per forward when collecting attention."""
    query: str = "last"
    """Whose attention is searched: "last" (the prompt's last token, which produces the answer; Kang et al. read
    LLaVA's answer tokens) or "object" (the asked object's word in the question, where the toy looks it up)."""


def load_config(path: str | Path | None, section: str, cls: type[T], **overrides) -> T:
    """`cls` from `section` of a YAML file (missing keys keep their defaults), then non-None `overrides`."""
    raw = {}
    if path is not None:
        document = yaml.safe_load(Path(path).read_text()) or {}
        raw = document.get(section) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: {section}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    config = cls(**raw)
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
