"""Localization: correlate every attention head's activation with the Context Influence of BBQ items.

One forward per item (batched, left-padded) records, at the answer position (the prompt's last token),
for every layer i and head h:

- ``attn_max``: the largest attention weight of head h over the keys (site ``layers.{i}.attn.probs``);
- ``head_norm``: the L2 norm of head h's output, the input of o_proj (site ``layers.{i}.attn.heads``);

and the option probabilities that the CI score is made of. Pearson's r between each (layer, head)
activation and CI is computed per BBQ category and over all items ("all"), each layer with its own r,
with a Fisher-z confidence interval: tanh(atanh(r) -/+ z_{(1+level)/2} / sqrt(n - 3)). A head whose
activation is constant over the items (e.g. gated to zero) has no correlation: r = 0, CI NaN.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from scipy.stats import norm
from torch import Tensor

from llava_circuits.data.records import Sample
from llava_circuits.models.load import Loaded
from llava_circuits.pruning.influence import (
    InfluenceConfig,
    context_influence,
    item_prompt,
    option_token_ids,
    scored_items,
    twins,
)
from llava_circuits.sites import capture

ACTIVATIONS = ("attn_max", "head_norm")
ALL = "all"


@dataclass
class LocalizeConfig:
    """How head activations are collected and correlated with CI."""

    batch_size: int = 8
    """Prompts per forward."""
    level: float = 0.95
    """Confidence level of the Fisher-z interval of r."""
    min_items: int = 4
    """Categories with fewer scored items get no r (NaN); Fisher's interval needs at least 4."""


@dataclass
class ItemPass:
    """What one forward per item gives: option probabilities and, optionally, per-head activations."""

    probs: Tensor  # [n, k] option probabilities at the answer position
    attn_max: Tensor | None  # [n, n_layers, n_heads] max attention weight of each head
    head_norm: Tensor | None  # [n, n_layers, n_heads] L2 norm of each head's output (o_proj input)


def encode(loaded: Loaded, texts: list[str]) -> dict[str, Tensor]:
    """Tokenize text-only prompts, padded on the left so that the last column is every prompt's last token."""
    tokenizer = loaded.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        if loaded.anatomy.family == "llava":
            inputs = loaded.processor(text=texts, images=None, return_tensors="pt", padding=True)
        else:
            inputs = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    device = next(loaded.model.parameters()).device
    return {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def item_pass(loaded: Loaded, samples: list[Sample], with_context: bool = True, heads: bool = True,
              batch_size: int = 8, answer_prefix: str = "") -> ItemPass:
    """Option probabilities of every sample, and (heads=True) every head's activations, one forward each."""
    a = loaded.anatomy
    k = len(samples[0].choices or []) if samples else 3
    option_ids = option_token_ids(loaded.tokenizer, k, answer_prefix)
    sites = [f"layers.{i}.attn.{s}" for i in range(a.n_layers) for s in ("probs", "heads")] if heads else []
    probs, attn_max, head_norm = [], [], []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        if any(len(s.choices or []) != k for s in batch):
            raise ValueError(f"all items need {k} options; {[s.id for s in batch if len(s.choices or []) != k]} differ")
        inputs = encode(loaded, [item_prompt(loaded, s, with_context) for s in batch])
        with capture(loaded.model, sites, positions="prompt_last", anatomy=a) as cap:
            logits = loaded.model(**inputs).logits[:, -1].float()  # [batch, vocab]
        probs.append(torch.softmax(logits[:, option_ids], -1).cpu())  # [batch, k]
        if heads:
            attn_max.append(torch.stack([cap[f"layers.{i}.attn.probs"][:, -1].float().amax(-1)
                                         for i in range(a.n_layers)], 1).cpu())  # [batch, n_layers, n_heads]
            head_norm.append(torch.stack([cap[f"layers.{i}.attn.heads"][:, -1].float().norm(dim=-1)
                                          for i in range(a.n_layers)], 1).cpu())  # [batch, n_layers, n_heads]
    if not heads:
        return ItemPass(torch.cat(probs), None, None)
    return ItemPass(torch.cat(probs), torch.cat(attn_max), torch.cat(head_norm))


def pearson(x: Tensor, y: Tensor) -> Tensor:
    """Pearson r of each column of x [n, ...] with y [n], in float64; a constant column gives 0."""
    x, y = x.double(), y.double()
    xc = x - x.mean(0)
    yc = (y - y.mean()).reshape(-1, *([1] * (x.ndim - 1)))
    cov = (xc * yc).sum(0)
    scale = (xc.square().sum(0) * yc.square().sum()).sqrt()
    r = torch.where(scale > 0, cov / scale.clamp_min(1e-300), torch.zeros_like(cov))
    return r.clamp(-1.0, 1.0)


def fisher_interval(r: Tensor, n: int, level: float = 0.95) -> tuple[Tensor, Tensor]:
    """(low, high) confidence bounds of Pearson r from n pairs, by Fisher's z-transform; NaN when n < 4."""
    if n < 4:
        nan = torch.full_like(r, math.nan)
        return nan, nan
    z = torch.atanh(r.clamp(-1 + 1e-15, 1 - 1e-15))
    half = norm.ppf(0.5 + level / 2) / math.sqrt(n - 3)
    return torch.tanh(z - half), torch.tanh(z + half)


@dataclass
class Localization:
    """Pearson r of each head's activation with CI, per category, with confidence intervals."""

    activations: list[str]  # names of the activation axis (ACTIVATIONS)
    categories: list[str]  # "all" first, then each BBQ category
    r: Tensor  # [n_activations, n_categories, n_layers, n_heads]
    low: Tensor  # [n_activations, n_categories, n_layers, n_heads] lower confidence bound
    high: Tensor  # [n_activations, n_categories, n_layers, n_heads] upper confidence bound
    n: Tensor  # [n_categories] items behind each r
    level: float = 0.95
    items: list[dict] = field(default_factory=list)  # per scored item: id, category, condition, ci, probs
    model: dict = field(default_factory=dict)  # the ModelFingerprint (as a dict) of the model localized

    def get(self, activation: str, category: str = ALL) -> Tensor:
        """r [n_layers, n_heads] of one activation and category."""
        return self.r[self.activations.index(activation), self.categories.index(category)]

    def save(self, out: str | Path) -> Path:
        """correlations.safetensors, localization.json and influence.jsonl into `out` (each written atomically)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"r": self.r, "low": self.low, "high": self.high, "n": self.n}
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        _atomic(out / "correlations.safetensors", lambda p: save_file(tensors, str(p)))
        meta = {"activations": self.activations, "categories": self.categories, "level": self.level,
                "n": dict(zip(self.categories, self.n.tolist())), "model": self.model, "top_heads": self.top_heads()}
        _atomic(out / "localization.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
        lines = "".join(json.dumps(item) + "\n" for item in self.items)
        _atomic(out / "influence.jsonl", lambda p: p.write_text(lines))
        return out

    @classmethod
    def load(cls, folder: str | Path) -> Localization:
        folder = Path(folder)
        meta = json.loads((folder / "localization.json").read_text())
        t = load_file(folder / "correlations.safetensors")
        items_path = folder / "influence.jsonl"
        items = [json.loads(line) for line in items_path.read_text().splitlines()] if items_path.exists() else []
        return cls(meta["activations"], meta["categories"], t["r"], t["low"], t["high"], t["n"], meta["level"], items,
                   meta.get("model", {}))

    def top_heads(self, k: int = 10) -> list[dict]:
        """The k heads with the largest |r| over all items, per activation."""
        out = []
        for a in self.activations:
            r = self.get(a).nan_to_num()
            for flat in r.abs().flatten().argsort(descending=True)[:k].tolist():
                layer, head = divmod(flat, r.shape[1])
                out.append({"activation": a, "layer": layer, "head": head, "r": round(float(r[layer, head]), 4)})
        return out


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


def correlate(acts: dict[str, Tensor], ci: Tensor, categories: list[str], config: LocalizeConfig) -> Localization:
    """Localization from activations {name: [n, n_layers, n_heads]} and CI [n] of items in `categories` [n]."""
    names = [ALL] + sorted(set(categories))
    r, low, high, counts = [], [], [], []
    for name in names:
        rows = torch.tensor([name == ALL or c == name for c in categories])
        n = int(rows.sum())
        counts.append(n)
        per_act = []
        for a in acts:
            if n < config.min_items:
                nan = torch.full(acts[a].shape[1:], math.nan, dtype=torch.float64)
                per_act.append((nan, nan, nan))
                continue
            x = acts[a][rows]  # [n, n_layers, n_heads]
            rr = pearson(x, ci[rows])
            lo, hi = fisher_interval(rr, n, config.level)
            # nothing to correlate (a constant activation, or a constant CI): r = 0 by convention, no interval
            constant = (x == x[:1]).all(0) | bool((ci[rows] == ci[rows][0]).all())
            per_act.append((rr, lo.masked_fill(constant, math.nan), hi.masked_fill(constant, math.nan)))
        r.append(torch.stack([p[0] for p in per_act]))
        low.append(torch.stack([p[1] for p in per_act]))
        high.append(torch.stack([p[2] for p in per_act]))
    r, low, high = (torch.stack(xs, 1).float() for xs in (r, low, high))  # [n_activations, n_categories, L, H]
    return Localization(list(acts), names, r, low, high, torch.tensor(counts), config.level)


def localize(loaded: Loaded, samples: list[Sample], influence: InfluenceConfig | None = None,
             config: LocalizeConfig | None = None) -> Localization:
    """CI of the scored BBQ items and the correlation of every head's activation with it."""
    influence, config = influence or InfluenceConfig(), config or LocalizeConfig()
    items = limit_per_category(samples, scored_items(samples, influence), influence.per_category)
    if len(items) < config.min_items:
        raise ValueError(f"only {len(items)} BBQ items can be scored with variant {influence.variant!r} "
                         f"(conditions {influence.conditions}); need at least {config.min_items}")
    needed = items
    if influence.variant == "ambig_disambig":  # the twins' probabilities are needed too
        pairs = twins(samples)
        needed = sorted(set(items) | {j for i in items for j in pairs[i]})
    subset = [samples[i] for i in needed]
    where = {i: pos for pos, i in enumerate(needed)}
    run = item_pass(loaded, subset, True, True, config.batch_size, influence.answer_prefix)
    without = None
    if influence.variant == "context":
        without = item_pass(loaded, subset, False, False, config.batch_size, influence.answer_prefix).probs
    local = [where[i] for i in items]
    ci = context_influence(subset, local, run.probs, without, influence.variant)  # [n_items]
    acts = {"attn_max": run.attn_max[local], "head_norm": run.head_norm[local]}
    cats = [samples[i].meta.get("category", "unknown") for i in items]
    loc = correlate(acts, ci, cats, config)
    loc.model = dataclasses.asdict(loaded.fingerprint())
    loc.items = [{"id": samples[i].id, "category": c, "condition": samples[i].meta.get("context_condition"),
                  "ci": float(v), "probs": [round(float(p), 6) for p in run.probs[where[i]]]}
                 for i, c, v in zip(items, cats, ci)]
    return loc


def limit_per_category(samples: list[Sample], items: list[int], per_category: int | None) -> list[int]:
    """The first `per_category` items of each category (all when None), in their original order."""
    if per_category is None:
        return items
    seen: dict[str, int] = {}
    kept = []
    for i in items:
        c = samples[i].meta.get("category", "unknown")
        if seen.get(c, 0) < per_category:
            seen[c] = seen.get(c, 0) + 1
            kept.append(i)
    return kept


def plot_heatmaps(loc: Localization, out: str | Path, marked: list[tuple[int, int]] = (), title: str = "") -> list[Path]:
    """One PNG per activation: r per (layer, head) for all items and each category; `marked` heads outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for a, name in enumerate(loc.activations):
        n_cat = len(loc.categories)
        fig, axes = plt.subplots(1, n_cat, figsize=(3.2 * n_cat + 1, 3.5), squeeze=False)
        for c, category in enumerate(loc.categories):
            ax = axes[0, c]
            image = ax.imshow(loc.r[a, c].T.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", origin="lower")
            for layer, head in marked:
                ax.add_patch(matplotlib.patches.Rectangle((layer - 0.5, head - 0.5), 1, 1, fill=False, lw=2, ec="k"))
            ax.set_title(f"{category} (n={int(loc.n[c])})", fontsize=9)
            ax.set_xlabel("layer")
            ax.set_ylabel("head")
        fig.colorbar(image, ax=axes[0].tolist(), label=f"Pearson r ({name} vs CI)")
        fig.suptitle(title or f"r of {name} with context influence")
        path = out / f"r_{name}.png"
        fig.savefig(path.with_name(f".{path.name}.tmp.png"), dpi=100)
        plt.close(fig)
        path.with_name(f".{path.name}.tmp.png").replace(path)
        paths.append(path)
    return paths
