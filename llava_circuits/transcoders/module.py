"""TranscoderModule: trains the transcoders of every chosen layer from each forward of a frozen model.

One forward of the frozen model (bf16, 4-bit or 8-bit through `load_model`; eval mode; never saved in
checkpoints) captures `mlp.in` and `mlp.out` of every chosen layer and stops right after the last
chosen layer's MLP. Each layer's transcoder then takes a step on those tokens (weights from the
DataModule's `token_weight`). Multi-GPU:

    --trainer.strategy ddp             every rank holds every layer; gradients are averaged (DDP)
    --trainer.strategy layer_sharded   each rank holds a subset of the layers and trains them on the
                                       global batch (activations are sent to the owning rank)

Metrics (torchmetrics, per layer): FVU (fraction of variance unexplained), L0 (active features per
token, also as a fraction of the features) and the dead fraction (features that did not fire within
`dead_window` tokens). Validation adds the replacement check: the model with every chosen MLP
replaced by its transcoder against the original, as KL, next-token agreement and CE loss recovered
(relative to zero-ablating the same MLPs).

    llava-circuits transcoders fit -c configs/transcoders/toy.yaml [--ckpt_path last]
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from llava_circuits.finetune import FinalCheckpoint, warmup_cosine
from llava_circuits.models.load import Loaded, load_model
from llava_circuits.sites import capture, intervene
from llava_circuits.transcoders.replacement import ReplacementModel
from llava_circuits.transcoders.sharding import (
    LayerShardedStrategy,
    collect_on_rank0,
    gather_rows,
    owned_layers,
    send_to_owners,
)
from llava_circuits.transcoders.transcoder import Terms, TranscoderConfig, TranscoderSet


@dataclass
class OptimConfig:
    """Adam with linear warm-up and cosine decay."""

    lr: float = 1e-3
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.1
    """The cosine ends at lr * min_lr_ratio."""
    total_steps: int | None = None
    """Length of the schedule (None: the trainer's max_steps)."""
    grad_clip: float | None = 1.0
    """Clip each layer's gradient norm to this (per layer, so sharding does not change it); None: off."""


# --- metrics ----------------------------------------------------------------------------------------

class FVU(Metric):
    """Fraction of variance unexplained: sum of squared errors over total variance, both summed over batches."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("err", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("var", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, err: Tensor, var: Tensor) -> None:
        self.err += err.detach().double()
        self.var += var.detach().double()

    def compute(self) -> Tensor:
        return self.err / self.var.clamp_min(1e-30)


class L0(Metric):
    """Mean number of active features per token."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("active", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, mean_l0: Tensor, tokens: int) -> None:
        self.active += mean_l0.detach().double() * tokens
        self.tokens += tokens

    def compute(self) -> Tensor:
        return self.active / self.tokens.clamp_min(1)


class DeadFraction(Metric):
    """Fraction of features that fired on no token since the last reset."""

    full_state_update = False

    def __init__(self, n_features: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("fired", torch.zeros(n_features, dtype=torch.uint8), dist_reduce_fx="max")

    def update(self, fired: Tensor) -> None:
        self.fired |= fired.to(torch.uint8)

    def compute(self) -> Tensor:
        return 1.0 - self.fired.float().mean()


class _StopForward(Exception):
    """Raised after the last needed layer, to end the frozen forward early."""


def _stop_forward(module, args, output):
    raise _StopForward


@dataclass
class Tokens:
    """The trained tokens of one batch: per-layer MLP inputs and outputs, weights, and optionally neurons."""

    xs: dict[int, Tensor]  # layer -> [n, d_model] mlp.in
    ys: dict[int, Tensor]  # layer -> [n, d_model] mlp.out
    w: Tensor  # [n] token weights (> 0)
    neurons: dict[int, Tensor] = field(default_factory=dict)  # layer -> [n, d_mlp] mlp.neurons


def clip_grad_norms(groups: list[list[Tensor]], max_norm: float) -> None:
    """`clip_grad_norm_(group, max_norm)` for every group (a layer's transcoder is clipped on its own), in four
    foreach calls for all groups together instead of five per group: on small models a step is its op count."""
    grads = [[p.grad for p in g if p.grad is not None] for g in groups]
    flat = [g for gs in grads for g in gs]
    if not flat:
        return
    norms = torch.stack(torch._foreach_norm(flat))  # [n_params]
    group = torch.repeat_interleave(torch.arange(len(groups), device=norms.device),
                                    torch.tensor([len(gs) for gs in grads], device=norms.device))
    total = torch.zeros(len(groups), dtype=norms.dtype, device=norms.device).index_add_(0, group, norms.pow(2)).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s coefficient
    torch._foreach_mul_(flat, list(coef[group].unbind()))


class TranscoderModule(L.LightningModule):
    """Trains per-layer or cross-layer transcoders of a frozen VLM or LM; see the module docstring."""

    def __init__(
        self,
        model: str = "",
        dtype: str = "float32",
        quantization: str | None = None,
        layers: list[int] | None = None,
        transcoder: TranscoderConfig | None = None,
        optim: OptimConfig | None = None,
        stop_early: bool = True,
        replacement_check: bool = True,
        dead_window: int = 50_000,
        log_every: int = 10,
    ):
        """
        Args:
            model: the frozen model: Hub id or local directory.
            dtype: float32, bfloat16 or float16 (compute dtype when quantized).
            quantization: None, 4bit or 8bit (bitsandbytes).
            layers: layers to train transcoders for (default: all).
            transcoder: the transcoders' shape, activation and penalties.
            optim: optimiser and schedule.
            stop_early: end the frozen forward after the last chosen layer's MLP.
            replacement_check: run the replacement check during validation.
            dead_window: tokens over which a feature must fire not to count as dead (training metric).
            log_every: log training metrics every this many steps.
        """
        super().__init__()
        self.model_name, self.model_dtype, self.quantization = model, dtype, quantization
        self.layer_choice = list(layers) if layers is not None else None
        self.transcoder_cfg = transcoder or TranscoderConfig()
        self.transcoder_cfg.check()
        self.optim = optim or OptimConfig()
        self.stop_early, self.replacement_check = stop_early, replacement_check
        self.dead_window, self.log_every = dead_window, log_every
        self.loaded: Loaded | None = None  # a plain attribute: not a submodule, so never in a checkpoint
        self.transcoders: TranscoderSet | None = None
        self.layers: list[int] = []
        self.sharded = False
        self.capture_neurons = False  # set by CoactivationStats
        self.last_step: dict | None = None
        self.val_results: dict = {}
        self._window_tokens = 0.0

    @classmethod
    def for_loaded(cls, loaded: Loaded, **kwargs) -> "TranscoderModule":
        """A module around an already loaded model (it is moved to the trainer's device, not reloaded)."""
        module = cls(model=loaded.name_or_path, **kwargs)
        module.loaded = loaded
        return module

    # --- set-up ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.transcoders is not None:
            return
        trainer = self.trainer
        self.sharded = isinstance(trainer.strategy, LayerShardedStrategy)
        device = trainer.strategy.root_device
        if self.loaded is None:
            self.loaded = load_model(self.model_name, self.model_dtype, device=str(device), quantization=self.quantization)
        elif self.quantization is None:
            self.loaded.model.to(device)
        self.loaded.model.eval()
        a = self.loaded.anatomy
        self.layers = sorted(self.layer_choice if self.layer_choice is not None else range(a.n_layers))
        bad = [l for l in self.layers if not 0 <= l < a.n_layers]
        if bad or not self.layers:
            raise ValueError(f"layers {bad or self.layers} out of range: the model has {a.n_layers} layers")
        local = owned_layers(self.layers, trainer.global_rank, trainer.world_size) if self.sharded else self.layers
        self.transcoders = TranscoderSet(a.d_model, self.transcoder_cfg, local, self.layers)
        self._build_metrics(local)

    def _build_metrics(self, local: list[int]) -> None:
        sync = {"sync_on_compute": not self.sharded}  # sharded ranks see the global batch of their own layers
        n = self.transcoder_cfg.n_features

        def per_layer(make):
            return nn.ModuleDict({str(l): make() for l in local})

        self.train_fvu, self.train_l0 = per_layer(lambda: FVU(**sync)), per_layer(lambda: L0(**sync))
        self.train_dead = per_layer(lambda: DeadFraction(n, **sync))
        self.val_fvu, self.val_l0 = per_layer(lambda: FVU(**sync)), per_layer(lambda: L0(**sync))
        self.val_dead = per_layer(lambda: DeadFraction(n, **sync))
        checks = ("kl", "agreement", "agreement_last", "ce_orig", "ce_replaced", "ce_zero")
        self.val_check = nn.ModuleDict({k: MeanMetric() for k in checks})

    def configure_optimizers(self):
        names, params = self._named_params()
        # fused: one kernel for all parameters instead of a loop of small ops per parameter (four per layer)
        opt = torch.optim.Adam(params, lr=self.optim.lr, betas=tuple(self.optim.betas), fused=True)
        total = self.optim.total_steps or max(1, self.trainer.max_steps)
        schedule = partial(warmup_cosine, warmup=self.optim.warmup_steps, total=total, min_ratio=self.optim.min_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _named_params(self) -> tuple[list[str], list[nn.Parameter]]:
        """This rank's parameters in a fixed order, named '{layer}.{param}' (the optimizer's index order)."""
        pairs = [(f"{l}.{n}", p) for l in self.transcoders.layers for n, p in self.transcoders[l].named_parameters()]
        return [n for n, _ in pairs], [p for _, p in pairs]

    # --- the frozen forward ---------------------------------------------------------------------
    @torch.no_grad()
    def tokens(self, batch: dict, full: bool = False) -> tuple[Tokens, Tensor | None]:
        """Captured activations of the batch's weighted tokens (sent to their owners when sharded) and,
        when `full`, the logits [batch, pos, vocab] of the whole forward."""
        a, model = self.loaded.anatomy, self.loaded.model
        kinds = ["mlp.in", "mlp.out"] + (["mlp.neurons"] if self.capture_neurons else [])
        sites = [f"layers.{l}.{k}" for l in self.layers for k in kinds]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        if "pixel_values" in batch:
            inputs["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
        logits = None
        with capture(model, sites, anatomy=a) as cap:
            stop = a.mlp(self.layers[-1]).register_forward_hook(_stop_forward) if self.stop_early and not full else None
            try:
                logits = model(**inputs, use_cache=False).logits
            except _StopForward:
                pass
            finally:
                if stop is not None:
                    stop.remove()
        w = batch["token_weight"].flatten()
        keep = None if bool((w > 0).all()) else (w > 0).nonzero().squeeze(1)  # one nonzero for every site
        rows = (lambda t: t) if keep is None else (lambda t: t.index_select(0, keep))
        grab = {k: {l: rows(cap[f"layers.{l}.{k}"].flatten(0, 1)) for l in self.layers} for k in kinds}  # [n, d]
        w = rows(w).float()
        if self.sharded:
            return self._to_owners(grab, w), logits
        return Tokens(*({l: t.float() for l, t in grab[k].items()} for k in ("mlp.in", "mlp.out")), w,
                      {l: t.float() for l, t in grab.get("mlp.neurons", {}).items()}), logits

    def _to_owners(self, grab: dict[str, dict[int, Tensor]], w: Tensor) -> Tokens:
        d = self.loaded.anatomy.d_model
        parts = {l: torch.cat([grab[k][l] for k in grab], dim=1) for l in self.layers}  # [n, 2d (+ d_mlp)]
        received, extra = send_to_owners(parts, w[:, None], self.layers)
        out = Tokens({}, {}, extra[:, 0].float())
        for l, rows in received.items():
            out.xs[l], out.ys[l] = rows[:, :d].float(), rows[:, d : 2 * d].float()
            if "mlp.neurons" in grab:
                out.neurons[l] = rows[:, 2 * d :].float()
        return out

    # --- training -------------------------------------------------------------------------------
    def _data_parallel(self) -> bool:
        return self.trainer.world_size > 1 and not self.sharded

    def _sum_ranks(self, t: Tensor, op=None) -> Tensor:
        """Sum (or `op`) over data-parallel ranks; identity on one process and when sharded."""
        if self._data_parallel():
            t = t.clone()
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def _global(self, data: Tokens) -> tuple[dict[int, Tensor], dict[int, Tensor], Tensor]:
        """(xs, ys, w) of the global batch: data-parallel ranks exchange their tokens (for the initialisation)."""
        if not self._data_parallel():
            return data.xs, data.ys, data.w
        d = self.transcoders.d_model
        rows = gather_rows(torch.cat([data.w[:, None]] + [torch.cat([data.xs[l], data.ys[l]], 1) for l in self.layers], 1))
        xs = {l: rows[:, 1 + 2 * d * i : 1 + 2 * d * i + d] for i, l in enumerate(self.layers)}
        ys = {l: rows[:, 1 + 2 * d * i + d : 1 + 2 * d * (i + 1)] for i, l in enumerate(self.layers)}
        return xs, ys, rows[:, 0]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        data, _ = self.tokens(batch)
        tcs = self.transcoders
        if not tcs.initialized:
            tcs.init_from_data(*self._global(data))
        world = self.trainer.world_size if self._data_parallel() else 1
        terms = tcs.terms(data.xs, data.ys, data.w, reduce=self._sum_ranks, world=world)
        loss = torch.stack([t.loss for t in terms.values()]).sum()
        self._track(terms, len(data.w))
        self.last_step = {"terms": terms, "neurons": data.neurons} if self.capture_neurons else None
        cfg, step = self.transcoder_cfg, self.global_step + 1  # the step this batch completes
        due = cfg.resample_every and step % cfg.resample_every == 0 and (not cfg.resample_until or step <= cfg.resample_until)
        self._resample_data = self._global(data) if due else None
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(data.w))
        return loss

    def _track(self, terms: dict[int, Terms], n_local: int) -> None:
        """Dead-feature counters, training metrics, and their logs."""
        n = float(self._sum_ranks(torch.tensor(float(n_local), device=self.device)))
        for l, t in terms.items():
            fired = self._sum_ranks(t.fired.to(torch.uint8), dist.ReduceOp.MAX if self._data_parallel() else None).bool()
            self.transcoders[l].track_dead(fired, n)
            self.train_fvu[str(l)].update(t.err, t.var)
            self.train_l0[str(l)].update(t.l0, n_local)
            self.train_dead[str(l)].update(fired)
        self._window_tokens += n
        if (self.global_step + 1) % self.log_every == 0:
            self._log_layers("train", {"fvu": self.train_fvu, "l0": self.train_l0})
        if self._window_tokens >= self.dead_window:
            self._log_layers("train", {"dead_fraction": self.train_dead})
            self._window_tokens = 0.0

    def _log_layers(self, split: str, metrics: dict[str, nn.ModuleDict]) -> dict[str, float]:
        """Compute, log and reset per-layer metrics; returns {name/layer_i: value, name_max: value}."""
        out = {}
        for name, per_layer in metrics.items():
            values = self._all_layers({int(l): m.compute() for l, m in per_layer.items()})
            for m in per_layer.values():
                m.reset()
            if name == "l0":
                values = {l: v / self.transcoder_cfg.n_features for l, v in values.items()}
                name = "l0_fraction"
            out.update({f"{name}/layer_{l}": v for l, v in values.items()})
            out[f"{name}_max"] = max(values.values())
        if split != "val" or not self.trainer.sanity_checking:
            self.log_dict({f"{split}/{k}": v for k, v in out.items()}, on_step=split == "train", on_epoch=split != "train",
                          sync_dist=split != "train")  # equal on every rank already; syncing keeps Lightning quiet
        return out

    def _all_layers(self, values: dict[int, Tensor]) -> dict[int, float]:
        """Per-layer values of every chosen layer (sharded ranks exchange theirs)."""
        if not self.sharded:
            return {l: float(v) for l, v in values.items()}
        vec = torch.zeros(len(self.layers), dtype=torch.float64, device=self.device)
        for l, v in values.items():
            vec[self.layers.index(l)] = v
        dist.all_reduce(vec)
        return {l: float(vec[i]) for i, l in enumerate(self.layers)}

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.optim.grad_clip:
            clip_grad_norms([list(self.transcoders[l].parameters()) for l in self.transcoders.layers], self.optim.grad_clip)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The step, then decoder-norm handling and dead-feature resampling, before any callback (a checkpoint)
        sees the weights."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.transcoders.after_step()
        data, self._resample_data = getattr(self, "_resample_data", None), None
        if data is None:
            return
        resampled = self.transcoders.resample_dead(*data, step=self.global_step + 1)
        opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        for layer, rows in resampled.items():
            for name, p in self.transcoders[layer].named_parameters():
                state = opt.state.get(p, {})
                if name in ("W_enc", "b_enc", "W_dec", "log_threshold") and "exp_avg" in state:  # per-feature rows
                    state["exp_avg"][rows] = 0
                    state["exp_avg_sq"][rows] = 0

    # --- validation -----------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        check = self.replacement_check and not self.sharded
        data, logits = self.tokens(batch, full=check)
        if not self.transcoders.initialized:
            return
        terms = self.transcoders.terms(data.xs, data.ys, data.w)
        for l, t in terms.items():
            self.val_fvu[str(l)].update(t.err, t.var)
            self.val_l0[str(l)].update(t.l0, len(data.w))
            self.val_dead[str(l)].update(t.fired)
        if check:
            self._replacement_check(batch, logits)

    @torch.no_grad()
    def _replacement_check(self, batch: dict, orig: Tensor) -> None:
        model, a = self.loaded.model, self.loaded.anatomy
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        if "pixel_values" in batch:
            inputs["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
        with ReplacementModel(self.transcoders, record=False).applied(self.loaded):
            replaced = model(**inputs, use_cache=False).logits.float()
        zero = {f"layers.{l}.mlp.out": torch.zeros_like for l in self.layers}
        with intervene(model, zero, anatomy=a):
            ablated = model(**inputs, use_cache=False).logits.float()
        ids, real = batch["input_ids"], batch["attention_mask"].bool()
        text = real & ~a.image_mask(ids)  # [batch, pos]: positions whose next-token prediction is read
        logp, logq = orig.float().log_softmax(-1), replaced.log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # [batch, pos]
        agree = (logp.argmax(-1) == logq.argmax(-1)).float()
        self.val_check["kl"].update(kl[text])
        self.val_check["agreement"].update(agree[text])
        last = (real.long() * torch.arange(real.shape[1], device=real.device)).argmax(1)  # last real position
        self.val_check["agreement_last"].update(agree[torch.arange(len(last)), last])
        target = text[:, :-1] & real[:, 1:] & ~a.image_mask(ids)[:, 1:]  # predicting a real text token
        for name, logits in (("ce_orig", orig), ("ce_replaced", replaced), ("ce_zero", ablated)):
            ce = F.cross_entropy(logits[:, :-1][target].float(), ids[:, 1:][target], reduction="none")
            self.val_check[name].update(ce)

    def on_validation_epoch_end(self) -> None:
        if not self.transcoders.initialized:
            return
        results = self._log_layers("val", {"fvu": self.val_fvu, "l0": self.val_l0, "dead_fraction": self.val_dead})
        if self.replacement_check and not self.sharded and self.val_check["kl"].update_count:
            check = {k: float(m.compute()) for k, m in self.val_check.items()}
            for m in self.val_check.values():
                m.reset()
            gap = check["ce_zero"] - check["ce_orig"]
            check["ce_recovered"] = (check["ce_zero"] - check["ce_replaced"]) / gap if gap else math.nan
            results.update(check)
            if not self.trainer.sanity_checking:
                self.log_dict({f"val/{k}": v for k, v in check.items()}, sync_dist=True)
        self.val_results = results

    # --- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record what export needs; store optimizer state by parameter name; sharded: gather every layer on rank 0."""
        checkpoint["transcoders"] = {
            "d_model": self.transcoders.d_model, "layers": self.layers,
            "config": dataclasses.asdict(self.transcoder_cfg),
            "model": dataclasses.asdict(self.loaded.fingerprint()),
            "info": {"dtype": self.model_dtype, "quantization": self.quantization, "sharded": self.sharded},
        }
        states = checkpoint.get("optimizer_states")
        named = self._named_optimizer_state(states[0]) if states else None
        if self.sharded:
            local = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("transcoders.")}
            if named is not None:
                local |= {f"optim\t{p}\t{k}": v for p, st in named["state"].items() for k, v in st.items()}
            gathered = collect_on_rank0(local, self.device)
            checkpoint["state_dict"] = {k: v for k, v in gathered.items() if not k.startswith("optim\t")}
            if named is not None:
                named["state"] = {}
                for key, v in gathered.items():
                    if key.startswith("optim\t"):
                        _, p, k = key.split("\t")
                        named["state"].setdefault(p, {})[k] = v
        if named is not None:
            checkpoint["optimizer_states"] = [named]

    def _named_optimizer_state(self, state: dict) -> dict:
        names, _ = self._named_params()
        group = {k: v for k, v in state["param_groups"][0].items() if k != "params"}
        return {"param_group": group, "state": {names[i]: st for i, st in state["state"].items()}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Keep this rank's layers and turn the named optimizer state back into torch's indexed form."""
        meta = checkpoint.get("transcoders", {})
        if meta and meta.get("layers") != self.layers:
            raise ValueError(f"checkpoint trained layers {meta.get('layers')}, this run chooses {self.layers}")
        mine = tuple(f"transcoders.tc.{l}." for l in self.transcoders.layers)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith("transcoders.tc.") or k.startswith(mine)}
        states = checkpoint.get("optimizer_states")
        if states and "param_group" in states[0]:
            names, _ = self._named_params()
            named = states[0]
            checkpoint["optimizer_states"] = [{
                "state": {i: named["state"][n] for i, n in enumerate(names) if n in named["state"]},
                "param_groups": [{**named["param_group"], "params": list(range(len(names)))}],
            }]


# --- command line -----------------------------------------------------------------------------------

class MmapCheckpointIO(TorchCheckpointIO):
    """Loads checkpoints memory-mapped and with weights_only=True: ranks that keep only their own layers of a
    large layer-sharded checkpoint share the file's pages instead of each holding a copy in host memory."""

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True, mmap=True)


def transcoders_cli(args: list[str] | None = None, prog: str | None = None):
    """`transcoders fit|validate -c CONFIG [--ckpt_path last] [--trainer.devices N --trainer.strategy ddp|layer_sharded]`.

    `args` starts with the subcommand (`["fit", "-c", "configs/transcoders/toy.yaml"]`); None reads sys.argv.
    `prog` names the program in usage lines (the CLI passes "llava-circuits transcoders").

    A ModelCheckpoint(save_last=True) writing to {default_root_dir}/checkpoints is added unless the
    config has one, so `--ckpt_path last` finds the last checkpoint of an earlier run in the same root.
    """
    from lightning.pytorch.cli import LightningCLI

    from llava_circuits.transcoders.data import TranscoderDataModule

    class TranscoderCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("model.model", "data.model")
            parser.add_argument("--checkpoint_every", type=int, default=100, help="checkpoint every N steps")

        def instantiate_trainer(self, **kwargs):
            config = self.config[self.subcommand] if self.subcommand else self.config
            init = self.config_init[self.subcommand] if self.subcommand else self.config_init
            configured = init["trainer"].get("callbacks") or []
            callbacks = configured if isinstance(configured, list) else [configured]
            callbacks = callbacks + list(kwargs.pop("callbacks", None) or [])
            if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
                root = config["trainer"].get("default_root_dir") or "."
                every = config.get("checkpoint_every", 100)
                callbacks.append(FinalCheckpoint(dirpath=f"{root}/checkpoints", save_last=True, every_n_train_steps=every))
            return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    return TranscoderCLI(
        TranscoderModule, TranscoderDataModule, args=args, save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": prog} if prog else None,
        trainer_defaults={"num_sanity_val_steps": 0, "plugins": [MmapCheckpointIO()]},
    )


if __name__ == "__main__":  # `python -m llava_circuits.transcoders.module fit ...` (what DDP's launcher re-runs)
    transcoders_cli()
