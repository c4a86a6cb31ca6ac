"""The frozen, linearised replacement model of circuit tracing: one recorded forward, then exact linear maps.

One forward of the real model on one prompt records, per layer l and position t:

    e        [T, d]      input of layer 0: token embeddings, and projector outputs at image positions
    A_l      [H, T, T]   attention probabilities                                  (frozen)
    s_in_l, s_post_l, s_final  [T]   1 / rms of each RMSNorm's input                 (frozen)
    x_l, y_l [T, d]      the MLP's real input and output

With those frozen and every MLP replaced by its transcoder plus an error term, the residual stream is
linear in the nodes (features a_f, error vectors, embeddings) plus constant biases:

    r_0      = e
    r'_l     = r_l + W_O A_l (g_in * s_in * r_l) W_V^T                       (+ v/o biases)
    m_l      = g_post * s_post * r'_l          a feature f of l has pre-activation  W_enc_f . m_l + b_enc_f
    r_{l+1}  = r'_l + sum_f a_f W_dec_f + b_dec + m_l W_skip^T + err_l,  err_l = y_l - transcoder(x_l)
    logits   = W_U (g_final * s_final * r_L)

`LinearModel.replay` runs that forward (it reproduces the model's logits); `LinearModel.backward` runs
its transpose for a batch of target directions and returns each target's direct edges: the part of the
target that each feature, error vector, embedding and bias writes along paths through attention, norms,
skip connections and the residual stream only (never through another feature).
A layer without a transcoder keeps its whole MLP output as the error term.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llava_circuits.models.load import Loaded
from llava_circuits.sites import capture
from llava_circuits.transcoders.transcoder import TranscoderSet


def raw_transcoders(transcoders: TranscoderSet) -> TranscoderSet:
    """The set in raw space (scales folded into the weights: circuit-tracer's layout), which attribution reads:
    the set itself when its scales are already 1 (as loaded from an artifact), else a rebuilt copy."""
    if all(float(t.x_scale) == 1.0 and bool((t.y_scale == 1.0).all()) for t in transcoders.tc.values()):
        return transcoders
    return TranscoderSet.from_tensors(transcoders.export(), transcoders.cfg)


@dataclass
class Record:
    """What one forward of the real model leaves for the linearised model (batch of one)."""

    input_ids: Tensor  # [T]
    embeds: Tensor  # [T, d]  input of layer 0
    probs: list[Tensor]  # per layer [H, T, T], as the model used them
    s_in: Tensor  # [L, T]  1/rms at input_layernorm
    s_post: Tensor  # [L, T]  1/rms at post_attention_layernorm
    s_final: Tensor  # [T]  1/rms at the final norm
    mlp_in: Tensor  # [L, T, d]
    mlp_out: Tensor  # [L, T, d]
    logits: Tensor  # [T, V] float32, the model's own


def inv_rms(norm: torch.nn.Module, x: Tensor, tol: float) -> Tensor:
    """The scale s [T] with norm(x) = weight * x * s (1/rms(x) for an RMSNorm), fitted to the norm's own output
    on x [T, d] so that the frozen norm reproduces the model's numerics; raises for a norm of another form."""
    if getattr(norm, "weight", None) is None:
        raise ValueError(f"{type(norm).__name__}: attribution freezes RMSNorm scales; this norm has no weight")
    with torch.no_grad():
        real = norm(x[None])[0].double()  # [T, d]
        base = norm.weight.double() * x.double()
        s = (real * base).sum(-1) / base.pow(2).sum(-1).clamp_min(1e-300)  # least squares, per position
    if (real - base * s[:, None]).norm() > tol * real.norm().clamp_min(1e-12):
        raise ValueError(f"{type(norm).__name__} is not weight * x * scale(x): cannot freeze its scale")
    return s


@torch.no_grad()
def record(loaded: Loaded, inputs: dict) -> Record:
    """Run the model once on `inputs` (batch of one) and keep what the linearised model needs."""
    a, model = loaded.anatomy, loaded.model
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError(f"attribution takes one prompt at a time, got a batch of {inputs['input_ids'].shape[0]}")
    kinds = ("resid_pre", "attn.out", "attn.probs", "mlp.in", "mlp.out")
    sites = [f"layers.{l}.{k}" for l in range(a.n_layers) for k in kinds] + [f"layers.{a.n_layers - 1}.resid_post"]
    with capture(model, sites, anatomy=a) as cap:
        logits = model(**inputs).logits[0].float()  # [T, V]
    get = lambda l, k: cap[f"layers.{l}.{k}"][0]
    tol = 1e-4 if get(0, "resid_pre").dtype in (torch.float32, torch.float64) else 2e-2
    resid = [get(l, "resid_pre") for l in range(a.n_layers)]
    mid = [resid[l] + get(l, "attn.out") for l in range(a.n_layers)]
    final_in = cap[f"layers.{a.n_layers - 1}.resid_post"][0]
    return Record(
        input_ids=inputs["input_ids"][0],
        embeds=resid[0],
        probs=[get(l, "attn.probs").permute(1, 0, 2) for l in range(a.n_layers)],  # [T, H, K] -> [H, T, K]
        s_in=torch.stack([inv_rms(a.input_norm(l), resid[l], tol) for l in range(a.n_layers)]),
        s_post=torch.stack([inv_rms(a.post_attn_norm(l), mid[l], tol) for l in range(a.n_layers)]),
        s_final=inv_rms(a.final_norm, final_in, tol),
        mlp_in=torch.stack([get(l, "mlp.in") for l in range(a.n_layers)]),
        mlp_out=torch.stack([get(l, "mlp.out") for l in range(a.n_layers)]),
        logits=logits,
    )


@dataclass
class Rows:
    """Direct edges into a batch of B targets."""

    features: Tensor  # [B, n_active]  from every active feature
    errors: Tensor  # [B, L, T]
    embeds: Tensor  # [B, T]
    bias: Tensor  # [B]  decoder, attention and unembedding biases together


@dataclass
class Seed:
    """A target direction: d target / d residual at `pos`, read before layer `layer`'s MLP (None: after the last layer)."""

    layer: int | None
    pos: int
    vector: Tensor  # [d]
    bias: float = 0.0  # constant part of the target outside the residual stream (unembedding bias)


class LinearModel:
    """The linearised replacement model of one recorded prompt; see the module docstring."""

    def __init__(self, loaded: Loaded, rec: Record, transcoders: TranscoderSet, dtype: torch.dtype = torch.float32,
                 chunk_elems: int = 2**27):
        """`transcoders` in raw space (x_scale = y_scale = 1, see `raw_transcoders`), moved in place to the
        record's device and `dtype`; `chunk_elems` bounds the gathered decoder blocks held at once."""
        self.a, self.rec, self.tcs, self.dtype, self.chunk_elems = loaded.anatomy, rec, transcoders, dtype, chunk_elems
        self.device = rec.embeds.device
        self.T = rec.embeds.shape[0]
        self.tcs.to(device=self.device, dtype=dtype).requires_grad_(False)
        self.x = rec.mlp_in.to(dtype)  # [L, T, d]
        acts, self.err, self.b_dec = {}, [], []
        for l in self.tcs.layers:
            acts[l] = self.tcs.encode(l, self.x[l])  # [T, d_tc]
        self.acts = acts
        zeros = {l: torch.zeros_like(v) for l, v in acts.items()}
        for l in range(self.a.n_layers):
            y = rec.mlp_out[l].to(dtype)
            if self.has_tc(l):
                self.b_dec.append(self.tcs.decode(l, zeros, {l: torch.zeros_like(self.x[l])})[0])  # [d]
                self.err.append(y - self.tcs.decode(l, acts, {l: self.x[l]}))
            else:
                self.b_dec.append(torch.zeros_like(y[0]))
                self.err.append(y)
        self.active, self.values = self._active()  # [n, 3] (layer, pos, feature) sorted, [n] activations
        self.spans = {l: self._span(l) for l in self.tcs.layers}

    def _span(self, layer: int) -> tuple[int, int, Tensor, Tensor]:
        """(lo, hi) rows of `layer` in self.active, and its active features per position [T] and their offsets."""
        lo, hi = torch.searchsorted(self.active[:, 0].contiguous(), torch.tensor([layer, layer + 1],
                                                                                  device=self.device)).tolist()
        counts = torch.bincount(self.active[lo:hi, 1], minlength=self.T)
        return lo, hi, counts, counts.cumsum(0) - counts

    def has_tc(self, layer: int) -> bool:
        return layer in self.tcs.layers

    def _active(self) -> tuple[Tensor, Tensor]:
        index, values = [torch.zeros(0, 3, dtype=torch.long, device=self.device)], [self.x.new_zeros(0)]
        for l in self.tcs.layers:
            pos, feat = self.acts[l].nonzero(as_tuple=True)  # row-major: sorted by position, then feature
            index.append(torch.stack([torch.full_like(pos, l), pos, feat], 1))
            values.append(self.acts[l][pos, feat])
        return torch.cat(index), torch.cat(values)

    # --- weights, in the compute dtype -----------------------------------------------------------------
    def _w(self, module_weight: Tensor) -> Tensor:
        if not module_weight.is_floating_point():
            raise ValueError("attribution needs the model's weights unquantized (load without --quantization)")
        return module_weight.to(self.device, self.dtype)

    def _bias(self, layer: int, name: str) -> Tensor | None:
        b = self.a.proj(layer, name).bias
        return None if b is None else self._w(b)

    def _norm_weight(self, norm: torch.nn.Module) -> Tensor:
        return self._w(norm.weight)

    def decoder(self, source: int, layer: int) -> Tensor:
        """Raw decoder [d_tc, d] of source layer `source`'s features into `layer`'s MLP output."""
        w = self.tcs[source].W_dec
        if not self.tcs.cross_layer:
            return w
        return w[:, self.tcs.all_layers.index(layer) - self.tcs.all_layers.index(source)]

    def sources(self, layer: int) -> list[int]:
        return self.tcs.sources(layer) if self.has_tc(layer) else []

    # --- forward ---------------------------------------------------------------------------------------
    def attention(self, layer: int, r: Tensor) -> Tensor:
        """Frozen attention output [T, d] of residual r [T, d]."""
        a = self.a
        h = self._norm_weight(a.input_norm(layer)) * r * self.rec.s_in[layer, :, None].to(self.dtype)
        v = h @ self._w(a.proj(layer, "v_proj").weight).T  # [T, kv * hd]
        b_v = self._bias(layer, "v_proj")
        v = (v if b_v is None else v + b_v).view(self.T, a.n_kv_heads, a.head_dim)
        v = v.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)  # [T, H, hd]: query head h reads kv head h // groups
        z = torch.einsum("hqk,khe->qhe", self.rec.probs[layer].to(self.dtype), v)  # [T, H, hd]
        out = z.reshape(self.T, -1) @ self._w(a.proj(layer, "o_proj").weight).T
        b_o = self._bias(layer, "o_proj")
        return out if b_o is None else out + b_o

    def mlp(self, layer: int, m: Tensor) -> Tensor:
        """Replacement MLP output [T, d]: transcoder of frozen activations (skip on m) plus the error term."""
        if not self.has_tc(layer):
            return self.err[layer]
        return self.tcs.decode(layer, self.acts, {layer: m}) + self.err[layer]

    @torch.no_grad()
    def replay(self) -> tuple[Tensor, list[Tensor]]:
        """(logits [T, V], MLP inputs per layer [T, d]) of the linearised model's forward."""
        a, rec = self.a, self.rec
        r, mlp_in = rec.embeds.to(self.dtype), []
        for l in range(a.n_layers):
            r = r + self.attention(l, r)
            m = self._norm_weight(a.post_attn_norm(l)) * r * rec.s_post[l, :, None].to(self.dtype)
            mlp_in.append(m)
            r = r + self.mlp(l, m)
        final = self._norm_weight(a.final_norm) * r * rec.s_final[:, None].to(self.dtype)
        head = a.lm_head
        logits = final @ self._w(head.weight).T
        return (logits if head.bias is None else logits + self._w(head.bias)), mlp_in

    # --- seeds -----------------------------------------------------------------------------------------
    def logit_seed(self, direction: Tensor, pos: int, bias: float = 0.0) -> Seed:
        """Seed of the target direction . logits[pos], for an unembedding direction [d] (e.g. W_U[yes] - W_U[no])."""
        g = self._norm_weight(self.a.final_norm)
        return Seed(None, pos, g * self.rec.s_final[pos].to(self.dtype) * direction.to(self.device, self.dtype), bias)

    def feature_seed(self, layer: int, pos: int, feature: int) -> Seed:
        """Seed of feature `feature`'s pre-activation (minus b_enc) at (layer, pos)."""
        w_enc = self.tcs[layer].W_enc[feature]
        g = self._norm_weight(self.a.post_attn_norm(layer))
        return Seed(layer, pos, g * self.rec.s_post[layer, pos].to(self.dtype) * w_enc)

    def feature_pre(self, layer: int, pos: int, feature: int) -> float:
        """W_enc . x (pre-activation minus b_enc) of a feature, from the recorded MLP input."""
        return float(self.tcs[layer].W_enc[feature] @ self.x[layer, pos])

    # --- backward --------------------------------------------------------------------------------------
    @torch.no_grad()
    def backward(self, seeds: list[Seed]) -> Rows:
        """Direct edges into each seed's target from every node (the transpose of `replay`, batched)."""
        a, rec, B, T = self.a, self.rec, len(seeds), self.T
        G = torch.zeros(B, T, a.d_model, dtype=self.dtype, device=self.device)  # d target / d residual
        rows = Rows(torch.zeros(B, len(self.active), dtype=self.dtype, device=self.device),
                    torch.zeros(B, a.n_layers, T, dtype=self.dtype, device=self.device),
                    torch.zeros(B, T, dtype=self.dtype, device=self.device),
                    torch.tensor([s.bias for s in seeds], dtype=self.dtype, device=self.device))
        self._inject(G, seeds, None)
        for l in reversed(range(a.n_layers)):
            # G is d target / d (MLP output of l): every node written there gets its edge
            rows.errors[:, l] = torch.einsum("btd,td->bt", G, self.err[l])
            rows.bias += G.sum(1) @ self.b_dec[l]
            for s in self.sources(l):
                self._feature_edges(G, s, l, rows.features)
            if self.has_tc(l) and self.tcs[l].W_skip is not None:  # the skip is linear in m_l
                g_post = self._norm_weight(a.post_attn_norm(l)) * rec.s_post[l, :, None].to(self.dtype)
                G = G + g_post * (G @ self.tcs[l].W_skip)
            self._inject(G, seeds, l)  # targets that read m_l
            G = G + self._attention_backward(l, G, rows)
        rows.embeds = torch.einsum("btd,td->bt", G, rec.embeds.to(self.dtype))
        return rows

    @staticmethod
    def _inject(G: Tensor, seeds: list[Seed], layer: int | None) -> None:
        for b, s in enumerate(seeds):
            if s.layer == layer:
                G[b, s.pos] += s.vector

    def _attention_backward(self, l: int, G: Tensor, rows: Rows) -> Tensor:
        """d target / d r_l through the frozen attention of l (the residual's identity path excluded)."""
        a, B, T = self.a, G.shape[0], self.T
        gz = (G @ self._w(a.proj(l, "o_proj").weight)).view(B, T, a.n_heads, a.head_dim)  # d / d z
        b_o = self._bias(l, "o_proj")
        if b_o is not None:
            rows.bias += G.sum(1) @ b_o
        gv = torch.einsum("hqk,bqhe->bkhe", self.rec.probs[l].to(self.dtype), gz)  # [B, T, H, hd]
        gv = gv.reshape(B, T, a.n_kv_heads, a.n_heads // a.n_kv_heads, a.head_dim).sum(3).reshape(B, T, -1)
        b_v = self._bias(l, "v_proj")
        if b_v is not None:
            rows.bias += gv.sum(1) @ b_v
        g_in = self._norm_weight(a.input_norm(l)) * self.rec.s_in[l, :, None].to(self.dtype)
        return g_in * (gv @ self._w(a.proj(l, "v_proj").weight))

    def _feature_edges(self, G: Tensor, source: int, layer: int, out: Tensor) -> None:
        """out[:, i] += a_i * (W_dec_i . G[:, pos_i]) for the active features i of `source`, written into `layer`.

        Only the decoder rows of active features are read: per chunk of positions they are gathered into a
        [positions, k_max, d] block (k_max: most active features at one position), bounded by chunk_elems.
        """
        lo, hi, counts, starts = self.spans[source]
        if lo == hi:
            return
        pos, feat, val = self.active[lo:hi, 1], self.active[lo:hi, 2], self.values[lo:hi]
        w_dec = self.decoder(source, layer)  # [d_tc, d]
        k_max = int(counts.max())
        step = max(1, self.chunk_elems // (k_max * (w_dec.shape[1] + G.shape[0])))
        for p0 in range(0, self.T, step):
            p1 = min(self.T, p0 + step)
            i0, i1 = int(starts[p0]), int(starts[p1 - 1] + counts[p1 - 1])
            if i0 == i1:
                continue
            local = pos[i0:i1] - p0
            rank = torch.arange(i0, i1, device=self.device) - starts[pos[i0:i1]]  # rank within its position
            index = torch.zeros(p1 - p0, k_max, dtype=torch.long, device=self.device)
            index[local, rank] = feat[i0:i1]  # padding reads row 0 and is never used
            h = torch.einsum("bpd,pkd->bpk", G[:, p0:p1], w_dec[index])  # [B, P, k_max]
            out[:, lo + i0 : lo + i1] += val[i0:i1] * h[:, local, rank]
