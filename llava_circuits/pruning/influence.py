"""Context Influence (CI): how far a BBQ item's context moves the model's belief over the answer options.

The belief is the model's next-token distribution over the option letters at the answer position (the
last prompt position, after the chat template's generation prompt), renormalised over the options. The
prompt is the one the evaluation harness's `bbq` task asks: context, question, "(A) ..." option lines and
the letter instruction, in the model's own template.

Two definitions, chosen by `InfluenceConfig.variant`:

- ``context`` (the reference code's definition): CI = KL(p(options | prompt with its context) ||
  p(options | the same prompt with the context line removed)), for every item.
- ``ambig_disambig`` (the variant the reference README describes): for an ambiguous item, CI = the mean
  over its disambiguated twins of KL(p(options | twin) || p(options | ambiguous item)). Twins share the
  category, question_index, polarity, question and answer texts, and the twin's context extends the
  ambiguous one (BBQ appends the disambiguating sentence). Options are aligned by text (the "unknown"
  option by role, since its wording varies), so shuffled option orders compare correctly. Ambiguous
  items without a twin get no score and are left out of the localization.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from llava_circuits.data import prompts
from llava_circuits.data.records import Sample
from llava_circuits.evaluation.module import format_prompt
from llava_circuits.models.load import Loaded

VARIANTS = ("context", "ambig_disambig")


@dataclass
class InfluenceConfig:
    """Which Context Influence score is computed, on which items."""

    variant: str = "context"
    """"context" (KL between the prompt with and without its context) or "ambig_disambig" (KL between an
    ambiguous item and its disambiguated twins); see the module docstring."""
    conditions: list[str] = field(default_factory=lambda: ["ambig"])
    """Context conditions of the items scored by the "context" variant ("ambig", "disambig"); the
    "ambig_disambig" variant always scores the ambiguous items."""
    answer_prefix: str = ""
    """Text put before each option letter when finding its token ("A" -> tokenizer(prefix + "A")); set " " for
    a tokenizer whose answer letters carry a leading space that it does not add by itself."""
    per_category: int | None = None
    """Score at most this many items per category (the first ones in file order); None: all of them."""


def item_prompt(loaded: Loaded, sample: Sample, with_context: bool = True) -> str:
    """The harness's BBQ prompt for `sample`, in the model's template, optionally without the context line."""
    body = prompts.bbq_body(sample if with_context else replace(sample, context=None))
    return format_prompt(loaded, body, has_image=False)


def option_token_ids(tokenizer, n_options: int, prefix: str = "") -> list[int]:
    """The token that starts each option letter's answer (A, B, C, ...), one distinct id per option."""
    ids = [tokenizer(prefix + prompts.LETTERS[i], add_special_tokens=False)["input_ids"] for i in range(n_options)]
    first = [seq[0] if seq else None for seq in ids]
    if None in first or len(set(first)) != n_options:
        raise ValueError(f"option letters do not start with distinct tokens (prefix {prefix!r} gives {ids}); "
                         f"set influence.answer_prefix so that each letter is its own first token")
    return first


def kl_divergence(p: Tensor, q: Tensor, eps: float = 1e-12) -> Tensor:
    """KL(p || q) along the last axis, in nats: p, q [..., k] probabilities -> [...]."""
    p, q = p.double().clamp_min(eps), q.double().clamp_min(eps)
    return (p * (p.log() - q.log())).sum(-1)


def option_keys(sample: Sample) -> list[str]:
    """A key per option that is the same in an item and its twins: the text, or "<unknown>" for the unknown option."""
    unknown = sample.meta.get("unknown_index")
    return ["<unknown>" if i == unknown else c.strip().lower() for i, c in enumerate(sample.choices or [])]


def aligned(p: Tensor, keys: list[str], order: list[str]) -> Tensor:
    """p [k] reordered from `keys` order into `order`."""
    return p[[keys.index(k) for k in order]]


def twin_key(sample: Sample) -> tuple:
    m = sample.meta
    return (m.get("category"), m.get("question_index"), m.get("question_polarity"), sample.question,
            tuple(sorted(option_keys(sample))))


def twins(samples: list[Sample]) -> dict[int, list[int]]:
    """Ambiguous item index -> indices of its disambiguated twins (possibly empty)."""
    disambig: dict[tuple, list[int]] = {}
    for j, s in enumerate(samples):
        if s.meta.get("context_condition") == "disambig":
            disambig.setdefault(twin_key(s), []).append(j)
    out = {}
    for i, s in enumerate(samples):
        if s.meta.get("context_condition") == "ambig":
            ambig_context = (s.context or "").strip()
            out[i] = [j for j in disambig.get(twin_key(s), []) if (samples[j].context or "").startswith(ambig_context)]
    return out


def scored_items(samples: list[Sample], config: InfluenceConfig) -> list[int]:
    """Indices of the items that get a CI score (and enter the localization)."""
    if config.variant not in VARIANTS:
        raise ValueError(f"influence.variant must be one of {VARIANTS}, got {config.variant!r}")
    if config.variant == "ambig_disambig":
        return [i for i, js in twins(samples).items() if js]
    bad = sorted(set(config.conditions) - {"ambig", "disambig"})
    if bad or not config.conditions:
        raise ValueError(f"influence.conditions must be a non-empty list of 'ambig'/'disambig', got {config.conditions}")
    return [i for i, s in enumerate(samples) if s.meta.get("context_condition") in config.conditions]


def context_influence(samples: list[Sample], items: list[int], probs: Tensor, probs_without: Tensor | None,
                      variant: str) -> Tensor:
    """CI [len(items)] (float64) from option probabilities.

    probs [n_samples, k]: every sample with its context; probs_without [n_samples, k]: without it ("context"
    variant only; rows of unscored samples are ignored).
    """
    if variant == "context":
        if probs_without is None:
            raise ValueError("the 'context' variant needs the probabilities without the context")
        return kl_divergence(probs[items], probs_without[items])
    pairs = twins(samples)
    scores = []
    for i in items:
        order = option_keys(samples[i])
        ambig = probs[i]
        kls = [kl_divergence(aligned(probs[j], option_keys(samples[j]), order), ambig) for j in pairs[i]]
        scores.append(torch.stack(kls).mean())
    return torch.stack(scores) if scores else torch.zeros(0, dtype=torch.float64)
