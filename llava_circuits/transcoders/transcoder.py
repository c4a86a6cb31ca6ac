"""Transcoders: sparse features that read an MLP's input and predict its output.

Two kinds share one interface (`TranscoderSet`):

- `PerLayerTranscoders` (PLT): one transcoder per layer, features of layer l read `mlp.in` of l
  and write `mlp.out` of l.
- `CrossLayerTranscoder` (CLT): features of layer l read `mlp.in` of l and write `mlp.out` of l
  and of every later layer of the set (Anthropic's cross-layer transcoder).

Activations: "relu" with a decoder-norm-weighted L1 penalty (the reference pipeline's), "topk"
(k largest pre-activations, with the AuxK loss for dead features) and "jumprelu" (learned per-feature
thresholds, L0 penalty with straight-through gradients, Rajamanoharan et al. 2024).

Scaling: each layer keeps `x_scale` and `y_scale` (RMS of `mlp.in` and `mlp.out`, set by the
data-driven initialisation), so that training sees unit-scale activations whatever the layer.
`export()` folds the scales into the weights, giving circuit-tracer's raw-space layout:

    pre  = x @ W_enc.T + b_enc                     W_enc [d_tc, d_model]
    f    = act(pre)                                (threshold [d_tc] for jumprelu, k for topk)
    y    = f @ W_dec + b_dec (+ x @ W_skip.T)      W_dec [d_tc, d_model] (CLT: [d_tc, n_targets, d_model])
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("relu", "topk", "jumprelu")
Reduce = Callable[[Tensor], Tensor]
"""Sums a tensor over data-parallel ranks (identity on one process)."""


@dataclass
class TranscoderConfig:
    """What a transcoder is and how it is trained."""

    n_features: int = 1024
    """Features per layer (d_tc)."""
    activation: str = "topk"
    """relu (with an L1 penalty, as the reference pipeline), topk or jumprelu."""
    k: int = 32
    """Active features per token (topk)."""
    l1_coeff: float = 3e-4
    """relu: weight of sum_i f_i * ||W_dec_i|| (per token, in unit-scale space)."""
    l0_coeff: float = 1e-3
    """jumprelu: weight of the number of active features per token."""
    threshold_init: float = 0.5
    """jumprelu: initial threshold (pre-activations start centred with unit scale)."""
    bandwidth: float = 0.1
    """jumprelu: width of the rectangle kernel of the straight-through threshold gradient."""
    aux_k_coeff: float = 1 / 32
    """topk: weight of the AuxK loss, in which dead features predict the residual."""
    dead_tokens: int = 20_000
    """A feature that has not fired for this many tokens counts as dead (AuxK, resampling)."""
    revive_rate: float = 0.0
    """After every step, raise the encoder bias of each dead feature by this much (unit-scale pre-activation
    units) until it fires again; once firing, the reconstruction loss shapes it (0: off)."""
    resample_every: int = 0
    """Every this many steps, re-point dead features at tokens the transcoder predicts badly (0: never)."""
    resample_until: int = 0
    """Last step at which dead features are resampled (0: no limit)."""
    skip: bool = False
    """Add a linear skip connection W_skip [d_model, d_model]."""
    cross_layer: bool = False
    """Train one cross-layer transcoder over the chosen layers instead of one transcoder per layer."""
    normalize_decoder: bool = False
    """Keep every decoder row at unit norm (topk; relu/jumprelu fold the norm into the penalty instead)."""
    seed: int = 0
    """Seed of the random initialisation (each layer draws from seed + layer)."""

    def check(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"transcoder activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation == "topk" and not 0 < self.k <= self.n_features:
            raise ValueError(f"topk needs 0 < k <= n_features, got k={self.k}, n_features={self.n_features}")


@dataclass
class Terms:
    """One layer's training terms on a batch of tokens."""

    loss: Tensor  # scalar: fvu + penalties
    fvu: Tensor  # scalar
    l0: Tensor  # scalar: mean active features per token
    fired: Tensor  # [d_tc] bool: features active on some token
    err: Tensor  # scalar: weighted sum of squared errors (unit-scale space)
    var: Tensor  # scalar: weighted total variance of the target (unit-scale space)
    acts: Tensor | None = None  # [n, k] (topk, with indices) or [n, d_tc], detached
    indices: Tensor | None = None  # [n, k] feature of each topk activation


# --- activation functions ---------------------------------------------------------------------------

def _rectangle(z: Tensor) -> Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * (pre > threshold); the threshold gets a straight-through gradient through a rectangle kernel."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_threshold = (-(threshold / bw) * _rectangle((pre - threshold) / bw) * grad).sum(0)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    """1[pre > threshold] (counted by the L0 penalty); straight-through gradient to the threshold only."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_threshold = (-(1.0 / bw) * _rectangle((pre - threshold) / bw) * grad).sum(0)
        return None, grad_threshold, None


class _TopKEncode(torch.autograd.Function):
    """relu(top-k of x @ W.T + b) as (values [n, k], indices [n, k]); the backward touches only the k rows."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, k: int):
        values, indices = row_topk(F.linear(x, weight, bias), k)  # [n, k]
        values = values.relu()
        ctx.save_for_backward(x, weight, indices, values > 0)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: Tensor, _grad_indices):
        x, weight, indices, live = ctx.saved_tensors
        grad = grad_values * live  # [n, k]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad.to(weight.dtype), mode="sum")
        if ctx.needs_input_grad[1] and x.is_cuda:  # sparse: only the k selected rows per token (atomics are cheap)
            grad_w = torch.zeros_like(weight)
            rows = max(1, (1 << 24) // (indices.shape[1] * x.shape[1]))  # bounds the [rows, k, d] buffer
            for start in range(0, x.shape[0], rows):
                g, xi = grad[start : start + rows], x[start : start + rows]
                contrib = (g[:, :, None] * xi[:, None, :]).reshape(-1, x.shape[1])
                grad_w.index_add_(0, indices[start : start + rows].reshape(-1), contrib.to(weight.dtype))
        elif ctx.needs_input_grad[1]:
            grad_w = sparse_t_mm(grad.to(weight.dtype), indices, weight.shape[0], x.to(weight.dtype))
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            grad_b.index_add_(0, indices.reshape(-1), grad.reshape(-1).to(weight.dtype))
        return grad_x, grad_w, grad_b, None


class _SparseDecode(torch.autograd.Function):
    """sum_j values[:, j] * weight[indices[:, j]] ([n, d]) with a CPU backward of a sampled matmul and a sparse
    product: embedding_bag's own backward sorts the indices and cost 2.9 ms per layer at the toy bench's width
    (512 features, 1024 tokens), these ~1 ms together. On GPUs embedding_bag's backward is the fast one."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, weight: Tensor):
        ctx.save_for_backward(values, indices, weight)
        return F.embedding_bag(indices, weight, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, indices, weight = ctx.saved_tensors
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0] and weight.dtype in (torch.float32, torch.float64):
            # only the n * k dot products (a sampled matmul), no [n, d_tc] or [n, k, d] tensor
            pattern = _row_pattern(indices, weight.shape[0], weight.dtype)
            grad_values = torch.sparse.sampled_addmm(pattern, grad.to(weight.dtype), weight.T, beta=0.0)
            grad_values = grad_values.values().view_as(values).to(values.dtype)
        elif ctx.needs_input_grad[0]:  # half precision: CPU's sampled matmul has no kernel for it
            grad_values = (grad.to(weight.dtype) @ weight.T).gather(1, indices).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = sparse_t_mm(values.to(weight.dtype), indices, weight.shape[0], grad.to(weight.dtype))
        return grad_values, None, grad_weight


def _row_pattern(indices: Tensor, n_cols: int, dtype: torch.dtype) -> Tensor:
    """A CSR [n, n_cols] matrix with zeros at `indices` [n, k] (row by row, in their order)."""
    n, k = indices.shape
    crow = torch.arange(0, n * k + 1, k, device=indices.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, indices.reshape(-1), torch.zeros(n * k, dtype=dtype, device=indices.device),
                                       (n, n_cols), check_invariants=False)


def sparse_t_mm(values: Tensor, indices: Tensor, n_features: int, rhs: Tensor) -> Tensor:
    """dense(values, indices, n_features).T @ rhs ([n_features, d] from [n, k] and rhs [n, d]) on CPUs, as a
    sparse COO product: 0.76 ms against 1.05 for the dense [n, n_features] matmul at the toy bench's width
    (1024 tokens, 512 features, k = 16, d = 128), and 1/32 of the FLOPs. Half precision has no sparse kernel."""
    if values.dtype not in (torch.float32, torch.float64):
        return dense(values, indices, n_features).T @ rhs
    n, k = indices.shape
    tokens = torch.arange(n, device=indices.device).repeat_interleave(k)
    pattern = torch.sparse_coo_tensor(torch.stack([indices.reshape(-1), tokens]), values.reshape(-1), (n_features, n),
                                      check_invariants=False)
    return torch.sparse.mm(pattern, rhs)


def row_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) [n, k] of the k largest entries of each row of x [n, m], in no particular order.

    On CPUs, for wide rows, the top k blocks by block maximum are chosen first and the k largest are taken
    among their entries: every entry above the k-th largest value lies in one of those blocks, and they
    hold at least k entries at or above it, so the values are exactly torch.topk's (which entry wins a tie
    may differ). Block j holds the columns j, j + m / block, ... so that the block maxima are a reduction
    over contiguous rows. At the toy bench's width (512, k = 16, blocks of 8) this takes 1.7 ms against
    topk's 2.9; CUDA's radix select is faster than the two passes.
    """
    n, m = x.shape
    block = 1 << max(0, math.ceil(math.log2(max(1.0, math.sqrt(m / k)))))  # balances the two passes' widths
    if x.is_cuda or block < 4 or m % block or m // block < 2 * k:
        return x.topk(k, dim=-1, sorted=False)
    stride = m // block
    blocks = x.reshape(n, block, stride).amax(1).topk(k, dim=-1, sorted=False).indices  # [n, k]
    candidates = (blocks[:, :, None] + torch.arange(0, m, stride, device=x.device)).reshape(n, k * block)
    values, j = x.gather(1, candidates).topk(k, dim=-1, sorted=False)
    return values, candidates.gather(1, j)


def sparse_decode(values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """[n, d] = sum over j of values[:, j] * weight[indices[:, j]] (weight [d_tc, d])."""
    if weight.is_cuda:
        return F.embedding_bag(indices, weight, per_sample_weights=values, mode="sum")
    return _SparseDecode.apply(values, indices, weight)


def topk_encode(x: Tensor, weight: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values [n, k], indices [n, k]) of relu(top-k(x @ weight.T + bias))."""
    return _TopKEncode.apply(x, weight, bias, k)


def dense(values: Tensor, indices: Tensor, n_features: int) -> Tensor:
    """[n, k] values at [n, k] indices as a dense [n, n_features] tensor."""
    return torch.zeros(values.shape[0], n_features, dtype=values.dtype, device=values.device).scatter_(1, indices, values)


# --- shared pieces ----------------------------------------------------------------------------------

def weighted_fvu(
    err2: Tensor, y: Tensor, w: Tensor, reduce: Reduce | None = None, world: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """(fvu, err, var) for squared errors err2 [n], targets y [n, d], weights w [n].

    fvu = sum_t w_t err2_t / sum_t w_t ||y_t - mean_w(y)||^2. With data parallelism, `reduce` sums over
    the `world` ranks: the mean and variance are global, err is this rank's, and fvu is this rank's
    share times `world`, so that averaging the ranks' gradients (DDP) gives the global FVU's gradient;
    var is the global variance divided by `world`, so that summing (err, var) over ranks gives the totals.
    """
    reduce = reduce or _identity
    stats = reduce(torch.cat([(w[:, None] * y).sum(0), w.sum()[None]]))
    mean = stats[:-1] / stats[-1]
    var = reduce((w * (y - mean).pow(2).sum(-1)).sum())
    err = (w * err2).sum()
    return err * world / var.clamp_min(1e-12), err, var / world


def _unit_rows(n: int, d: int, generator: torch.Generator) -> Tensor:
    rows = torch.randn(n, d, generator=generator)
    return rows / rows.norm(dim=1, keepdim=True)


def _rms(t: Tensor, w: Tensor) -> Tensor:
    """sqrt(sum_t w_t ||t_t||^2 / (d sum_t w_t)) for t [n, d]."""
    return ((w.double() * t.double().pow(2).sum(-1)).sum() / (w.double().sum() * t.shape[-1])).sqrt().float()


def _mean(t: Tensor, w: Tensor) -> Tensor:
    """Weighted mean [d] of t [n, d]."""
    return ((w.double()[:, None] * t.double()).sum(0) / w.double().sum()).float()


def _identity(t: Tensor) -> Tensor:
    return t


class Transcoder(nn.Module):
    """One layer's transcoder: encoder, sparse activation, decoder, optional skip; see the module docstring."""

    def __init__(self, d_model: int, cfg: TranscoderConfig, layer: int = 0, n_targets: int = 1):
        super().__init__()
        cfg.check()
        self.cfg, self.layer, self.d_model, self.n_targets = cfg, layer, d_model, n_targets
        self.cross = cfg.cross_layer  # decoder slots [d_tc, n_targets, d_model] instead of [d_tc, d_model]
        n = cfg.n_features
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + layer)
        w_enc = _unit_rows(n, d_model, gen)  # unit rows: unit-scale inputs give unit-scale pre-activations
        self.W_enc = nn.Parameter(w_enc)  # [d_tc, d_model]
        self.b_enc = nn.Parameter(torch.zeros(n))
        w_dec = w_enc[:, None, :].expand(n, n_targets, d_model) / math.sqrt(cfg.k if cfg.activation == "topk" else n)
        self.W_dec = nn.Parameter(w_dec.clone() if self.cross else w_dec[:, 0].clone())  # [d_tc, (n_targets,) d_model]
        self.b_dec = nn.Parameter(torch.zeros(n_targets, d_model) if self.cross else torch.zeros(d_model))
        self.W_skip = nn.Parameter(torch.zeros(d_model, d_model)) if cfg.skip else None
        jump = cfg.activation == "jumprelu"
        self.log_threshold = nn.Parameter(torch.full((n,), math.log(cfg.threshold_init))) if jump else None
        self.register_buffer("x_scale", torch.ones(()))
        self.register_buffer("y_scale", torch.ones(n_targets) if self.cross else torch.ones(()))
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def n_features(self) -> int:
        return self.W_enc.shape[0]

    @property
    def threshold(self) -> Tensor | None:
        return None if self.log_threshold is None else self.log_threshold.exp()

    # inference, in the model's raw space
    def pre(self, x: Tensor) -> Tensor:
        """Pre-activations [n, d_tc] of raw inputs x [n, d_model]."""
        return F.linear(x.to(self.W_enc.dtype) / self.x_scale, self.W_enc, self.b_enc)

    def activate(self, pre: Tensor) -> Tensor:
        """Feature activations [n, d_tc] from pre-activations."""
        if self.cfg.activation == "relu":
            return pre.relu()
        if self.cfg.activation == "jumprelu":
            return _JumpReLU.apply(pre, self.threshold, self.cfg.bandwidth)
        values, indices = row_topk(pre, self.cfg.k)
        return dense(values.relu(), indices, pre.shape[-1])

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations [n, d_tc] of raw inputs x [n, d_model]."""
        return self.activate(self.pre(x))

    def decode(self, acts: Tensor, x: Tensor | None = None, slot: int | None = None) -> Tensor:
        """Raw-space output [n, d_model] of activations [n, d_tc]; a CLT source decodes one target `slot`."""
        if self.cross:
            if slot is None:
                raise ValueError("a cross-layer source writes to several layers: decode needs the target slot")
            w_dec, b_dec, y_scale = self.W_dec[:, slot], self.b_dec[slot], self.y_scale[slot]
        else:
            w_dec, b_dec, y_scale, slot = self.W_dec, self.b_dec, self.y_scale, 0
        out = acts.to(w_dec.dtype) @ w_dec + b_dec
        if slot == 0 and self.W_skip is not None:
            if x is None:
                raise ValueError("this transcoder has a skip connection: decode needs the input x")
            out = out + self.skip_n(x.to(w_dec.dtype) / self.x_scale)
        return out * y_scale

    def skip_n(self, xn: Tensor) -> Tensor:
        """Skip term [n, d_model] of unit-scale inputs, in the unit-scale space of the source's own layer."""
        return xn @ self.W_skip.T

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x), x, slot=0 if self.cross else None)

    # training, in unit-scale space
    def sparse_code(self, xn: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """(acts, indices, l0 [n]) of unit-scale inputs: topk gives values [n, k] + indices, others dense [n, d_tc]."""
        if self.cfg.activation == "topk":
            values, indices = topk_encode(xn, self.W_enc, self.b_enc, self.cfg.k)
            return values, indices, (values > 0).sum(-1).float()
        pre = F.linear(xn, self.W_enc, self.b_enc)
        acts = pre.relu() if self.cfg.activation == "relu" else _JumpReLU.apply(pre, self.threshold, self.cfg.bandwidth)
        return acts, None, (acts > 0).sum(-1).float()

    def decode_sparse(self, acts: Tensor, indices: Tensor | None) -> Tensor:
        """Unit-scale decoder output without bias or skip, [n, n_targets * d_model] flattened."""
        flat = self.W_dec.reshape(self.n_features, -1)
        if indices is None:
            return acts @ flat
        return sparse_decode(acts, indices, flat)

    def fired(self, acts: Tensor, indices: Tensor | None) -> Tensor:
        """[d_tc] bool: features active on some token."""
        if indices is None:
            return (acts > 0).any(0)
        live = (acts > 0).reshape(-1).to(torch.uint8)  # a scatter, not a boolean index: no host sync, no nonzero
        out = torch.zeros(self.n_features, dtype=torch.uint8, device=acts.device)
        return out.scatter_reduce_(0, indices.reshape(-1), live, "amax").bool()

    def penalty(self, acts: Tensor, indices: Tensor | None, xn: Tensor, w: Tensor, w_total: Tensor | None = None) -> Tensor:
        """Sparsity penalty (relu: L1 x decoder norm, jumprelu: L0), summed over tokens with weights w / w_total."""
        cfg = self.cfg
        w_total = w.sum() if w_total is None else w_total
        if cfg.activation == "relu":
            norms = self.W_dec.reshape(self.n_features, -1).norm(dim=1)  # [d_tc]
            return cfg.l1_coeff * (w * (acts @ norms)).sum() / w_total
        if cfg.activation == "jumprelu":
            pre = F.linear(xn, self.W_enc, self.b_enc).detach()
            l0 = _Step.apply(pre, self.threshold, cfg.bandwidth).sum(-1)
            return cfg.l0_coeff * (w * l0).sum() / w_total
        return xn.new_zeros(())

    def aux_k(self, xn: Tensor, residual: Tensor, w: Tensor, var: Tensor) -> Tensor:
        """AuxK: the top dead features predict what the live ones missed, normalised by `var` like the FVU."""
        if self.cfg.activation != "topk" or self.cfg.aux_k_coeff == 0:
            return xn.new_zeros(())
        dead = self.tokens_since_fired > self.cfg.dead_tokens
        n_dead = int(dead.sum())
        if n_dead == 0:
            return xn.new_zeros(())
        k_aux = min(n_dead, max(1, self.d_model // 2))
        bias = self.b_enc.masked_fill(~dead, float("-inf"))  # only dead features can be picked
        values, indices = topk_encode(xn, self.W_enc, bias, k_aux)
        values = torch.nan_to_num(values, neginf=0.0)
        recon = self.decode_sparse(values, indices)
        err2 = (recon - residual.detach()).pow(2).sum(-1)
        scale = min(n_dead / k_aux, 1.0)
        return self.cfg.aux_k_coeff * scale * (w * err2).sum() / var.clamp_min(1e-12)

    @torch.no_grad()
    def track_dead(self, fired: Tensor, n_tokens: float) -> None:
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0

    @torch.no_grad()
    def after_step(self) -> None:
        """After an optimiser step: revive dead features, decoder-norm handling."""
        if self.cfg.revive_rate:
            dead = self.tokens_since_fired > self.cfg.dead_tokens
            self.b_enc.data[dead] += self.cfg.revive_rate
        if self.cfg.normalize_decoder:
            flat = self.W_dec.data.reshape(self.n_features, -1)
            flat /= flat.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def resample(self, dead: Tensor, xn: Tensor, residual: Tensor, w: Tensor, generator: torch.Generator) -> None:
        """Re-point dead features [d_tc] bool at tokens drawn with probability ~ w * ||residual||^2.

        xn: unit-scale inputs [n, d]; residual: unit-scale targets minus predictions [n, n_targets * d].
        A new feature's encoder row is the centred direction of its token's input (at the alive rows'
        mean norm, so it competes for the top-k there), and its decoder row points along the residual
        at a fifth of the alive rows' mean norm (so it helps without disturbing the others).
        """
        rows = dead.nonzero().flatten()
        if len(rows) == 0:
            return
        weight = (w * residual.pow(2).sum(-1)).double().cpu()
        pick = torch.multinomial(weight / weight.sum(), len(rows), replacement=True, generator=generator).to(xn.device)
        centre = xn.mean(0)
        direction = xn[pick] - centre
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-6)
        alive = ~dead
        flat = self.W_dec.view(self.n_features, -1)
        enc_norm = self.W_enc[alive].norm(dim=1).mean() if alive.any() else torch.ones((), device=xn.device)
        dec_norm = flat[alive].norm(dim=1).mean() if alive.any() else torch.ones((), device=xn.device)
        self.W_enc[rows] = direction * enc_norm
        self.b_enc[rows] = -(self.W_enc[rows] @ centre)
        fix = residual[pick]
        flat[rows] = fix / fix.norm(dim=1, keepdim=True).clamp_min(1e-6) * dec_norm * 0.2
        if self.log_threshold is not None:
            self.log_threshold[rows] = math.log(self.cfg.threshold_init)
        self.tokens_since_fired[rows] = 0

    @torch.no_grad()
    def init_from_data(self, x: Tensor, y: Tensor, w: Tensor) -> None:
        """Data-driven initialisation from tokens x [n, d], y [n, (n_targets,) d] with weights w [n].

        Sets the scales; points each encoder row at the centred input of a randomly drawn token and its
        decoder row at that token's centred output (so every feature starts out firing on real data);
        b_dec is the mean output and b_enc centres the pre-activations.
        """
        self.x_scale.copy_(_rms(x, w))
        if self.cross:
            self.y_scale.copy_(torch.stack([_rms(y[:, j], w) for j in range(self.n_targets)]))
            yn = y / self.y_scale[:, None]
        else:
            self.y_scale.copy_(_rms(y, w))
            yn = y / self.y_scale
        xn = x / self.x_scale
        x_mean, y_mean = _mean(xn, w), _mean(yn.reshape(len(yn), -1), w).reshape(yn.shape[1:])
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.layer + 1)
        if len(x) >= self.n_features:  # distinct tokens when the batch has enough
            pick = torch.randperm(len(x), generator=gen)[: self.n_features].to(x.device)
        else:
            pick = torch.randint(len(x), (self.n_features,), generator=gen).to(x.device)
        enc = xn[pick] - x_mean
        self.W_enc.copy_(enc / enc.norm(dim=1, keepdim=True).clamp_min(1e-6))
        dec = (yn[pick] - y_mean).reshape(self.n_features, -1)
        active = self.cfg.k if self.cfg.activation == "topk" else max(1, self.n_features // 10)
        dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-6) / math.sqrt(active)
        self.W_dec.copy_(dec.reshape(self.W_dec.shape))
        if self.cross:  # only the source's own layer gets the mean: the set sums every source's bias
            self.b_dec.zero_()
            self.b_dec[0].copy_(y_mean[0])
        else:
            self.b_dec.copy_(y_mean)
        self.b_enc.copy_(-self.W_enc @ x_mean)
        self.initialized.fill_(True)


class TranscoderSet(nn.Module):
    """The transcoders of a set of layers: per-layer (PLT) or one cross-layer transcoder (CLT).

    A CLT is stored as one `Transcoder` per source layer whose decoder has a slot per target layer
    (the source and every later layer of the set); the output at layer j sums the slots aimed at j.
    """

    def __init__(self, d_model: int, cfg: TranscoderConfig, layers: list[int], all_layers: list[int] | None = None):
        """`layers`: the layers held here; `all_layers`: every layer of the run (a sharded PLT holds a subset)."""
        super().__init__()
        cfg.check()
        self.cfg, self.d_model = cfg, d_model
        self.layers = sorted(layers)
        self.all_layers = sorted(all_layers or layers)
        if cfg.cross_layer and self.layers != self.all_layers:
            raise ValueError("a cross-layer transcoder cannot be split across ranks: its sources write to later layers")
        n = len(self.all_layers)
        self.tc = nn.ModuleDict({
            str(l): Transcoder(d_model, cfg, l, n - self.all_layers.index(l) if cfg.cross_layer else 1) for l in self.layers
        })

    @property
    def cross_layer(self) -> bool:
        return self.cfg.cross_layer

    def __getitem__(self, layer: int) -> Transcoder:
        return self.tc[str(layer)]

    @property
    def initialized(self) -> bool:
        return all(bool(t.initialized) for t in self.tc.values())

    def sources(self, layer: int) -> list[int]:
        """Layers whose features write to `layer`'s MLP output."""
        return [s for s in self.layers if s <= layer] if self.cross_layer else [layer]

    def encode(self, layer: int, x: Tensor) -> Tensor:
        """Feature activations [n, d_tc] of layer `layer` from its raw MLP input x [n, d_model]."""
        return self[layer].encode(x)

    def decode(self, layer: int, acts: dict[int, Tensor], xs: dict[int, Tensor] | None = None) -> Tensor:
        """Predicted raw MLP output [n, d_model] of `layer` from the activations of its sources."""
        xs = xs or {}
        if not self.cross_layer:
            return self[layer].decode(acts[layer], xs.get(layer))
        parts = [self[s].decode(acts[s], xs.get(s), slot=self._slot(s, layer)) for s in self.sources(layer)]
        return torch.stack(parts).sum(0)

    def _slot(self, source: int, target: int) -> int:
        return self.all_layers.index(target) - self.all_layers.index(source)

    def after_step(self) -> None:
        for t in self.tc.values():
            t.after_step()

    @torch.no_grad()
    def init_from_data(self, xs: dict[int, Tensor], ys: dict[int, Tensor], w: Tensor) -> None:
        """Data-driven initialisation of every layer from one batch (xs, ys: layer -> [n, d_model]); with data
        parallelism pass the global batch, so every rank starts from the same weights."""
        for l in self.layers:
            y = torch.stack([ys[j] for j in self.all_layers[self.all_layers.index(l):]], 1) if self.cross_layer else ys[l]
            self[l].init_from_data(xs[l], y, w)

    @torch.no_grad()
    def resample_dead(self, xs: dict[int, Tensor], ys: dict[int, Tensor], w: Tensor, step: int) -> dict[int, Tensor]:
        """Resample the dead features of every layer on this batch; returns layer -> resampled rows (bool [d_tc])."""
        preds = {}
        acts = {l: self[l].encode(xs[l]) for l in self.layers}
        for l in self.all_layers if self.cross_layer else self.layers:
            preds[l] = self.decode(l, acts, xs)
        out = {}
        for l in self.layers:
            t = self[l]
            dead = t.tokens_since_fired > self.cfg.dead_tokens
            if not dead.any():
                continue
            targets = self.all_layers[self.all_layers.index(l):] if self.cross_layer else [l]
            scales = t.y_scale if self.cross_layer else t.y_scale.reshape(1)
            residual = torch.cat([(ys[j] - preds[j]) / scales[n] for n, j in enumerate(targets)], dim=-1)
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + l * 7919 + step)
            t.resample(dead, xs[l] / t.x_scale, residual, w, gen)
            out[l] = dead
        return out

    def terms(self, xs: dict[int, Tensor], ys: dict[int, Tensor], w: Tensor,
              reduce: Reduce | None = None, world: int = 1) -> dict[int, Terms]:
        """Training terms of every layer held here on tokens xs, ys (layer -> [n, d_model]) with weights w [n].

        With data parallelism pass `reduce` (sum over ranks) and `world`: each rank's loss is then its
        share of the global batch's loss times `world` (see `weighted_fvu`).
        """
        w_total = (reduce or _identity)(w.sum()) / world
        if self.cross_layer:
            return self._clt_terms(xs, ys, w, reduce, world, w_total)
        out = {}
        for l in self.layers:
            t = self[l]
            xn, yn = xs[l] / t.x_scale, ys[l] / t.y_scale
            acts, idx, l0 = t.sparse_code(xn)
            recon = t.decode_sparse(acts, idx) + t.b_dec
            if t.W_skip is not None:
                recon = recon + t.skip_n(xn)
            fvu, err, var = weighted_fvu((recon - yn).pow(2).sum(-1), yn, w, reduce, world)
            loss = fvu + t.penalty(acts, idx, xn, w, w_total) + t.aux_k(xn, yn - recon, w, var)
            out[l] = Terms(loss, fvu, l0.mean(), t.fired(acts, idx), err, var, acts.detach(), idx)
        return out

    def _clt_terms(self, xs: dict[int, Tensor], ys: dict[int, Tensor], w: Tensor, reduce: Reduce | None,
                   world: int, w_total: Tensor) -> dict[int, Terms]:
        n_layers = len(self.layers)
        codes, recon = {}, [0.0] * n_layers
        for i, s in enumerate(self.layers):
            t = self[s]
            xn = xs[s] / t.x_scale
            acts, idx, l0 = t.sparse_code(xn)
            slots = t.decode_sparse(acts, idx).reshape(-1, t.n_targets, self.d_model) + t.b_dec
            for slot in range(t.n_targets):
                recon[i + slot] = recon[i + slot] + slots[:, slot]
            if t.W_skip is not None:
                recon[i] = recon[i] + t.skip_n(xn)
            codes[s] = (xn, acts, idx, l0)
        out, residual, variance = {}, {}, {}
        for i, j in enumerate(self.layers):
            yn = ys[j] / self[j].y_scale[0]
            fvu, err, var = weighted_fvu((recon[i] - yn).pow(2).sum(-1), yn, w, reduce, world)
            residual[j], variance[j] = yn - recon[i], var
            xn, acts, idx, l0 = codes[j]
            loss = fvu + self[j].penalty(acts, idx, xn, w, w_total)
            out[j] = Terms(loss, fvu, l0.mean(), self[j].fired(acts, idx), err, var, acts.detach(), idx)
        for i, s in enumerate(self.layers):  # AuxK: dead features of s predict what every target of s missed
            later = self.layers[i:]
            res = torch.cat([residual[j] for j in later], -1)
            aux = self[s].aux_k(codes[s][0], res, w, torch.stack([variance[j] for j in later]).sum())
            out[s].loss = out[s].loss + aux
        return out

    @torch.no_grad()
    def export(self) -> dict[int, dict[str, Tensor]]:
        """Raw-space tensors per layer in circuit-tracer's layout (scales folded in), on the CPU in float32."""
        out = {}
        for l in self.layers:
            t = self[l]
            y_scale = t.y_scale[0] if self.cross_layer else t.y_scale
            w_dec = t.W_dec * (t.y_scale[None, :, None] if self.cross_layer else t.y_scale)
            if self.cross_layer:  # every source's bias slot aimed at l
                b_dec = sum(self[s].b_dec[self._slot(s, l)] * y_scale for s in self.sources(l))
            else:
                b_dec = t.b_dec * y_scale
            tensors = {"W_enc": t.W_enc / t.x_scale, "b_enc": t.b_enc, "W_dec": w_dec, "b_dec": b_dec}
            if t.W_skip is not None:
                tensors["W_skip"] = t.W_skip * (y_scale / t.x_scale)
            if t.threshold is not None:
                tensors["threshold"] = t.threshold
            if self.cfg.activation == "topk":
                tensors["k"] = torch.tensor(self.cfg.k)
            out[l] = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[int, dict[str, Tensor]], cfg: TranscoderConfig) -> "TranscoderSet":
        """Rebuild a set from raw-space per-layer tensors (what `export` returns, or a circuit-tracer layout)."""
        layers = sorted(tensors)
        first = tensors[layers[0]]
        cfg = TranscoderConfig(**{**cfg.__dict__, "n_features": first["W_enc"].shape[0], "skip": "W_skip" in first})
        out = cls(first["W_enc"].shape[1], cfg, layers)
        with torch.no_grad():
            for l in layers:
                t, src = out[l], tensors[l]
                t.W_enc.copy_(src["W_enc"])
                t.b_enc.copy_(src["b_enc"])
                t.W_dec.copy_(src["W_dec"].reshape(t.W_dec.shape))
                if cfg.cross_layer:
                    t.b_dec.zero_()
                    t.b_dec[0].copy_(src["b_dec"])
                else:
                    t.b_dec.copy_(src["b_dec"])
                if t.W_skip is not None:
                    t.W_skip.copy_(src["W_skip"])
                if t.log_threshold is not None:
                    t.log_threshold.copy_(src["threshold"].clamp_min(1e-30).log())
                t.initialized.fill_(True)
        return out
