"""Barrier steering: keep the attention a query pays to the image above tau, with the closed-form step of
the linearised barrier, on the residual stream before chosen decoder layers.

At layer i and a steered position (the prompt's last token at prefill; every decoded token):

    h(x) = mean over heads of sum over image keys j of softmax_j(q(x) . k_j * scaling)

with q(x) = RoPE(q_proj(input_norm(x))), the layer's own modules and the position embeddings it
receives, against the keys the layer really uses: at prefill the keys of the same forward (computed
from the same normalised input), while decoding the layer's KV cache plus the current token's own key
RoPE(k_proj(input_norm(x))), which depends on x exactly as it will inside the layer. Padding keys are
masked as the layer masks them. If h(x) < tau, with g = grad_x h(x):

    theta = alpha * (tau - h(x)) / ||g||^2 * g        (the minimal ||theta|| with h(x) + g . theta = tau)

(aimed at tau + margin, a hair above, so that iterates approaching tau from below cross it) is added
to x (the residual stream, before the layer), shrunk to ||theta|| <= max_step * ||x||, and the step is
repeated until h >= tau or max_iters steps were taken. Image keys can leave out attention
sinks: image tokens whose layer-input norm exceeds sink_ratio times the median image-token norm of their
row (measured at prefill, kept while decoding).

With `record=True` every steered position of every layer leaves a record: h before, h after the edit
(recomputed), ||theta|| / ||x||, iterations. `logit_effects` measures how far the edit moves the answer
logits ("Yes" minus "No"), for all layers together and for each layer alone.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from llava_circuits.artifacts import check_compatible, read_artifact, write_artifact
from llava_circuits.models.anatomy import Anatomy
from llava_circuits.models.load import Loaded
from llava_circuits.sites import Step, Tracker, cache_of
from llava_circuits.steering.base import Intervention

PHASES = ("prefill", "decode")


@dataclass
class BarrierConfig:
    """Where barrier steering acts and how hard."""

    tau: float = 0.3
    """Barrier level: the least attention mass (mean over heads) the query must put on image tokens."""
    alpha: float = 1.0
    """Multiplier of the closed-form step (1: lands on tau to first order; above 1 overshoots)."""
    layers: list[int] | None = None
    """Decoder layers to steer before; None: every layer."""
    phases: list[str] = field(default_factory=lambda: list(PHASES))
    """prefill (the prompt's last token) and/or decode (every generated token)."""
    max_step: float = 1.0
    """Cap of one step: ||theta|| <= max_step * ||x||."""
    max_iters: int = 20
    """Steps per position at most, repeated while h < tau. RMSNorm makes h blind to ||x||, so a step along the
    gradient turns x by less than the linearisation assumes and large moves take several (up to 9 on the toy's
    demo, where 5 left 17 of 30832 positions below tau); they stop as soon as h >= tau."""
    margin: float = 1e-3
    """Each step aims at tau + margin: linearised steps approach tau from below where h is concave and would
    otherwise stop short of it by rounding errors (5e-8 on the toy) when max_iters runs out."""
    sink_ratio: float | None = None
    """Leave out image tokens whose layer-input norm exceeds this many times the row's median (sinks)."""

    def __post_init__(self) -> None:
        bad = sorted(set(self.phases) - set(PHASES))
        if bad or not self.phases:
            raise ValueError(f"phases must be a non-empty subset of {PHASES}, got {self.phases!r}")
        if not 0.0 < self.tau < 1.0:
            raise ValueError(f"tau must lie in (0, 1), got {self.tau}")
        if self.max_iters < 1 or self.max_step <= 0 or self.alpha <= 0 or not 0 <= self.margin < 1 - self.tau:
            raise ValueError("max_iters must be >= 1, max_step and alpha > 0, margin in [0, 1 - tau)")


@dataclass
class Keys:
    """What the query at the steered position attends to, apart from its own key."""

    other: Tensor  # [batch, n_kv_heads, T - 1, head_dim] the keys the layer uses (RoPE applied)
    cos: Tensor  # [batch, head_dim] rotary cos at the query position
    sin: Tensor  # [batch, head_dim]
    allowed: Tensor  # [batch, T] bool: keys the query may attend to (the last one is its own)
    image: Tensor  # [batch, T] bool: image keys counted in h

    shared: dict = field(default_factory=dict, repr=False, compare=False)
    """Tensors made from cos, sin, allowed and image (not from `other`): the layers of one forward share them."""

    def _made(self, name: str, make: Callable[[], Tensor]) -> Tensor:
        if name not in self.shared:
            self.shared[name] = make()
        return self.shared[name]

    @property
    def bias(self) -> Tensor:
        """[batch, 1, 1, T] added to the scores: 0 for keys the query may attend to, -inf for the others."""
        def make():
            zero = torch.zeros(self.allowed.shape, dtype=torch.promote_types(self.other.dtype, torch.float32),
                               device=self.allowed.device)
            return zero.masked_fill(~self.allowed, float("-inf"))[:, None, None, :]
        return self._made("bias", make)

    @property
    def rope(self) -> Tensor:
        """[batch, hd, hd] RoPE at the query position as a matrix: v @ rope = v cos + rotate_half(v) sin."""
        def make():
            hd = self.cos.shape[-1]
            half = hd // 2
            rot = torch.zeros(hd, hd, dtype=self.cos.dtype, device=self.cos.device)  # v @ rot = rotate_half(v)
            rot[torch.arange(half, hd), torch.arange(half)] = -1
            rot[torch.arange(half), torch.arange(half, hd)] = 1
            return torch.diag_embed(self.cos) + rot * self.sin[:, None, :]
        return self._made("rope", make)

    @property
    def rope_t(self) -> Tensor:
        """[batch, hd, hd] the transpose of `rope` (wide): g @ it takes a gradient back through RoPE."""
        return self._made("rope_t", lambda: wide(self.rope).transpose(-1, -2))

    @property
    def image_row(self) -> Tensor:
        """[batch, 1, 1, T] image keys as 0 / 1 in the attention's dtype."""
        return self._made("image_row", lambda: self.image[:, None, None, :].to(
            torch.promote_types(self.other.dtype, torch.float32)))

    @property
    def image_column(self) -> Tensor:
        """[batch, 1, T, 1] the same, as a column: probs @ it sums the mass on image keys."""
        return self._made("image_column", lambda: self.image_row.transpose(-1, -2))


def wide(t: Tensor) -> Tensor:
    """t in float32 at least (float64 stays float64): softmax and steps are not taken in half precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@dataclass(frozen=True)
class LayerMath:
    """What h(x) at one decoder layer is computed from, looked up once: on small models module lookups and calls
    cost more than the arithmetic."""

    norm: torch.nn.Module
    """The layer's input norm."""
    eps: float | None
    """RMSNorm's epsilon when the norm is written out here (Llama-style RMSNorm, plain q/k weights: the closed-form
    gradient applies); None: the norm module is called and autograd takes the gradient."""
    q_proj: torch.nn.Module
    k_proj: torch.nn.Module
    scaling: float
    """The layer's score scale (head_dim ** -0.5 for Llama)."""
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, anatomy: Anatomy, layer: int) -> "LayerMath":
        norm = anatomy.input_norm(layer)
        eps = norm.variance_epsilon if closed_form_grad(anatomy, layer) else None
        return cls(norm, eps, anatomy.proj(layer, "q_proj"), anatomy.proj(layer, "k_proj"),
                   anatomy.attn(layer).scaling, anatomy.n_heads, anatomy.n_kv_heads, anatomy.head_dim)

    @property
    def closed(self) -> bool:
        """Whether `image_attention_grad` applies."""
        return self.eps is not None


@dataclass
class Attention:
    """What h(x) was computed from, kept for its gradient."""

    x: Tensor  # [b, d] the residual
    r: Tensor | None  # [b, 1] RMSNorm's 1 / rms(x) (None: the layer's norm module was called)
    ms: Tensor | None  # [b, 1] mean(x^2) + eps, whose rsqrt is r
    q: Tensor  # [b, KV, groups, hd] queries (RoPE applied)
    k: Tensor  # [b, KV, T, hd] every key the query attends to, its own (RoPE applied, made from x) last
    probs: Tensor  # [b, KV, groups, T] attention probabilities (wide)
    mass: Tensor  # [b, KV, groups] attention mass on image keys, per query head
    h: Tensor  # [b] its mean over heads


def closed_form_grad(anatomy: Anatomy, layer: int) -> bool:
    """Whether the layer has a Llama-style RMSNorm and plain floating-point q/k projections: then its norm is
    written out here and `image_attention_grad` applies. Others (Gemma's 1 + w norm, 4/8-bit weights) call
    the norm module and take autograd's gradient."""
    norm = anatomy.input_norm(layer)
    plain = all(isinstance(anatomy.proj(layer, n), torch.nn.Linear) and anatomy.proj(layer, n).weight.is_floating_point()
                for n in ("q_proj", "k_proj"))
    name = type(norm).__name__
    return plain and name.endswith("RMSNorm") and not name.startswith("Gemma") and hasattr(norm, "variance_epsilon")


def attention_of(x: Tensor, m: LayerMath, keys: Keys) -> Attention:
    """The attention the query at residual x [batch, d_model] pays, as the layer `m` describes computes it (its own
    key included, made from the same x), and h(x), its mean mass on image keys over heads.

    Llama-style norms are written out (LlamaRMSNorm's arithmetic, in float32 or wider) so that the gradient can
    reuse 1 / rms(x); RoPE is one matrix product for queries and the own key. Written for few ops: on small models
    barrier steering costs what its ops cost to dispatch.
    """
    b, kv, hd = x.shape[0], m.n_kv_heads, m.head_dim
    r = ms = None
    if m.eps is not None:
        xw = wide(x)
        ms = torch.linalg.vecdot(xw, xw).unsqueeze(-1).div_(x.shape[-1]).add_(m.eps)
        r = torch.rsqrt(ms)
        xn = m.norm.weight * (xw * r).to(x.dtype)
    else:
        xn = m.norm(x)
    qk = torch.cat([m.q_proj(xn).view(b, m.n_heads, hd), m.k_proj(xn).view(b, kv, hd)], dim=1) @ keys.rope
    q = qk[:, : m.n_heads].view(b, kv, m.n_heads // kv, hd)  # query head h reads KV head h // groups
    k = torch.cat([keys.other, qk[:, m.n_heads :, None].to(keys.other.dtype)], dim=2)  # [b, KV, T, hd]
    scores = q.to(k.dtype) @ k.transpose(-1, -2)  # [b, KV, G, T]
    probs = torch.softmax(torch.add(keys.bias, wide(scores), alpha=m.scaling), dim=-1)
    mass = (probs @ keys.image_column)[..., 0]  # [b, KV, G]
    return Attention(x, r, ms, q, k, probs, mass, mass.mean(dim=(1, 2)))


def image_attention(x: Tensor, m: LayerMath, keys: Keys) -> Tensor:
    """h(x) [batch]: mean over heads of the attention mass the query at residual x [batch, d_model] puts on
    image keys, as the layer `m` describes computes attention (its own key included, made from the same x)."""
    return attention_of(x, m, keys).h


def image_attention_grad(att: Attention, m: LayerMath, keys: Keys) -> Tensor:
    """grad_x h(x) [b, d] in closed form (layers where `m.closed`), the chain rule written out without an
    autograd graph (3x fewer ops, which is what barrier steering costs on small models):

        dh/ds_j = p_j (image_j - mass) / n_heads       per head, over keys j (the own key last)
        dq      = scaling sum_j dh/ds_j k_j,           dk_own = scaling sum over the KV group of dh/ds_own q
        RoPE is v @ R (`Keys.rope`), so its transpose takes g to g @ R^T
        dn      = dq_pre W_q + dk_pre W_k,              n = w x r with r = ms^-1/2, ms = mean x^2 + eps:
        dx      = r (w dn - (x . w dn) / (d_model ms) x)
    """
    b, d = att.x.shape
    ds = att.probs * (keys.image_row - att.mass[..., None])  # [b, KV, G, T], times scaling / n_heads below
    k, q = wide(att.k), wide(att.q)
    dq = ds @ k  # [b, KV, G, hd]
    dk = ds[..., -1:].transpose(-1, -2) @ q  # [b, KV, 1, hd]
    g = torch.cat([dq.reshape(b, m.n_heads, -1), dk.reshape(b, m.n_kv_heads, -1)], dim=1) @ keys.rope_t
    g = g.view(b, -1)
    w_q, w_k = wide(m.q_proj.weight), wide(m.k_proj.weight)
    dn = torch.addmm(g[:, m.n_heads * m.head_dim :] @ w_k, g[:, : m.n_heads * m.head_dim], w_q)  # [b, d]
    x = wide(att.x)
    wdn = wide(m.norm.weight) * dn
    coef = torch.linalg.vecdot(x, wdn).unsqueeze(-1).div_(att.ms)
    return torch.addcmul(wdn, coef, x, value=-1.0 / d).mul_(att.r * (m.scaling / m.n_heads))


def closed_form_step(x: Tensor, h: Tensor, g: Tensor, tau: float, alpha: float = 1.0,
                     max_step: float = math.inf, rows: Tensor | None = None) -> Tensor:
    """theta = alpha (tau - h)+ / ||g||^2 g for rows x [batch, d_model], capped at ||theta|| <= max_step ||x||;
    `rows` (bool [batch]): the rows to move, the others get theta = 0."""
    h, g = wide(h), wide(g)
    gg = torch.linalg.vecdot(g, g).clamp_min_(1e-30)  # [b]
    scale = (tau - h).clamp_min_(0).div_(gg)
    if alpha != 1.0:
        scale = scale.mul_(alpha)
    if math.isfinite(max_step):  # ||theta|| = scale ||g||
        scale = torch.minimum(scale, torch.linalg.vector_norm(wide(x), dim=-1).mul_(max_step).div_(gg.sqrt()))
    if rows is not None:
        scale = scale.mul_(rows)
    return (scale[:, None] * g).to(x.dtype)


def autograd_grad(x: Tensor, h_fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """h(x) [b] and grad h(x) [b, d] for rows x [batch, d_model] by autograd through any h_fn, even under
    inference_mode/no_grad."""
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        h = h_fn(xg)  # [b]
        (g,) = torch.autograd.grad(h.sum(), xg)  # [b, d]
    return wide(h.detach()), wide(g)


def barrier_theta(x: Tensor, h_fn: Callable[[Tensor], Tensor], tau: float, alpha: float = 1.0,
                  max_step: float = math.inf) -> tuple[Tensor, Tensor, Tensor]:
    """theta, h(x) and grad h(x) for rows x [batch, d_model], the gradient by autograd (`autograd_grad`).
    Rows already at or above tau get theta = 0."""
    h, g = autograd_grad(x, h_fn)
    return closed_form_step(x, h, g, tau, alpha, max_step), h, g


class Barrier(Intervention):
    """Barrier steering as an Intervention: forward pre-hooks on the chosen decoder layers."""

    kind = "barrier"

    def __init__(self, config: BarrierConfig | None = None, record: bool = False, fingerprint=None):
        self.config = config or BarrierConfig()
        self.record = record
        self.records: list[dict] = []
        """One dict per (prompt or generated token, layer, batch row) while record is on."""
        self.fingerprint = fingerprint
        self._handles: list = []
        self._tracker: Tracker | None = None
        self._anatomy: Anatomy | None = None
        self._math: dict[int, LayerMath] = {}
        self._inference = False
        self._sinks: dict[int, Tensor] = {}
        self._step_keys: tuple[Step, Keys] | None = None  # the Keys of this forward's first layer, `other` aside
        self._calls, self._counted = 0, None

    # --- attaching --------------------------------------------------------------------------------
    def attach(self, loaded: Loaded) -> None:
        if self._handles:
            raise RuntimeError("Barrier is already attached; detach it first")
        a = self._anatomy = loaded.anatomy
        if a.image_token_id is None:
            raise ValueError("barrier steering needs a vision-language model (image tokens to attend to)")
        layers = self.config.layers if self.config.layers is not None else range(a.n_layers)
        for i in layers:
            if not 0 <= i < a.n_layers:
                raise ValueError(f"barrier layer {i} out of range: the model has {a.n_layers} layers")
        self._tracker = Tracker(loaded.model, a)
        self._math = {i: LayerMath.of(a, i) for i in layers}
        # Without autograd (closed-form gradients everywhere) the hooks run in inference mode: half the op overhead.
        # Autograd cannot save inference tensors, so one layer that needs it keeps every hook out of it.
        self._inference = all(m.closed for m in self._math.values())
        for i in layers:
            hook = lambda module, args, kwargs, i=i: self._hook(i, args, kwargs)
            self._handles.append(a.layer(i).register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._tracker is not None:
            self._tracker.remove()
            self._tracker = None
        self._sinks = {}
        self._math = {}
        self._step_keys = None

    def _hook(self, layer: int, args: tuple, kwargs: dict):
        step = self._tracker.step
        if step is not None and step.phase == "prefill" and step is not self._counted:
            self._calls, self._counted = self._calls + 1, step  # a new prompt batch: numbers the records
        if step is None:
            return None
        x = args[0] if args else kwargs["hidden_states"]  # [b, L, d]
        if step.phase not in self.config.phases:
            if step.phase == "prefill" and self.config.sink_ratio is not None:  # sinks are the prompt's: note them
                total = step.past_len + step.length
                self._sink_mask(layer, x, self._anatomy.image_mask(step.seq_ids[:, :total]), step, total)
            return None
        with torch.inference_mode(self._inference):
            keys = self._keys(layer, x, kwargs, step)
            last = self._steer(layer, x[:, -1], keys, step)
        if last is None:
            return None
        x = x.clone()  # a normal tensor again, whatever mode `last` was made in
        x[:, -1] = last
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    @torch.no_grad()
    def _keys(self, layer: int, x: Tensor, kwargs: dict, step: Step) -> Keys:
        """The keys layer `layer` will attend with, for the query at the last position of x [b, L, d]."""
        a, (b, length, _) = self._anatomy, x.shape
        cos, sin = kwargs["position_embeddings"]  # [b or 1, L, hd]
        parts = []
        if step.past_len:
            parts.append(cache_of(kwargs).layers[layer].keys[:, :, : step.past_len])
        if length > 1:  # earlier positions of this forward: keys from the same normalised input
            k = a.proj(layer, "k_proj")(a.input_norm(layer)(x[:, :-1]))
            k = k.view(b, length - 1, a.n_kv_heads, a.head_dim).transpose(1, 2)
            k, _ = apply_rotary_pos_emb(k, k, cos[:, :-1], sin[:, :-1])
            parts.append(k)
        if not parts:  # a one-token prompt: the query sees only itself
            parts.append(x.new_zeros(b, a.n_kv_heads, 0, a.head_dim))
        other = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # decoding: the cache itself, no copy
        if self._step_keys is None or self._step_keys[0] is not step:  # what every layer of this forward shares
            total = step.past_len + length
            if step.seq_ids is None:
                raise ValueError("barrier steering needs input_ids (to find image tokens), not inputs_embeds")
            image = a.image_mask(step.seq_ids[:, :total])  # [b, T]
            mask = step.attention_mask
            allowed = mask[:, :total].bool() if mask is not None else torch.ones_like(image)
            self._step_keys = step, Keys(other, cos[:, -1].expand(b, -1).clone(), sin[:, -1].expand(b, -1).clone(),
                                         allowed, image)
        first = self._step_keys[1]
        if self.config.sink_ratio is not None:  # sinks differ by layer: so do the image-derived tensors
            image = first.image & ~self._sink_mask(layer, x, first.image, step, first.image.shape[1])
            return dataclasses.replace(first, other=other, image=image, shared={})
        return dataclasses.replace(first, other=other)  # `shared` is the same dict: made once per forward

    def _sink_mask(self, layer: int, x: Tensor, image: Tensor, step: Step, total: int) -> Tensor:
        """Bool [b, T]: image tokens whose input norm at prefill exceeds sink_ratio x the row's median."""
        if step.phase == "prefill":
            norms = x.float().norm(dim=-1)  # [b, L]
            median = torch.stack([n[m].median() if m.any() else n.new_tensor(0.0) for n, m in zip(norms, image)])
            self._sinks[layer] = image & (norms > self.config.sink_ratio * median[:, None])
        sinks = self._sinks.get(layer, torch.zeros_like(image))
        return torch.nn.functional.pad(sinks, (0, total - sinks.shape[1]))[:, :total]

    def _steer(self, layer: int, x0: Tensor, keys: Keys, step: Step) -> Tensor | None:
        """x0 [b, d] moved until h >= tau (or max_iters steps); None when no row needs it."""
        cfg, m = self.config, self._math[layer]
        live = keys.image.any(dim=-1)  # rows with image keys
        with torch.no_grad():
            att = attention_of(x0, m, keys)
        h0 = att.h
        active = live & (h0 < cfg.tau)
        if bool(active.any()) and not m.closed:  # autograd needs normal tensors: the cache holds inference tensors
            keys = dataclasses.replace(keys, other=keys.other.clone())
        x, h, iters = x0, h0, 0
        while bool(active.any()) and iters < cfg.max_iters:
            if m.closed:
                with torch.no_grad():
                    g = image_attention_grad(att, m, keys)
            else:
                g = autograd_grad(x, lambda v: image_attention(v, m, keys))[1]
            with torch.no_grad():
                x = x + closed_form_step(x, h, g, cfg.tau + cfg.margin, cfg.alpha, cfg.max_step, active)
                att = attention_of(x, m, keys)
            h = att.h
            active, iters = live & (h < cfg.tau), iters + 1
        if self.record:
            ratio = wide(x - x0).norm(dim=-1) / wide(x0).norm(dim=-1).clamp_min(1e-30)
            steered = (live & (h0 < cfg.tau)).tolist()
            position = step.past_len + step.length - 1
            for row, (s, before, after, r) in enumerate(zip(steered, h0.tolist(), h.tolist(), ratio.tolist())):
                self.records.append({"call": self._calls, "layer": layer, "phase": step.phase, "position": position,
                                     "row": row, "steered": s, "h_before": before, "h_after": after,
                                     "theta_ratio": r, "iters": iters if s else 0})
        return None if iters == 0 else x

    # --- describing and saving --------------------------------------------------------------------
    def with_config(self, **changes) -> "Barrier":
        """A fresh Barrier (no records) with some settings changed."""
        return Barrier(dataclasses.replace(self.config, **changes), self.record, self.fingerprint)

    def summary(self) -> dict:
        """Figures over the steered records: how many, h after minus tau (min), ||theta||/||x|| (mean, max)."""
        steered = [r for r in self.records if r["steered"]]
        out = {"positions_seen": len(self.records), "positions_steered": len(steered)}
        if steered:
            out |= {"min_h_after_minus_tau": min(r["h_after"] for r in steered) - self.config.tau,
                    "mean_h_before": sum(r["h_before"] for r in steered) / len(steered),
                    "mean_theta_ratio": sum(r["theta_ratio"] for r in steered) / len(steered),
                    "max_theta_ratio": max(r["theta_ratio"] for r in steered),
                    "steered_by_layer": {str(i): sum(r["layer"] == i for r in steered)
                                         for i in sorted({r["layer"] for r in steered})}}
        return out

    def describe(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self.config)}

    def save(self, path: str | Path) -> Path:
        if self.fingerprint is None:
            raise ValueError("Barrier.save needs the model fingerprint (Barrier(..., fingerprint=loaded.fingerprint()))")
        return write_artifact(path, self.kind, self.fingerprint, {}, dataclasses.asdict(self.config)).path

    @classmethod
    def load(cls, path: str | Path, loaded: Loaded) -> "Barrier":
        artifact = read_artifact(path, expected_kind=cls.kind)
        check_compatible(artifact, loaded.fingerprint())
        return cls(BarrierConfig(**artifact.config), fingerprint=loaded.fingerprint())


# --- does the edit move the answer? -----------------------------------------------------------------

def answer_token(loaded: Loaded, word: str) -> int:
    """The first token id of `word` as the model would start an answer with it."""
    ids = loaded.tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the tokenizer makes no token of {word!r}")
    return ids[0]


@torch.no_grad()
def logit_effects(loaded: Loaded, barrier: Barrier, inputs: dict, answers: Sequence[str] = ("Yes", "No")) -> dict:
    """Margin logit(answers[0]) - logit(answers[1]) at the first answer token, without and with the barrier
    (all its layers), and its change with each layer steered alone: lists over the batch rows of `inputs`."""
    pos, neg = (answer_token(loaded, w) for w in answers)

    def margin(steer: Barrier | None) -> Tensor:
        if steer is None:
            logits = loaded.model(**inputs, logits_to_keep=1).logits[:, -1].float()
        else:
            with steer.applied(loaded):
                logits = loaded.model(**inputs, logits_to_keep=1).logits[:, -1].float()
        return logits[:, pos] - logits[:, neg]  # [b]

    base = margin(None)
    prefill = barrier.with_config(phases=["prefill"])
    layers = prefill.config.layers if prefill.config.layers is not None else range(loaded.anatomy.n_layers)
    return {
        "margin_before": base.tolist(),
        "margin_after": margin(prefill).tolist(),
        "margin_change_by_layer": {str(i): (margin(prefill.with_config(layers=[i])) - base).tolist() for i in layers},
    }


# --- the command and the demo stage -----------------------------------------------------------------

RUN_DEFAULTS = {"model": None, "quantization": None, "dtype": "auto", "batch_size": 8, "limit": None, "images": None,
                "bench": "pope", "max_new_tokens": None, "diagnose": 32}


def barrier_eval(data: str, out: str, model: str | None = None, config: str | None = None, bench: str | None = None,
                 images: str | None = None, limit: int | None = None, batch_size: int | None = None,
                 max_new_tokens: int | None = None, quantization: str | None = None, dtype: str | None = None,
                 tau: float | None = None, alpha: float | None = None, layers: list[int] | None = None,
                 phases: list[str] | None = None, max_step: float | None = None, max_iters: int | None = None,
                 sink_ratio: float | None = None, diagnose: int | None = None) -> dict:
    """Answer a benchmark with and without barrier steering in one run; metrics side by side, with diagnostics.

    Writes OUT/barrier (the artifact: its configuration), baseline/, intervened/, metrics.json (with a "barrier"
    block: positions steered, min h after minus tau, ||theta||/||x||, answer-logit changes), diagnostics.jsonl
    (h before / after and ||theta||/||x|| per layer and position) and logit_effects.json.

    Args:
        data: the benchmark file or folder in its official format
        out: run directory
        model: Hub id or local model directory (or `model:` in the recipe)
        config: YAML recipe: run options (model, bench, dtype, ...) and a `barrier:` block of BarrierConfig fields
        bench: benchmark name (default pope)
        images: image folder (default: next to the data)
        limit: answer only the first N samples
        batch_size: samples per batch (left-padded)
        max_new_tokens: generation length (default: the benchmark's)
        quantization: 4bit or 8bit (bitsandbytes)
        dtype: auto, float32, bfloat16 or float16
        tau: barrier level: least attention mass on image tokens (mean over heads)
        alpha: multiplier of the closed-form step
        layers: decoder layer to steer before; repeat for several (default: all)
        phases: prefill and/or decode; repeat for both (default: both)
        max_step: cap of one step, as a fraction of ||x||
        max_iters: steps per position at most (repeated while h < tau)
        sink_ratio: leave out image tokens whose norm exceeds this multiple of the median (attention sinks)
        diagnose: answer-logit diagnostics ("Yes" minus "No", per layer) on the first N samples (POPE only)
    """
    from llava_circuits.data.readers import read_benchmark
    from llava_circuits.evaluation.run import write_json
    from llava_circuits.evaluation.tasks import task_for
    from llava_circuits.steering.callbacks import compare, load_run_model, recipe

    run, cfg, _ = recipe(config, "barrier", BarrierConfig,
                         dict(model=model, quantization=quantization, dtype=dtype, batch_size=batch_size, limit=limit,
                              images=images, bench=bench, max_new_tokens=max_new_tokens, diagnose=diagnose),
                         RUN_DEFAULTS, dict(tau=tau, alpha=alpha, layers=layers, phases=phases, max_step=max_step,
                                            max_iters=max_iters, sink_ratio=sink_ratio))
    loaded = load_run_model(run)
    out_dir = Path(out)
    barrier = Barrier(cfg, record=True, fingerprint=loaded.fingerprint())
    barrier.save(out_dir / "barrier")
    task = task_for(run["bench"])
    samples = read_benchmark(task.reader or task.name, data, run["images"])[: run["limit"]]
    metrics = compare(loaded, run["bench"], samples, [barrier], out_dir, run["batch_size"], run["max_new_tokens"],
                      config=run)
    write_lines(out_dir / "diagnostics.jsonl", barrier.records)
    metrics["barrier"] = barrier.summary()
    if task.name == "pope" and run["diagnose"]:
        effects = pope_logit_effects(loaded, barrier, samples[: run["diagnose"]], run["batch_size"])
        write_json(out_dir / "logit_effects.json", effects)
        metrics["barrier"] |= summarise_effects(effects)
    write_json(out_dir / "metrics.json", metrics)
    print(json.dumps({k: metrics[k] for k in ("baseline", "intervened", "barrier")}, indent=2))
    return metrics


def write_lines(path: Path, records: Sequence[dict]) -> None:
    """JSON lines, written atomically (a temp file renamed into place)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def pope_logit_effects(loaded: Loaded, barrier: Barrier, samples: Sequence, batch_size: int = 8) -> dict:
    """logit_effects over POPE samples, by sample id."""
    from llava_circuits.data.prompts import short_answer_body
    from llava_circuits.evaluation.module import collate, format_prompt
    from llava_circuits.steering.callbacks import encode

    effects: dict[str, dict] = {}
    for i in range(0, len(samples), batch_size):
        ready, _ = collate(list(samples[i : i + batch_size]))  # samples whose image fails are errors of the run
        if not ready:
            continue
        chunk = [s for s, _ in ready]
        texts = [format_prompt(loaded, short_answer_body(s), True) for s in chunk]
        inputs = encode(loaded, texts, [image for _, image in ready], loaded.model.device)
        found = logit_effects(loaded, barrier, inputs)
        for row, s in enumerate(chunk):
            effects[s.id] = {"margin_before": found["margin_before"][row], "margin_after": found["margin_after"][row],
                             "change_by_layer": {k: v[row] for k, v in found["margin_change_by_layer"].items()}}
    return effects


def summarise_effects(effects: dict) -> dict:
    """Means over samples of the "Yes" minus "No" margin before and after, and of its change per layer."""
    rows = list(effects.values())
    if not rows:
        return {}
    mean = lambda xs: sum(xs) / len(xs)
    return {"yes_minus_no_before": mean([r["margin_before"] for r in rows]),
            "yes_minus_no_after": mean([r["margin_after"] for r in rows]),
            "yes_minus_no_change_by_layer": {k: mean([r["change_by_layer"][k] for r in rows])
                                             for k in rows[0]["change_by_layer"]}}


def barrier_stage(loaded: Loaded, data_dir: str | Path, out: str | Path, config: BarrierConfig | None = None,
                  limit: int | None = None, batch_size: int = 32) -> dict[str, float]:
    """Demo stage: toy POPE adversarial (false-positive rate) and random (accuracy), with and without barrier
    steering, and the smallest h after the edit minus tau over every steered position. `limit`: first N items."""
    from llava_circuits.steering.callbacks import compare
    from llava_circuits.steering.steerfair import read_manifest

    out = Path(out)
    barrier = Barrier(config, record=True, fingerprint=loaded.fingerprint())
    adversarial = compare(loaded, "pope", read_manifest(data_dir, "pope_adversarial", "pope")[:limit], [barrier],
                          out / "adversarial", batch_size)
    random_ = compare(loaded, "pope", read_manifest(data_dir, "pope_random", "pope")[:limit], [barrier],
                      out / "random", batch_size)
    summary = barrier.summary()
    seen = [r["h_after"] - barrier.config.tau for r in barrier.records]  # nothing steered: every h was >= tau
    return {
        "adversarial_fp_rate_before": adversarial["baseline"]["fp_rate"],
        "adversarial_fp_rate_after": adversarial["intervened"]["fp_rate"],
        "random_accuracy_before": random_["baseline"]["accuracy"],
        "random_accuracy_after": random_["intervened"]["accuracy"],
        "min_h_after_minus_tau": float(summary.get("min_h_after_minus_tau", min(seen, default=math.nan))),
        "positions_steered": float(summary["positions_steered"]), "positions_seen": float(summary["positions_seen"]),
    }
