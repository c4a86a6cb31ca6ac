"""Stage 3 of the toy recipe: the stereotype (bias c) moved onto attention heads of its own.

After stages 1-2 the stereotype runs through the same path as reading the context (find the group the
context or the stereotype names, copy its option's letter), so no head can be pruned without losing
disambiguation too (docs/pruning.md). Stage 3 gives the stereotype a path of its own, in three phases:

1. unlearn: the `heads` are gated off (their slice of o_proj's input is zeroed) while the language model
   trains on the stage-2 mix with ambiguous items answered "unknown": the rest of the model learns to do
   everything without those heads, and to carry no stereotype;
2. plant: only those heads train (their q/k/v rows and o_proj columns; every other weight stays bit-identical,
   hence no weight decay), from fresh o_proj columns, on the mix with the stereotype's training labels, with a
   penalty on their output norm so that they stay silent where the stereotype does not apply;
3. settle (optional): the whole language model trains on a mix without ambiguous items. It repairs what the
   plant cost elsewhere (a head that also fires on a disambiguated item) and brings utility to where a
   restoring fine-tune would bring it, so that a later restore measures what pruning took, not leftover
   training; with no ambiguous item there is nothing that would teach the rest of the model the stereotype.

In the exported model the heads are ordinary heads (no gate): the stereotype is a findable property of
its weights, which removing them takes away.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from llava_circuits.finetune import FinetuneConfig, FinetuneModule
from llava_circuits.models.anatomy import Anatomy
from llava_circuits.sites import intervene


@dataclass
class PlantConfig:
    """Stage 3: the stereotype moved onto `heads` (no heads: no stage 3)."""

    heads: list[list[int]] = field(default_factory=list)
    """[[layer, head], ...] of the language model that carry the stereotype."""
    unlearn_steps: int = 300
    """Optimiser steps of the unlearn phase (heads gated off, ambiguous items trained "unknown")."""
    unlearn: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(lr=3e-4, warmup_steps=20, loss_per="example"))
    """Optimiser and schedule of the unlearn phase."""
    unlearn_data: dict = field(default_factory=dict)
    """ToyDataConfig fields of the unlearn phase that differ from stage 2's."""
    plant_steps: int = 600
    """Optimiser steps of the plant phase (only the heads train)."""
    plant: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(
        lr=3e-3, warmup_steps=20, weight_decay=0.0, loss_per="example"))
    """Optimiser and schedule of the plant phase; weight_decay must be 0 (AdamW would decay the frozen rows)."""
    plant_data: dict = field(default_factory=dict)
    """ToyDataConfig fields of the plant phase that differ from stage 2's."""
    norm_penalty: float = 0.0
    """Weight, in the plant phase's loss, of the heads' mean output norm (o_proj's input slice) at the positions
    that predict answer tokens: a head kept silent where the stereotype has nothing to say fires by how strongly
    it applies, which is what a localization by activation magnitude measures."""
    init_std: float = 0.02
    """Std of the heads' fresh o_proj columns at the start of the plant phase (small: the heads start almost off)."""
    seed: int = 0
    """Seed of those fresh columns."""
    settle_steps: int = 0
    """Optimiser steps of the settle phase (the whole language model trains on items without ambiguity)."""
    settle: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(lr=3e-4, warmup_steps=20, loss_per="example"))
    """Optimiser and schedule of the settle phase."""
    settle_data: dict = field(default_factory=dict)
    """ToyDataConfig fields of the settle phase that differ from stage 2's (set `bbq_ambig: 0.0`)."""


def by_layer(heads: list[list[int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(int(layer), []).append(int(head))
    return out


def gate_heads(model: nn.Module, heads: list[list[int]]) -> contextlib.AbstractContextManager:
    """While the context is open, the heads' outputs (site layers.{i}.attn.heads, o_proj's input) are zero."""
    anatomy = Anatomy.of(model)

    def zero(hs: list[int]):
        keep = torch.ones(anatomy.n_heads)
        keep[hs] = 0
        return lambda act: act * keep.to(act.device, act.dtype)[:, None]  # act [n, n_heads, head_dim]

    return intervene(model, {f"layers.{l}.attn.heads": zero(hs) for l, hs in by_layer(heads).items()}, anatomy=anatomy)


def reset_head_outputs(model: nn.Module, heads: list[list[int]], std: float, seed: int) -> None:
    """Fresh N(0, std) o_proj columns for the heads (seeded)."""
    anatomy, generator = Anatomy.of(model), torch.Generator().manual_seed(seed)
    d = anatomy.head_dim
    with torch.no_grad():
        for layer, hs in sorted(by_layer(heads).items()):
            w = anatomy.proj(layer, "o_proj").weight
            for h in sorted(hs):
                w[:, h * d : (h + 1) * d] = torch.randn(w.shape[0], d, generator=generator, dtype=w.dtype) * std


def head_masks(model: nn.Module, heads: list[list[int]]) -> dict[str, torch.Tensor]:
    """Parameter name -> 0/1 mask of the entries that belong to the heads: their q rows, their KV group's k/v rows
    (GQA: a KV group's rows are shared by its query heads) and their o_proj columns."""
    anatomy = Anatomy.of(model)
    d, group = anatomy.head_dim, anatomy.n_heads // anatomy.n_kv_heads
    names = {id(p): n for n, p in model.named_parameters()}
    masks = {}
    for layer, hs in by_layer(heads).items():
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w = anatomy.proj(layer, proj).weight
            mask = torch.zeros_like(w)
            for h in hs:
                unit = h if proj in ("q_proj", "o_proj") else h // group
                if proj == "o_proj":
                    mask[:, unit * d : (unit + 1) * d] = 1
                else:
                    mask[unit * d : (unit + 1) * d] = 1
            masks[names[id(w)]] = mask
    return masks


def train_only_heads(model: nn.Module, heads: list[list[int]]) -> list[RemovableHandle]:
    """Make the heads' entries the only trainable ones: requires_grad on their matrices only, and gradient
    masks that zero every other entry of those matrices (until the handles are removed)."""
    masks = head_masks(model, heads)
    model.requires_grad_(False)
    handles = []
    for name, p in model.named_parameters():
        if name in masks:
            p.requires_grad_(True)
            handles.append(p.register_hook(lambda g, m=masks[name]: g * m))
    return handles


class HeadNormPenalty:
    """Collects, on every forward, each head's output norm per token (the L2 norm of its slice of o_proj's input).

    A plain o_proj pre-hook rather than a `sites` capture: the penalty needs the activations with their graph and
    in their [batch, seq] layout, to pick the answer positions of each example."""

    def __init__(self, model: nn.Module, heads: list[list[int]]):
        anatomy = Anatomy.of(model)
        d = anatomy.head_dim
        self.values: list[torch.Tensor] = []

        def hook(hs: list[int]):
            def pre(module, args):
                for h in hs:
                    self.values.append(args[0][..., h * d : (h + 1) * d].norm(dim=-1))  # [batch, seq]
            return pre

        self.handles = [anatomy.proj(l, "o_proj").register_forward_pre_hook(hook(hs)) for l, hs in by_layer(heads).items()]

    def pop(self, where: torch.Tensor) -> torch.Tensor:
        """Sum over heads of the mean norm at the `where` [batch, seq] positions, over the forwards since the last pop."""
        total = torch.stack([v[where].mean() for v in self.values]).sum()
        self.values.clear()
        return total

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class PlantModule(FinetuneModule):
    """FinetuneModule whose loss adds `weight` x the planted heads' mean output norm at the positions that predict
    answer tokens (where a localization reads them: the last prompt token is the first of these)."""

    def __init__(self, model: nn.Module, config: FinetuneConfig, heads: list[list[int]], weight: float):
        super().__init__(model, config)
        self.penalty, self.weight = HeadNormPenalty(model, heads), weight

    def training_step(self, batch, batch_idx):
        self.penalty.values.clear()
        loss = super().training_step(batch, batch_idx)
        predicts = torch.zeros_like(batch["labels"], dtype=torch.bool)
        predicts[:, :-1] = batch["labels"][:, 1:] != -100
        norm = self.penalty.pop(predicts)
        self.log("train/head_norm", norm, batch_size=batch["input_ids"].shape[0])
        return loss + self.weight * norm
