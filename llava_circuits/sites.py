"""Named activation sites, read with capture() and edited with intervene(), at chosen positions.

Site names (resolved through Anatomy):
    layers.{i}.resid_pre    input of decoder layer i                          [batch, pos, d_model]
    layers.{i}.resid_post   output of decoder layer i                         [batch, pos, d_model]
    layers.{i}.attn.heads   input of o_proj, one slice per head               [batch, pos, n_heads, head_dim]
    layers.{i}.attn.out     output of o_proj                                  [batch, pos, d_model]
    layers.{i}.attn.probs   attention probabilities (this layer only)         [batch, pos, n_heads, keys]
    layers.{i}.mlp.in       input of the MLP (after post_attention_layernorm) [batch, pos, d_model]
    layers.{i}.mlp.out      output of the MLP                                 [batch, pos, d_model]
    layers.{i}.mlp.neurons  input of down_proj                                [batch, pos, d_mlp]

Positions mean the same in a plain forward and in each forward of `generate` with the KV cache:
    "all", "last" (last position of every forward), "prompt_last" (prefill only), "decode" (decode
    forwards only), "image", "text" (real non-image tokens), explicit absolute column indices of the
    (left-padded) sequence, or a callable(step) -> bool mask [batch, pos] of the current forward.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from llava_circuits.models.anatomy import Anatomy

KINDS = ("resid_pre", "resid_post", "attn.heads", "attn.out", "attn.probs", "mlp.in", "mlp.out", "mlp.neurons")
SITE_RE = re.compile(r"^layers\.(\d+)\.(" + "|".join(re.escape(k) for k in KINDS) + r")$")
PROBE_ATTENTION = "llava_circuits_probe"
Positions = str | Sequence[int] | Tensor | Callable[["Step"], Tensor]


@dataclass(frozen=True)
class Site:
    """A parsed site name."""

    layer: int
    kind: str

    @classmethod
    def parse(cls, name: str, anatomy: Anatomy | None = None) -> "Site":
        match = SITE_RE.match(name)
        if not match:
            raise ValueError(f"unknown site {name!r}: expected layers.{{i}}.{{{'|'.join(KINDS)}}}")
        site = cls(int(match.group(1)), match.group(2))
        if anatomy is not None and not 0 <= site.layer < anatomy.n_layers:
            raise ValueError(f"site {name!r}: layer {site.layer} out of range, the model has {anatomy.n_layers} layers")
        return site

    def __str__(self) -> str:
        return f"layers.{self.layer}.{self.kind}"


def all_sites(anatomy: Anatomy, kinds: Sequence[str] = KINDS) -> list[str]:
    """Every site name of the model for the given kinds."""
    return [f"layers.{i}.{k}" for i in range(anatomy.n_layers) for k in kinds]


@dataclass
class Step:
    """What the forward in progress is: its tokens, the tokens before it, and its phase."""

    input_ids: Tensor | None  # [batch, pos] of this forward
    seq_ids: Tensor | None  # [batch, past + pos] every token so far
    attention_mask: Tensor | None  # [batch, past + pos]
    past_len: int
    length: int  # positions in this forward
    _masks: dict = field(default_factory=dict)

    @property
    def phase(self) -> str:
        return "prefill" if self.past_len == 0 else "decode"

    def real(self) -> Tensor | None:
        """Bool [batch, pos]: non-padding positions of this forward."""
        if self.attention_mask is None:
            return None
        return self.attention_mask[:, self.past_len : self.past_len + self.length].bool()


def cache_of(kwargs: dict):
    """The KV cache a forward was called with: `past_key_values`, or `cache` as transformers >= 5.24 names it."""
    cache = kwargs.get("past_key_values")
    return kwargs.get("cache") if cache is None else cache


class Tracker:
    """Follows the forwards of a model (prefill, then each decode step) so selectors know where they are."""

    def __init__(self, model: nn.Module, anatomy: Anatomy):
        self.anatomy = anatomy
        self.step: Step | None = None
        self.handle = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    def _on_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        cache = cache_of(kwargs)
        past = int(cache.get_seq_length()) if cache is not None else 0
        length = ids.shape[1] if ids is not None else embeds.shape[1]
        seq = ids
        if past > 0 and ids is not None and self.step is not None and self.step.seq_ids is not None:
            seq = torch.cat([self.step.seq_ids, ids], dim=1)
        self.step = Step(ids, seq, kwargs.get("attention_mask"), past, length)

    def remove(self) -> None:
        self.handle.remove()

    def last_only(self, positions: Positions) -> bool | None:
        """True when `positions` select exactly the last column of every row in this forward, False when they
        select nothing, None when it takes the mask to tell."""
        if not isinstance(positions, str) or self.step is None:
            return None
        if positions == "last" or (positions == "prompt_last" and self.step.phase == "prefill"):
            return True
        if positions == "prompt_last":
            return False
        return None

    def mask(self, positions: Positions, batch: int, length: int) -> Tensor | None:
        """Bool [batch, length] of selected positions in this forward; None means every position."""
        if isinstance(positions, str) and positions == "all":
            return None
        step = self.step
        if step is None or step.length != length:
            raise RuntimeError(f"positions={positions!r} need the forward to run through the model given to capture/intervene")
        key = positions if isinstance(positions, (str, tuple)) else id(positions)
        if key not in step._masks:
            step._masks[key] = select(positions, step, self.anatomy, batch)
        return step._masks[key]


def select(positions: Positions, step: Step, anatomy: Anatomy, batch: int) -> Tensor:
    """The bool mask [batch, pos] that `positions` selects in the forward `step`."""
    shape = (batch, step.length)
    device = step.input_ids.device if step.input_ids is not None else None
    out = torch.zeros(shape, dtype=torch.bool, device=device)
    if callable(positions):
        return positions(step).to(torch.bool)
    if isinstance(positions, str):
        if positions == "last" or (positions == "prompt_last" and step.phase == "prefill"):
            out[:, -1] = True
        elif positions == "decode" and step.phase == "decode":
            out[:] = True
        elif positions in ("image", "text"):
            if step.input_ids is None:
                raise ValueError(f"positions={positions!r} need input_ids, not inputs_embeds")
            image = anatomy.image_mask(step.input_ids)
            real = step.real() if step.real() is not None else torch.ones_like(image)
            out = image if positions == "image" else real & ~image
        elif positions not in ("prompt_last", "decode"):
            raise ValueError(f"unknown positions {positions!r}: use all, last, prompt_last, decode, image, text or indices")
        return out
    index = torch.as_tensor(positions, dtype=torch.long).flatten() - step.past_len
    index = index[(index >= 0) & (index < step.length)]
    out[:, index.to(out.device)] = True
    return out


class HookContext:
    """What a two-argument intervention function learns about the call: where and when it is."""

    def __init__(self, site: Site, step: Step | None, shape: tuple[int, int],
                 mask: Tensor | Callable[[], Tensor] | None, device):
        self.site, self.layer, self.step = str(site), site.layer, step
        self.phase = step.phase if step is not None else "prefill"
        self.past_len = step.past_len if step is not None else 0
        self.shape, self._mask, self._device = shape, mask, device  # mask None: every position
        self._index: tuple[Tensor, Tensor] | None = None

    @property
    def mask(self) -> Tensor | None:
        """Bool [batch, pos] of the selected positions; None when every position is."""
        if callable(self._mask):  # made on first use: most edits never ask
            self._mask = self._mask()
        return self._mask

    @property
    def batch(self) -> Tensor:
        """[n] batch row of each selected activation."""
        return self._indices()[0]

    @property
    def pos(self) -> Tensor:
        """[n] absolute position (column of the left-padded sequence) of each selected activation."""
        return self._indices()[1]

    def _indices(self) -> tuple[Tensor, Tensor]:
        if self._index is None:
            b, s = self.shape
            mask = self.mask if self.mask is not None else torch.ones(b, s, dtype=torch.bool, device=self._device)
            batch, pos = mask.nonzero(as_tuple=True)
            self._index = (batch, pos + self.past_len)
        return self._index


@dataclass
class Chunk:
    """Activations one forward produced at one site: values at (batch, pos)."""

    values: Tensor  # [n, ...] or dense [batch, pos, ...] when every position was kept
    batch: Tensor | None  # [n]; None when dense
    pos: Tensor  # [n]
    rows: int  # batch rows of the forward (a row may have selected nothing)
    dense_shape: tuple[int, int] | None = None  # (batch, pos) when values are dense


class Capture:
    """The activations captured in a `with capture(...)` block, by site name."""

    def __init__(self) -> None:
        self._chunks: dict[str, list[Chunk]] = defaultdict(list)

    def __contains__(self, site: str) -> bool:
        return site in self._chunks

    def __iter__(self) -> Iterator[str]:
        return iter(self._chunks)

    def keys(self):
        return self._chunks.keys()

    def chunks(self, site: str) -> list[Chunk]:
        """One Chunk per forward (prefill, then each decode step)."""
        return self._chunks[site]

    def __getitem__(self, site: str) -> Tensor:
        """[batch, positions, ...]: every forward's selection concatenated along positions."""
        if site not in self._chunks:
            raise KeyError(f"{site!r} was not captured (captured: {sorted(self._chunks)})")
        parts = [self._dense(c, site) for c in self._chunks[site] if c.values.numel() or c.dense_shape]
        try:
            return torch.cat(parts, dim=1)
        except RuntimeError as err:
            raise ValueError(f"{site!r}: forwards captured different shapes ({err}); read capture.chunks(site)") from None

    def positions(self, site: str) -> Tensor:
        """[batch, positions]: the absolute position of every entry of capture[site]."""
        return torch.cat([self._dense_pos(c) for c in self._chunks[site]], dim=1)

    @staticmethod
    def _dense(chunk: Chunk, site: str) -> Tensor:
        if chunk.dense_shape is not None:
            return chunk.values
        batch = chunk.rows
        counts = torch.bincount(chunk.batch, minlength=batch)
        if batch and not bool((counts == counts[0]).all()):
            raise ValueError(f"{site!r}: rows selected different numbers of positions; read capture.chunks(site)")
        return chunk.values.reshape(batch, -1, *chunk.values.shape[1:])

    @staticmethod
    def _dense_pos(chunk: Chunk) -> Tensor:
        if chunk.dense_shape is not None:
            b, s = chunk.dense_shape
            return chunk.pos.expand(b, s)
        return chunk.pos.reshape(chunk.rows, -1)


class _Hooks:
    """Installs hooks for a set of sites and removes all of them on exit."""

    def __init__(self, model: nn.Module, positions: Positions, anatomy: Anatomy | None):
        self.model = model
        self.anatomy = anatomy or Anatomy.of(model)
        self.positions = positions
        self.handles: list = []
        self.restore: list[Callable[[], None]] = []
        self.tracker = Tracker(model, self.anatomy)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        for undo in reversed(self.restore):
            undo()
        self.tracker.remove()

    def apply(self, site: Site, act: Tensor, handler: Callable[[Tensor, HookContext], Tensor | None]) -> Tensor | None:
        """Run handler on the selected positions of act [batch, pos, ...]; return act edited, or None if unchanged."""
        b, s = act.shape[:2]
        step = self.tracker.step
        last = self.tracker.last_only(self.positions) if step is not None and step.length == s else None  # else: mask
        if last is False:  # e.g. prompt_last while decoding
            return None
        if last:  # the last column of every row: a slice, not a boolean gather and scatter (steering in generate)
            ctx = HookContext(site, self.tracker.step, (b, s), lambda: self.tracker.mask(self.positions, b, s), act.device)
            new = handler(act[:, -1], ctx)
            if new is None:
                return None
            edited = act.clone()
            edited[:, -1] = new.to(act.dtype)
            return edited
        mask = self.tracker.mask(self.positions, b, s)
        if mask is not None and not bool(mask.any()):
            return None
        ctx = HookContext(site, self.tracker.step, (b, s), mask, act.device)
        new = handler(act.reshape(b * s, *act.shape[2:]) if mask is None else act[mask], ctx)
        if new is None:
            return None
        if mask is None:
            return new.reshape(act.shape).to(act.dtype)
        edited = act.clone()
        edited[mask] = new.to(act.dtype)
        return edited

    def install(self, site: Site, handler: Callable[[Tensor, HookContext], Tensor | None]) -> None:
        """Hook `handler` at `site`: it receives [n, ...] selected activations and may return replacements."""
        a, i = self.anatomy, site.layer
        if site.kind == "attn.probs":
            self._install_probe(site, handler)
        elif site.kind in ("resid_pre", "mlp.in", "attn.heads", "mlp.neurons"):
            module = {"resid_pre": a.layer(i), "mlp.in": a.mlp(i), "attn.heads": a.proj(i, "o_proj"),
                      "mlp.neurons": a.proj(i, "down_proj")}[site.kind]
            heads = site.kind == "attn.heads"
            self.handles.append(module.register_forward_pre_hook(self._pre_hook(site, handler, heads), with_kwargs=True))
        else:
            module = {"resid_post": a.layer(i), "attn.out": a.proj(i, "o_proj"), "mlp.out": a.mlp(i)}[site.kind]
            self.handles.append(module.register_forward_hook(self._post_hook(site, handler)))

    def _pre_hook(self, site: Site, handler, heads: bool):
        n_heads, head_dim = self.anatomy.n_heads, self.anatomy.head_dim

        def hook(module, args, kwargs):
            positional = len(args) > 0
            x = args[0] if positional else kwargs["hidden_states"]
            view = x.view(*x.shape[:2], n_heads, head_dim) if heads else x
            new = self.apply(site, view, handler)
            if new is None:
                return None
            new = new.reshape(x.shape)
            if positional:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return hook

    def _post_hook(self, site: Site, handler):
        def hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            new = self.apply(site, x, handler)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def _install_probe(self, site: Site, handler) -> None:
        module = self.anatomy.attn(site.layer)
        if not hasattr(module, "_lc_probes"):
            original = module.config
            probe_config = copy.copy(original)
            probe_config._attn_implementation_internal = PROBE_ATTENTION
            module.config, module._lc_probes, module._lc_config = probe_config, [], original
        probe = lambda probs: self.apply(site, probs, handler)  # noqa: E731
        module._lc_probes.append(probe)

        def undo() -> None:  # each block takes out its own probe; the last one out restores the attention
            module._lc_probes.remove(probe)
            if not module._lc_probes:
                module.config = module._lc_config
                del module._lc_probes, module._lc_config

        self.restore.append(undo)


def _probe_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager attention whose probabilities pass through the probes of the module's capture/intervene blocks.

    When no probe changes them (captures, identity edits), the output is the layer's own attention kernel's
    (sdpa, ...), not the eager one's: a capture of attn.probs leaves the model's outputs bit for bit."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)  # GQA: each KV head serves `groups` query heads
    v = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling  # [batch, heads, q, k]
    scores = scores + _additive_mask(attention_mask, query, k)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    rows, changed = probs.transpose(1, 2), False  # [batch, q, heads, k]: positions first, as every site
    for probe in getattr(module, "_lc_probes", []):
        edited = probe(rows)
        if edited is not None and not torch.equal(edited, rows):
            rows, changed = edited, True
    probs = rows.transpose(1, 2)
    original = getattr(module, "_lc_config", None)
    kernel = ALL_ATTENTION_FUNCTIONS.get(original._attn_implementation) if original is not None else None
    if not changed and kernel is not None:
        out, _ = kernel(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return out, probs
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    return out, probs


def _additive_mask(mask: Tensor | None, query: Tensor, key: Tensor) -> Tensor:
    """The mask as eager attention adds it: 0 where allowed, the dtype's min elsewhere (causal when None)."""
    q, k = query.shape[-2], key.shape[-2]
    if mask is not None and mask.dim() == 2:  # flash attention's [batch, keys] padding mask
        raise ValueError("attn.probs needs eager or sdpa attention (the model uses a flash kernel's 2-D mask); "
                         "load the model with attn_implementation='sdpa'")
    if mask is None:
        allowed = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(diagonal=k - q)
    elif mask.dtype == torch.bool:
        allowed = mask[..., :k]
    else:
        return mask[..., :k]
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(allowed, zero, torch.finfo(query.dtype).min)


AttentionInterface.register(PROBE_ATTENTION, _probe_attention)


def _takes_ctx(fn: Callable) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    # `lambda act, i=i: ...` (the loop idiom) takes no context: only required positional parameters count
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


@contextlib.contextmanager
def capture(
    model: nn.Module,
    sites: Sequence[str],
    positions: Positions = "all",
    anatomy: Anatomy | None = None,
    key_positions: str | Sequence[int] = "all",
) -> Iterator[Capture]:
    """Record the activations at `sites` and `positions` of every forward in the block; outputs are unchanged.

    `key_positions` ("all", "image" or absolute indices) keeps only those key columns of attn.probs.
    """
    store = Capture()
    hooks = _Hooks(model, positions, anatomy)
    try:
        for name in sites:
            site = Site.parse(name, hooks.anatomy)
            keys = key_positions if site.kind == "attn.probs" and key_positions != "all" else None

            def record(act: Tensor, ctx: HookContext, name: str = name, keys=keys) -> None:
                act = act.detach()
                if keys is not None:
                    act = _key_columns(act, ctx, keys, hooks.anatomy)
                store._chunks[name].append(_chunk(act, ctx))

            hooks.install(site, record)
        yield store
    finally:
        hooks.close()


def _key_columns(probs: Tensor, ctx: HookContext, keys: str | Sequence[int], anatomy: Anatomy) -> Tensor:
    """probs [n, heads, K] restricted to the chosen key columns of each row's sequence: [n, heads, k]."""
    n_keys = probs.shape[-1]
    if isinstance(keys, str):
        if keys != "image" or ctx.step is None or ctx.step.seq_ids is None:
            raise ValueError(f"key_positions must be 'all', 'image' or indices, got {keys!r} (image needs input_ids)")
        keymask = anatomy.image_mask(ctx.step.seq_ids[:, :n_keys])  # [batch, K]
        counts = keymask.sum(1)
        if not bool((counts == counts[0]).all()):
            raise ValueError("key_positions='image': rows hold different numbers of image tokens")
        cols = keymask.nonzero(as_tuple=True)[1].reshape(keymask.shape[0], -1)[ctx.batch]  # [n, k]
    else:
        cols = torch.as_tensor(list(keys), device=probs.device).expand(probs.shape[0], -1)
    return probs.gather(-1, cols[:, None, :].expand(-1, probs.shape[1], -1))


def _chunk(values: Tensor, ctx: HookContext) -> Chunk:
    if ctx.mask is None:
        b, s = ctx.shape
        pos = torch.arange(s, device=values.device) + ctx.past_len
        return Chunk(values.reshape(b, s, *values.shape[1:]), None, pos, b, dense_shape=(b, s))
    return Chunk(values, ctx.batch, ctx.pos, ctx.shape[0])


@contextlib.contextmanager
def intervene(
    model: nn.Module, edits: dict[str, Callable], positions: Positions = "all", anatomy: Anatomy | None = None
) -> Iterator[None]:
    """Replace activations: each `fn(act[, ctx])` gets [n, ...] selected activations and returns their replacement."""
    hooks = _Hooks(model, positions, anatomy)
    try:
        for name, fn in edits.items():
            site = Site.parse(name, hooks.anatomy)
            hooks.install(site, fn if _takes_ctx(fn) else (lambda act, ctx, fn=fn: fn(act)))
        yield
    finally:
        hooks.close()
