"""Stages 3 and 4 of the toy recipe: a bias moved onto attention heads (and MLP neurons) of its own.

Stage 3 moves the stereotype (bias c) onto two heads, stage 4 the co-occurrence bias (bias b) onto two heads
and two blocks of MLP neurons, with the heads kept from writing the answer so that the bias reaches it through
the neurons only (`answer_tokens`): what a transcoder feature, which lives in the MLP, can find and switch off.
The description below is stage 3's; stage 4 runs the same phases with its own units and data.

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
    """A bias moved onto `heads` and `neurons` of its own (none of either: no such stage)."""

    heads: list[list[int]] = field(default_factory=list)
    """[[layer, head], ...] of the language model that carry the bias."""
    neurons: list[list[int]] = field(default_factory=list)
    """[[layer, first, stop], ...]: MLP neurons (input columns first..stop-1 of down_proj) that carry the bias."""
    answer_tokens: list[str] = field(default_factory=list)
    """Tokens whose readout directions (lm_head row times the final norm's weight) the heads' o_proj columns are
    kept orthogonal to, after every plant step: the heads reach those answers only through later units."""
    unlearn_steps: int = 300
    """Optimiser steps of the unlearn phase (heads gated off, ambiguous items trained "unknown")."""
    unlearn: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(lr=3e-4, warmup_steps=20, loss_per="example"))
    """Optimiser and schedule of the unlearn phase."""
    unlearn_layers: list[int] = field(default_factory=list)
    """Decoder layers of the language model that the unlearn phase trains (empty: all of it and the projector): a
    bias that one layer can take back leaves the layers below, and what they do, bit for bit as they were."""
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
    neuron_norm_penalty: float = 0.0
    """The same for the neurons: weight of each block's mean activation norm (down_proj's input slice); neurons
    that fire only where the bias applies make features of their own in a transcoder."""
    init_std: float = 0.02
    """Std of the fresh o_proj columns of the heads and down_proj columns of the neurons at the start of the plant
    phase (small: they start almost off)."""
    seed: int = 0
    """Seed of those fresh columns."""
    refine_steps: int = 0
    """Optimiser steps of a second plant phase (the same entries train), with its own schedule and data."""
    refine: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(
        lr=1e-3, warmup_steps=20, weight_decay=0.0, loss_per="example"))
    """Optimiser and schedule of the refine phase; weight_decay must be 0."""
    refine_data: dict = field(default_factory=dict)
    """ToyDataConfig fields of the refine phase that differ from stage 2's."""
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


def neuron_blocks(neurons: list[list[int]]) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = {}
    for layer, first, stop in neurons:
        out.setdefault(int(layer), []).append((int(first), int(stop)))
    return out


def gate_units(model: nn.Module, heads: list[list[int]], neurons: list[list[int]] = ()) -> contextlib.AbstractContextManager:
    """While the context is open, the heads' outputs (site layers.{i}.attn.heads, o_proj's input) and the neurons'
    activations (site layers.{i}.mlp.neurons, down_proj's input) are zero."""
    anatomy = Anatomy.of(model)

    def zero(hs: list[int]):
        keep = torch.ones(anatomy.n_heads)
        keep[hs] = 0
        return lambda act: act * keep.to(act.device, act.dtype)[:, None]  # act [n, n_heads, head_dim]

    def zero_neurons(blocks: list[tuple[int, int]]):
        keep = torch.ones(anatomy.d_mlp)
        for first, stop in blocks:
            keep[first:stop] = 0
        return lambda act: act * keep.to(act.device, act.dtype)  # act [n, d_mlp]

    edits = {f"layers.{l}.attn.heads": zero(hs) for l, hs in by_layer(heads).items()}
    edits |= {f"layers.{l}.mlp.neurons": zero_neurons(bs) for l, bs in neuron_blocks(neurons).items()}
    return intervene(model, edits, anatomy=anatomy)


def reset_unit_outputs(model: nn.Module, heads: list[list[int]], std: float, seed: int,
                       neurons: list[list[int]] = ()) -> None:
    """Fresh N(0, std) o_proj columns for the heads, then down_proj columns for the neurons (one seeded stream)."""
    anatomy, generator = Anatomy.of(model), torch.Generator().manual_seed(seed)
    d = anatomy.head_dim
    with torch.no_grad():
        for layer, hs in sorted(by_layer(heads).items()):
            w = anatomy.proj(layer, "o_proj").weight
            for h in sorted(hs):
                w[:, h * d : (h + 1) * d] = torch.randn(w.shape[0], d, generator=generator, dtype=w.dtype) * std
        for layer, blocks in sorted(neuron_blocks(neurons).items()):
            w = anatomy.proj(layer, "down_proj").weight
            for first, stop in sorted(blocks):
                w[:, first:stop] = torch.randn(w.shape[0], stop - first, generator=generator, dtype=w.dtype) * std


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


def neuron_masks(model: nn.Module, neurons: list[list[int]]) -> dict[str, torch.Tensor]:
    """Parameter name -> 0/1 mask of the entries that belong to the neurons: their gate_proj and up_proj rows and
    their down_proj columns."""
    anatomy = Anatomy.of(model)
    names = {id(p): n for n, p in model.named_parameters()}
    masks = {}
    for layer, blocks in neuron_blocks(neurons).items():
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w = anatomy.proj(layer, proj).weight
            mask = torch.zeros_like(w)
            for first, stop in blocks:
                if proj == "down_proj":
                    mask[:, first:stop] = 1
                else:
                    mask[first:stop] = 1
            masks[names[id(w)]] = mask
    return masks


def train_only_units(model: nn.Module, heads: list[list[int]], neurons: list[list[int]] = ()) -> list[RemovableHandle]:
    """Make the entries of the heads (and neurons) the only trainable ones: requires_grad on their matrices only,
    and gradient masks that zero every other entry of those matrices (until the handles are removed)."""
    masks = head_masks(model, heads) | neuron_masks(model, neurons)
    model.requires_grad_(False)
    handles = []
    for name, p in model.named_parameters():
        if name in masks:
            p.requires_grad_(True)
            handles.append(p.register_hook(lambda g, m=masks[name]: g * m))
    return handles


class SliceNormPenalty:
    """Collects, on every forward, the L2 norm per token of slices of some Linear modules' inputs.

    Plain forward pre-hooks rather than a `sites` capture: the penalty needs the activations with their graph and
    in their [batch, seq] layout, to pick the answer positions of each example."""

    def __init__(self, slices: list[tuple[nn.Module, list[slice]]]):
        self.values: list[torch.Tensor] = []

        def hook(parts: list[slice]):
            def pre(module, args):
                for part in parts:
                    self.values.append(args[0][..., part].norm(dim=-1))  # [batch, seq]
            return pre

        self.handles = [module.register_forward_pre_hook(hook(parts)) for module, parts in slices]

    def pop(self, where: torch.Tensor) -> torch.Tensor:
        """Sum over slices of the mean norm at the `where` [batch, seq] positions, over the forwards since the last pop."""
        total = torch.stack([v[where].mean() for v in self.values]).sum() if self.values else torch.zeros(())
        self.values.clear()
        return total

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class HeadNormPenalty(SliceNormPenalty):
    """Each head's output norm per token: its slice of o_proj's input."""

    def __init__(self, model: nn.Module, heads: list[list[int]]):
        anatomy = Anatomy.of(model)
        d = anatomy.head_dim
        super().__init__([(anatomy.proj(l, "o_proj"), [slice(h * d, (h + 1) * d) for h in hs])
                          for l, hs in by_layer(heads).items()])


class NeuronNormPenalty(SliceNormPenalty):
    """Each neuron block's activation norm per token: its slice of down_proj's input."""

    def __init__(self, model: nn.Module, neurons: list[list[int]]):
        anatomy = Anatomy.of(model)
        super().__init__([(anatomy.proj(l, "down_proj"), [slice(a, b) for a, b in blocks])
                          for l, blocks in neuron_blocks(neurons).items()])


class AnswerProjection:
    """Keeps the heads' o_proj columns orthogonal to the readout directions of `tokens` (lm_head rows times the
    final norm's weight, as the logits read the residual stream up to the per-token RMS scale)."""

    def __init__(self, model: nn.Module, heads: list[list[int]], tokens: list[str], tokenizer):
        self.anatomy, self.heads = Anatomy.of(model), heads
        ids = tokenizer.convert_tokens_to_ids(tokens)
        if tokenizer.unk_token_id in ids:
            raise ValueError(f"answer_tokens: {[t for t, i in zip(tokens, ids) if i == tokenizer.unk_token_id]} "
                             "are not in the tokenizer's vocabulary")
        with torch.no_grad():
            rows = self.anatomy.lm_head.weight[ids] * self.anatomy.final_norm.weight  # [k, d_model]
            self.basis = torch.linalg.qr(rows.T.double()).Q  # [d_model, k], orthonormal

    @torch.no_grad()
    def apply(self) -> None:
        d = self.anatomy.head_dim
        for layer, hs in by_layer(self.heads).items():
            w = self.anatomy.proj(layer, "o_proj").weight
            q = self.basis.to(w.dtype)
            for h in hs:
                cols = w[:, h * d : (h + 1) * d]
                cols -= q @ (q.T @ cols)


class PlantModule(FinetuneModule):
    """FinetuneModule whose loss adds `weight` x the planted heads' mean output norm and `neuron_weight` x the
    planted neurons' mean activation norm at the positions that predict answer tokens (where a localization reads
    them: the last prompt token is the first of these); with a projection, the heads' o_proj columns are projected
    after every optimiser step."""

    def __init__(self, model: nn.Module, config: FinetuneConfig, heads: list[list[int]], weight: float,
                 neurons: list[list[int]] = (), neuron_weight: float = 0.0, projection: AnswerProjection | None = None):
        super().__init__(model, config)
        self.penalty, self.weight = HeadNormPenalty(model, heads), weight
        self.neuron_penalty, self.neuron_weight = NeuronNormPenalty(model, neurons), neuron_weight
        self.projection = projection

    def training_step(self, batch, batch_idx):
        self.penalty.values.clear()
        self.neuron_penalty.values.clear()
        loss = super().training_step(batch, batch_idx)
        predicts = torch.zeros_like(batch["labels"], dtype=torch.bool)
        predicts[:, :-1] = batch["labels"][:, 1:] != -100
        n = batch["input_ids"].shape[0]
        norm = self.penalty.pop(predicts)
        self.log("train/head_norm", norm, batch_size=n)
        loss = loss + self.weight * norm
        if self.neuron_penalty.handles:
            neuron_norm = self.neuron_penalty.pop(predicts)
            self.log("train/neuron_norm", neuron_norm, batch_size=n)
            loss = loss + self.neuron_weight * neuron_norm
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.projection is not None:  # here, not in on_train_batch_end: checkpoint callbacks run before that hook
            self.projection.apply()

    def remove(self) -> None:
        self.penalty.remove()
        self.neuron_penalty.remove()
