"""The feature-discovery recipe: one YAML file (configs/*/features.yaml) read into typed dataclasses.

Defaults are the toy world's; configs/toy/features.yaml spells them out and configs/llava15_7b/features.yaml
is the LLaVA-1.5-7B recipe. Each `features` command reads the section it needs and lets flags override it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llava_circuits.pruning.config import from_dict

TAGS = ("image", "prompt", "generated")
"""What a captured position is: an image token, a prompt text token, or a generated token."""
READ_TAGS = TAGS + ("prompt_last",)
"""Tags analyze and steer accept: the captured ones, and "prompt_last", the last prompt position (the one whose
output is the first answer token, where a one-word answer is decided)."""


@dataclass
class CaptureConfig:
    """How a benchmark run is captured through the replacement model."""

    error_term: bool = False
    """Keep each MLP's own output and add only the effect of feature edits (answers are the original model's);
    False replaces the MLPs by the transcoders, as the reference pipeline does."""
    layers: list[int] | None = None
    """Layers whose features are stored (None: every layer of the transcoder set)."""
    tags: list[str] = field(default_factory=lambda: list(TAGS))
    """Positions stored, by tag: image, prompt, generated."""
    value_dtype: str = "float32"
    """Stored activation values: float32, float16 or bfloat16."""
    batch_size: int = 8
    """Samples per generate call."""
    max_new_tokens: int | None = None
    """Generation length (None: the benchmark's)."""


@dataclass
class Rule:
    """GOOD / BAD from one per-sample official metric: comparisons like ">= 1" (samples matching neither are left out)."""

    metric: str
    """Per-sample metric key (accuracy, cover, chair_i, correct, ...), as classify's per-sample results name it."""
    good: str = ">= 1"
    """Comparison a GOOD sample's metric satisfies."""
    bad: str = "< 1"
    """Comparison a BAD sample's metric satisfies."""
    gold: list[str] | None = None
    """Only samples whose gold answer is one of these (POPE ["no"]: questions about absent objects, where a wrong
    answer is a hallucination); the others are "neither". None: every sample."""


def default_rules() -> dict[str, Rule]:
    return {
        "pope": Rule("accuracy"), "scienceqa": Rule("accuracy"), "bbq": Rule("correct"),
        "amber": Rule("cover"), "chair": Rule("chair_i", good="<= 0", bad="> 0"),
    }


@dataclass
class ClassifyConfig:
    """GOOD / BAD rules per benchmark."""

    rules: dict[str, Rule] = field(default_factory=default_rules)
    """Benchmark -> rule (pope: correct; amber: full coverage; scienceqa: correct; ...)."""
    min_class_size: int = 50
    """Warn when GOOD or BAD has fewer samples than this."""


@dataclass
class AnalyzeConfig:
    """Per-feature GOOD / BAD statistics, the significance test and the round-robin selection."""

    tags: list[str] = field(default_factory=lambda: list(TAGS))
    """Positions a sample's activations are read at, by tag (READ_TAGS: "prompt_last" is the answer's position)."""
    pool: str = "mean"
    """A feature's activation in a sample: "mean" over the sample's read positions (zeros included) or "max"."""
    epsilon: float = 1e-3
    """Added to denominators of the ratios (frequency_ratio, activation_ratio, goodness_score)."""
    test: str = "fisher"
    """"fisher" (two-sided exact test on active / inactive x GOOD / BAD samples) or "log_odds" (log odds ratio with
    a prior, normal approximation)."""
    prior: float = 0.5
    """log_odds: pseudo-count added to each of the four cells."""
    alpha: float = 0.05
    """Benjamini-Hochberg false discovery rate a selected feature must pass (1.0: no significance filter)."""
    target_features: int = 200
    """Upper bound on the selected features (per direction: good and bad)."""
    min_per_layer: int = 5
    """The first this-many round-robin rounds are completed whole, so each layer with enough significant
    candidates gives at least this many features, even past target_features."""


@dataclass
class MapConfig:
    """Feature -> MLP neuron mapping."""

    top_k: int = 50
    """Neurons reported per feature (and per method)."""
    coactivation: str | None = None
    """Folder of co-activation statistics written during transcoder training (layer_{i}.safetensors), if any."""


@dataclass
class SteerConfig:
    """Which selected features are steered, and how."""

    which: str = "bad"
    """Steer the "good" or the "bad" selected features."""
    top: int = 20
    """How many of them, in the selection's order (round-robin across layers)."""
    op: str = "scale"
    """"scale" (activation x value), "add" (activation + value) or "clamp" (activation set to value)."""
    value: float = 0.0
    """The factor, offset or clamp value."""
    where: str = "fires"
    """"fires": only where the feature is active; "all": at every steered position (add and clamp)."""
    tags: list[str] = field(default_factory=lambda: list(TAGS))
    """Positions steered, by tag (READ_TAGS: "prompt_last" steers the prefill's last prompt position only)."""
    transcoders_in_loop: bool = False
    """True: edit the features in the replacement model (MLPs replaced by the transcoders); False: the original
    model plus the change (decoder direction x activation change) at the MLP output where the feature fires."""


@dataclass
class DemoConfig:
    """The demo stage `features` (toy only)."""

    discovery_seed: int = 4242
    """Seed of the toy data the features are discovered on (the stage measures on the demo's own data)."""
    discovery_limit: int | None = None
    """Capture at most this many POPE-adversarial samples for discovery (None: all)."""
    random_seed: int = 0
    """Seed of the random features the selection is compared with."""


@dataclass
class FeaturesConfig:
    """Every setting of `llava-circuits features ...`."""

    capture: CaptureConfig = field(default_factory=CaptureConfig)
    """features capture."""
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    """features classify."""
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    """features analyze."""
    map: MapConfig = field(default_factory=MapConfig)
    """features map."""
    steer: SteerConfig = field(default_factory=SteerConfig)
    """features steer."""
    demo: DemoConfig = field(default_factory=DemoConfig)
    """The demo stage."""


def load_config(path: str | Path | None = None) -> FeaturesConfig:
    """FeaturesConfig from a YAML file (missing keys keep their defaults, unknown keys are errors)."""
    raw = yaml.safe_load(Path(path).read_text()) if path else {}
    cfg = from_dict(FeaturesConfig, raw or {}, str(path))
    check(cfg)
    return cfg


def check(cfg: FeaturesConfig) -> None:
    for name, tags, known in (("capture.tags", cfg.capture.tags, TAGS), ("analyze.tags", cfg.analyze.tags, READ_TAGS),
                              ("steer.tags", cfg.steer.tags, READ_TAGS)):
        bad = sorted(set(tags) - set(known))
        if bad:
            raise ValueError(f"{name}: unknown tag(s) {bad}; known: {list(known)}")
    for bench, rule in cfg.classify.rules.items():
        odd = [g for g in rule.gold or [] if not isinstance(g, str)]
        if odd:  # YAML reads a bare no / yes as a boolean
            raise ValueError(f"classify.rules.{bench}.gold: {odd} are not strings; quote them, e.g. gold: [\"no\"]")
    choices = [("analyze.pool", cfg.analyze.pool, ("mean", "max")), ("analyze.test", cfg.analyze.test, ("fisher", "log_odds")),
               ("steer.which", cfg.steer.which, ("good", "bad")), ("steer.op", cfg.steer.op, ("scale", "add", "clamp")),
               ("steer.where", cfg.steer.where, ("fires", "all")),
               ("capture.value_dtype", cfg.capture.value_dtype, ("float32", "float16", "bfloat16"))]
    for name, value, allowed in choices:
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def override(section, **values):
    """A config section with the non-None values replaced."""
    return dataclasses.replace(section, **{k: v for k, v in values.items() if v is not None})
