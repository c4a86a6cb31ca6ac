"""SteerFair: per-head directions of answer-position bias, found by PCA on demonstrations, steered away from.

Method (after Adila et al. 2024, "Discovering Bias in Latent Space", applied per attention head):

1. Demonstrations. For every multiple-choice question, every cyclic permutation of its options and
   every rule "the answer is at position X", the prompt is the model's own prompt followed by
   " (X) <option at X>" after "ASSISTANT:". No gold labels are used.
2. Activations. The input of o_proj (site `layers.{i}.attn.heads`, one slice per head) at the last
   token, all layers and heads in one forward per batch.
3. PCA per (layer, head, rule) on the rule's activations, centred, in float64: the first principal
   component is the rule's direction and its explained-variance ratio is kept. PCA leaves the sign
   open; here each component is oriented so that the rule's mean activation projects on it
   non-negatively.
4. Head importance = mean over rules of the first component's explained-variance ratio.
5. One bias direction per head, from its rule directions d_1..d_R:
   "qr": Q of the QR decomposition of [d_1 ... d_R] (signs fixed so R's diagonal is >= 0, i.e.
   Gram-Schmidt in rule order), averaged over its columns; "mean": the mean of the d_r; "svd": the
   right singular vectors of the stacked d_r (each oriented towards sum_r d_r), averaged. The result
   is scaled to unit norm.
6. Steering, on the INPUT of o_proj (where a head is still a head), for the top_k heads (global or
   per layer), at `positions` ("last": the prompt's last token at prefill and every decoded token):
       form "add":      h' = h - alpha * d
       form "project":  h' = h - alpha * (h . d) d
   then h' is rescaled to the norm of h:  h' <- h' * ||h|| / ||h'||.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from llava_circuits.artifacts import check_compatible, read_artifact, write_artifact
from llava_circuits.data import prompts
from llava_circuits.data.permutations import permute
from llava_circuits.data.records import Sample
from llava_circuits.models.load import Loaded
from llava_circuits.sites import intervene
from llava_circuits.steering.base import Intervention

COMBINE_MODES = ("qr", "mean", "svd")
FORMS = ("add", "project")


@dataclass
class SteerFairConfig:
    """Which heads SteerFair steers, and how hard."""

    top_k: int = 2
    """Heads to steer: the top_k most important of the model, or of each layer with per_layer."""
    per_layer: bool = False
    """Pick top_k heads in every layer instead of top_k overall."""
    alpha: float = 1.0
    """Step along the unit bias direction d (see form); in units of the head's activation."""
    combine: str = "qr"
    """How a head's rule directions become one: qr (QR basis, averaged), mean, or svd."""
    form: str = "add"
    """add: h - alpha * d; project: h - alpha * (h . d) d. Both are renormalised to ||h||."""
    positions: str = "last"
    """Where to steer (a sites.py selector): last = the prompt's last token, then every decoded token."""
    permutations: bool = True
    """Demonstrations from every cyclic permutation of the options (else the shown order only)."""

    def __post_init__(self) -> None:
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {self.combine!r}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")


# --- demonstrations ---------------------------------------------------------------------------------

@dataclass
class Demo:
    """One demonstration prompt: a question with the option at position `rule` appended as the answer."""

    id: str
    """Sample id, permutation and rule: "{id}@p{k}#{letter}"."""
    text: str
    """The full prompt, ending in " (X) <option text>"."""
    image: Path | None
    rule: int
    """The answer position X (0 = A) this demonstration shows."""


def demonstrations(loaded: Loaded, samples: Sequence[Sample], permutations: bool = True) -> list[Demo]:
    """Demonstrations of every rule "answer = position X" for every (cyclically permuted) question."""
    from llava_circuits.evaluation.module import format_prompt

    demos = []
    for sample in samples:
        if not sample.choices or not isinstance(sample.answer, int):
            raise ValueError(f"sample {sample.id!r}: SteerFair demonstrations need multiple-choice samples")
        n = len(sample.choices)
        for k in range(n) if permutations else [0]:
            shown = permute(sample, k)
            prompt = format_prompt(loaded, prompts.multiple_choice_body(shown), shown.image is not None)
            for x, choice in enumerate(shown.choices):
                letter = prompts.LETTERS[x]
                demos.append(Demo(f"{sample.id}@p{k}#{letter}", f"{prompt} ({letter}) {choice}", shown.image, x))
    return demos


# --- fitting: PCA per (layer, head, rule), importance, combination ----------------------------------

def rule_pca(acts: Tensor, rules: Tensor, n_rules: int) -> tuple[Tensor, Tensor]:
    """First principal component and its explained-variance ratio per (layer, head, rule), in float64.

    acts: [n, n_layers, n_heads, head_dim]; rules: [n] rule index of each demonstration.
    Returns components [n_layers, n_heads, n_rules, head_dim] (unit norm, oriented so the rule's mean
    activation projects non-negatively) and ratios [n_layers, n_heads, n_rules].
    """
    components, ratios = [], []
    for r in range(n_rules):
        x = acts[rules == r].double()  # [n_r, L, H, hd]
        if len(x) < 2:
            raise ValueError(f"rule {prompts.LETTERS[r]} has {len(x)} demonstration(s); PCA needs at least 2")
        mean = x.mean(0)  # [L, H, hd]
        centred = (x - mean).permute(1, 2, 0, 3)  # [L, H, n_r, hd]
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)  # s [L, H, k], vh [L, H, k, hd]
        v = vh[..., 0, :]  # [L, H, hd]
        sign = torch.where((v * mean).sum(-1) < 0, -1.0, 1.0).to(v)
        components.append(v * sign[..., None])
        power = (s**2).sum(-1)
        ratios.append(torch.where(power > 0, s[..., 0] ** 2 / power.clamp_min(1e-300), torch.zeros_like(power)))
    return torch.stack(components, dim=2), torch.stack(ratios, dim=2)


def combine_directions(rule_dirs: Tensor, mode: str = "qr") -> Tensor:
    """One unit direction per head from its rule directions: [..., n_rules, head_dim] -> [..., head_dim]."""
    d = rule_dirs.double()
    if mode == "mean":
        combined = d.mean(-2)
    elif mode == "qr":
        q, r = torch.linalg.qr(d.transpose(-1, -2))  # q [..., hd, R], r [..., R, R]
        sign = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q)
        combined = (q * sign[..., None, :]).mean(-1)
    elif mode == "svd":
        _, _, vh = torch.linalg.svd(d, full_matrices=False)  # [..., R, hd]
        sign = torch.where((vh * d.sum(-2, keepdim=True)).sum(-1) < 0, -1.0, 1.0).to(vh)
        combined = (vh * sign[..., None]).mean(-2)
    else:
        raise ValueError(f"combine must be one of {COMBINE_MODES}, got {mode!r}")
    return combined / combined.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def top_heads(importance: Tensor, k: int, per_layer: bool = False) -> list[tuple[int, int]]:
    """(layer, head) of the k most important heads overall, or of each layer; sorted by (layer, head)."""
    n_layers, n_heads = importance.shape
    if per_layer:
        k = min(k, n_heads)
        return sorted((i, int(h)) for i in range(n_layers) for h in importance[i].topk(k).indices)
    flat = importance.flatten().topk(min(k, importance.numel())).indices
    return sorted((int(f) // n_heads, int(f) % n_heads) for f in flat)


def steer_heads(act: Tensor, directions: Tensor, alpha: float, form: str) -> Tensor:
    """act [n, n_heads, head_dim] with each head moved away from its unit direction (a row of [n_heads, head_dim])
    and rescaled to its old norm. A head whose direction row is zero comes out bit for bit (x - 0 = x, and its
    norm ratio is exactly 1), so no mask is needed: fewer ops at every decoding step."""
    x = act if act.dtype == torch.float32 else act.float()
    if form == "add":
        new = x - alpha * directions
    else:
        new = torch.addcmul(x, torch.linalg.vecdot(x, directions)[..., None], directions, value=-alpha)
    new = new * (torch.linalg.vector_norm(x, dim=-1, keepdim=True)
                 / torch.linalg.vector_norm(new, dim=-1, keepdim=True).clamp_min(1e-12))
    return new if new.dtype == act.dtype else new.to(act.dtype)


# --- the intervention -------------------------------------------------------------------------------

class SteerFair(Intervention):
    """Per-head bias directions from demonstrations, steered away from on the input of o_proj."""

    kind = "steerfair"

    def __init__(self, rule_directions: Tensor, explained: Tensor, config: SteerFairConfig | None = None,
                 fingerprint=None, info: dict | None = None):
        """rule_directions [n_layers, n_heads, n_rules, head_dim], explained [n_layers, n_heads, n_rules]."""
        self.config = config or SteerFairConfig()
        self.rule_directions = rule_directions.double()
        self.explained = explained.double()
        self.directions = combine_directions(self.rule_directions, self.config.combine)  # [L, H, hd]
        self.importance = self.explained.mean(-1)  # [L, H]
        self.heads = top_heads(self.importance, self.config.top_k, self.config.per_layer)
        self.fingerprint = fingerprint
        self.info = dict(info or {})
        self._stack: contextlib.ExitStack | None = None

    @classmethod
    def fit(cls, acts: Tensor, rules: Tensor, config: SteerFairConfig | None = None, fingerprint=None) -> "SteerFair":
        """Fit on activations [n, n_layers, n_heads, head_dim] of demonstrations with rule indices [n]."""
        n_rules = int(rules.max()) + 1
        directions, explained = rule_pca(acts, rules, n_rules)
        info = {"demonstrations": len(rules), "rules": n_rules,
                "per_rule": [int((rules == r).sum()) for r in range(n_rules)]}
        return cls(directions, explained, config, fingerprint, info)

    def with_config(self, **changes) -> "SteerFair":
        """The same fit with other steering settings (top_k, alpha, per_layer, combine, form, positions)."""
        config = dataclasses.replace(self.config, **{k: v for k, v in changes.items() if v is not None})
        return SteerFair(self.rule_directions, self.explained, config, self.fingerprint, self.info)

    def edits(self, device=None) -> dict:
        """sites.intervene edits: one function per layer that holds a steered head."""
        alpha, form = self.config.alpha, self.config.form
        n_heads = self.directions.shape[1]

        def edit_for(dirs: Tensor):
            def edit(act: Tensor) -> Tensor:  # [n, n_heads, head_dim] at the selected positions
                return steer_heads(act, dirs, alpha, form)
            return edit

        edits = {}
        for layer in sorted({layer for layer, _ in self.heads}):
            chosen = torch.zeros(n_heads, dtype=torch.bool)
            chosen[[h for i, h in self.heads if i == layer]] = True
            dirs = torch.where(chosen[:, None], self.directions[layer], 0.0).float()  # [n_heads, hd], 0 if not chosen
            edits[f"layers.{layer}.attn.heads"] = edit_for(dirs.to(device))
        return edits

    def attach(self, loaded: Loaded) -> None:
        if self._stack is not None:
            raise RuntimeError("SteerFair is already attached; detach it first")
        stack = contextlib.ExitStack()
        device = next(loaded.model.parameters()).device
        stack.enter_context(intervene(loaded.model, self.edits(device), positions=self.config.positions,
                                      anatomy=loaded.anatomy))
        self._stack = stack

    def detach(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def describe(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self.config), "heads": [list(h) for h in self.heads],
                "importance": {f"{i}.{h}": round(float(self.importance[i, h]), 4) for i, h in self.heads}, **self.info}

    def save(self, path: str | Path) -> Path:
        if self.fingerprint is None:
            raise ValueError("SteerFair.save needs the model fingerprint it was fitted on (fit(..., fingerprint=...))")
        tensors = {"steerfair": {
            "rule_directions": self.rule_directions.float(), "explained_variance_ratio": self.explained.float(),
            "directions": self.directions.float(), "importance": self.importance.float(),
            "heads": torch.tensor(self.heads, dtype=torch.long).reshape(-1, 2),
        }}
        config = {**dataclasses.asdict(self.config), **self.info}
        return write_artifact(path, self.kind, self.fingerprint, tensors, config).path

    @classmethod
    def load(cls, path: str | Path, loaded: Loaded) -> "SteerFair":
        artifact = read_artifact(path, expected_kind=cls.kind)
        check_compatible(artifact, loaded.fingerprint())
        fields = {f.name for f in dataclasses.fields(SteerFairConfig)}
        config = SteerFairConfig(**{k: v for k, v in artifact.config.items() if k in fields})
        info = {k: v for k, v in artifact.config.items() if k not in fields}
        t = artifact.tensors("steerfair")
        return cls(t["rule_directions"], t["explained_variance_ratio"], config, loaded.fingerprint(), info)


# --- plots ------------------------------------------------------------------------------------------

def kde_plots(acts: Tensor, rules: Tensor, importance: Tensor, out: str | Path, n_heads: int = 4) -> Path:
    """KDE of each top head's activations projected on their first two principal components, by rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy.stats import gaussian_kde

    heads = sorted(top_heads(importance, n_heads), key=lambda lh: -float(importance[lh]))
    fig, axes = plt.subplots(1, len(heads), figsize=(4 * len(heads), 4), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (layer, head) in zip(axes[0], heads):
        x = acts[:, layer, head].double()
        centred = x - x.mean(0)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        xy = (centred @ vh[:2].T).numpy()  # [n, 2]
        grid = np.mgrid[xy[:, 0].min():xy[:, 0].max():80j, xy[:, 1].min():xy[:, 1].max():80j]
        for r in range(int(rules.max()) + 1):
            pts = xy[(rules == r).numpy()]
            label = f"answer {prompts.LETTERS[r]}"
            try:
                density = gaussian_kde(pts.T)(grid.reshape(2, -1)).reshape(grid.shape[1:])
                ax.contour(grid[0], grid[1], density, levels=5, colors=[colours(r)], linewidths=1)
                ax.plot([], [], color=colours(r), label=label)
            except (np.linalg.LinAlgError, ValueError):  # too few or collinear points: show them instead
                ax.scatter(pts[:, 0], pts[:, 1], s=6, color=colours(r), label=label)
        ax.set_title(f"layer {layer} head {head} (importance {float(importance[layer, head]):.2f})")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out) / "kde_top_heads.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


# --- commands and the demo stage --------------------------------------------------------------------

RUN_DEFAULTS = {"model": None, "quantization": None, "dtype": "auto", "batch_size": 8, "limit": None, "images": None}


def steerfair_fit(data: str, out: str, model: str | None = None, config: str | None = None,
                  images: str | None = None, limit: int | None = None, batch_size: int | None = None,
                  quantization: str | None = None, dtype: str | None = None, top_k: int | None = None,
                  per_layer: bool | None = None, alpha: float | None = None, combine: str | None = None,
                  form: str | None = None) -> dict:
    """Fit SteerFair on demonstrations made from multiple-choice questions: OUT/steerfair (artifact) and plots.

    Args:
        data: multiple-choice questions in ScienceQA's format (problems.json or its folder); labels are not used
        out: run directory: OUT/steerfair is the artifact, OUT/kde_top_heads.png the KDE plot of the top heads
        model: Hub id or local model directory (or `model:` in the recipe)
        config: YAML recipe: run options (model, quantization, dtype, batch_size, limit, images) and a `steerfair:` block
        images: image folder (default: next to the data)
        limit: use only the first N questions
        batch_size: demonstrations per forward
        quantization: 4bit or 8bit (bitsandbytes)
        dtype: auto, float32, bfloat16 or float16
        top_k: heads to steer (overall, or per layer with --per_layer)
        per_layer: pick top_k heads in every layer
        alpha: steering strength along the unit bias direction
        combine: qr, mean or svd: how a head's rule directions become one
        form: add (h - alpha d) or project (h - alpha (h.d) d)
    """
    from llava_circuits.data.readers import read_benchmark
    from llava_circuits.steering.callbacks import fit_steerfair, load_run_model, recipe

    run, cfg, _ = recipe(config, "steerfair", SteerFairConfig,
                         dict(model=model, quantization=quantization, dtype=dtype, batch_size=batch_size, limit=limit,
                              images=images), RUN_DEFAULTS,
                         dict(top_k=top_k, per_layer=per_layer, alpha=alpha, combine=combine, form=form))
    loaded = load_run_model(run)
    samples = read_benchmark("scienceqa", data, run["images"])[: run["limit"]]
    demos = demonstrations(loaded, samples, cfg.permutations)
    steerfair = fit_steerfair(loaded, demos, cfg, Path(out) / "steerfair", Path(out), run["batch_size"])
    summary = steerfair.describe()
    print(json.dumps(summary, indent=2))
    return summary


def steerfair_eval(intervention: str, data: str, out: str, model: str | None = None, config: str | None = None,
                   images: str | None = None, limit: int | None = None, batch_size: int | None = None,
                   quantization: str | None = None, dtype: str | None = None, permutations: bool = True,
                   top_k: int | None = None, per_layer: bool | None = None, alpha: float | None = None,
                   combine: str | None = None, form: str | None = None) -> dict:
    """Answer multiple-choice questions with and without SteerFair in one run; metrics side by side with flips.

    Args:
        intervention: the steerfair artifact (path or Hub id) written by `steerfair fit`
        data: multiple-choice questions in ScienceQA's format (problems.json or its folder)
        out: run directory: baseline/, intervened/, metrics.json, run.json
        model: Hub id or local model directory (or `model:` in the recipe)
        config: YAML recipe (as for steerfair fit); its `steerfair:` block overrides the artifact's settings
        images: image folder (default: next to the data)
        limit: use only the first N questions (before permuting)
        batch_size: samples per batch (left-padded)
        quantization: 4bit or 8bit (bitsandbytes)
        dtype: auto, float32, bfloat16 or float16
        permutations: ask every cyclic permutation of the options (gives permutation_std and position_gap)
        top_k: override the number of steered heads
        per_layer: override: top_k heads in every layer
        alpha: override the steering strength
        combine: override: qr, mean or svd
        form: override: add or project
    """
    from llava_circuits.data.permutations import all_permutations
    from llava_circuits.data.readers import read_benchmark
    from llava_circuits.steering.callbacks import compare, load_run_model, recipe

    run, cfg, given = recipe(config, "steerfair", SteerFairConfig,
                             dict(model=model, quantization=quantization, dtype=dtype, batch_size=batch_size,
                                  limit=limit, images=images), RUN_DEFAULTS,
                             dict(top_k=top_k, per_layer=per_layer, alpha=alpha, combine=combine, form=form))
    loaded = load_run_model(run)
    steerfair = SteerFair.load(intervention, loaded).with_config(**{k: getattr(cfg, k) for k in given})
    samples = read_benchmark("scienceqa", data, run["images"])[: run["limit"]]
    metrics = compare(loaded, "scienceqa", all_permutations(samples) if permutations else samples, [steerfair], out,
                      run["batch_size"], config={**run, "permutations": permutations})
    print(json.dumps({k: metrics[k] for k in ("baseline", "intervened")} | {"flips": {
        k: v for k, v in metrics["flips"].items() if not k.endswith("_ids")}}, indent=2))
    return metrics


def read_manifest(data_dir: str | Path, key: str, bench: str) -> list[Sample]:
    """Samples of one toy benchmark listed in DATA_DIR/manifest.json (`toy data`)."""
    from llava_circuits.data.readers import read_benchmark

    path = Path(data_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    if key not in manifest:
        raise ValueError(f"{path}: no benchmark {key!r}; it lists {sorted(manifest)}")
    files = manifest[key]["files"]
    images = next((f for f in files[1:] if Path(f).is_dir()), None)
    return read_benchmark(bench, files[0], images)


TOY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "toy" / "steerfair.yaml"


def toy_recipe() -> SteerFairConfig:
    """The `steerfair:` block of configs/toy/steerfair.yaml: the settings of the demo's stage."""
    from llava_circuits.steering.callbacks import recipe

    return recipe(TOY_CONFIG, "steerfair", SteerFairConfig, {}, RUN_DEFAULTS, {})[1]


def steerfair_stage(loaded: Loaded, data_dir: str | Path, out: str | Path, config: SteerFairConfig | None = None,
                    limit: int | None = None, batch_size: int = 32) -> dict[str, float]:
    """Demo stage: fit SteerFair on half the toy multiple-choice questions (no labels), then answer every cyclic
    permutation of the other half with and without it. Unsettled items: position_gap and permutation_std;
    settled items (the image decides): accuracy. `limit` keeps the first N questions of each kind; `config`
    defaults to the toy recipe's (`toy_recipe`)."""
    from llava_circuits.data.permutations import all_permutations
    from llava_circuits.steering.callbacks import compare, fit_steerfair

    out, config = Path(out), config or toy_recipe()
    unsettled = read_manifest(data_dir, "mc_unsettled", "scienceqa")[:limit]
    settled = read_manifest(data_dir, "mc_settled", "scienceqa")[:limit]
    demos = demonstrations(loaded, unsettled[::2] + settled[::2])
    steerfair = fit_steerfair(loaded, demos, config, out / "steerfair", out, batch_size)
    u = compare(loaded, "scienceqa", all_permutations(unsettled[1::2]), [steerfair], out / "unsettled", batch_size)
    s = compare(loaded, "scienceqa", all_permutations(settled[1::2]), [steerfair], out / "settled", batch_size)
    return {
        "position_gap_before": u["baseline"]["position_gap"], "position_gap_after": u["intervened"]["position_gap"],
        "permutation_std_before": u["baseline"]["permutation_std"],
        "permutation_std_after": u["intervened"]["permutation_std"],
        "settled_accuracy_before": s["baseline"]["accuracy"], "settled_accuracy_after": s["intervened"]["accuracy"],
        "heads_steered": float(len(steerfair.heads)),
    }
