"""`bench attention`: peak memory of extracting 2 of N layers' attention against output_attentions=True.

Both variants run one forward of the same model on the same batch (no gradients, no KV cache):
- extract: `sites.capture` of layers.{i}.attn.probs on two middle layers, positions "last", image columns
  only (what `attention extract` does at each step); the other layers keep SDPA;
- full: every layer eager with `output_attentions=True`, the attentions held until the forward returns.

What is measured is the peak, during the forward, of the bytes held by tensors allocated inside it (the
weights and inputs, allocated before, are not counted), outputs included:
- on CUDA, torch.cuda.max_memory_allocated() minus the memory allocated before the forward;
- on CPU, `PeakTensorBytes`: a TorchDispatchMode that adds each new storage an op returns (one not shared
  with the op's inputs) and subtracts it when the last tensor seen on it is freed. Scratch memory that a
  kernel allocates internally without returning it (e.g. inside SDPA's fused CPU kernel) is not seen; eager
  attention's scores and probabilities are ordinary op outputs, so every materialised [batch, heads, q, k]
  tensor is.
A plain forward (no attention kept) gives `memory_ratio_plain_forward`, the floor of any extraction; the
same two forwards with the KV cache that generate's prefill builds (32 layers x 2 x [batch, T, d_model] for
LLaVA-1.5-7B, held by both variants alike) give `memory_ratio_with_kv_cache`, reported as context.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llava_circuits.sites import capture


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of the storages created by ops inside the block (a CPU stand-in for max_memory_allocated).

    An op output whose storage is neither tracked yet nor shared with one of the op's inputs is a new
    allocation; outputs sharing an input's storage (views, in-place ops) add a reference to it instead, so a
    storage is released when the last tensor seen on it is freed. Tensors made before the block never count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors seen on it]
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_address(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        ptr = _address(t)
        entry = self.live.get(ptr)
        if entry is None:
            if ptr == 0 or ptr in inputs:  # empty, or a view of a tensor made before the block
                return
            entry = self.live[ptr] = [t.untyped_storage().nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del self.live[ptr]
                self.current -= entry[0]


def _address(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.layout == torch.strided else 0


def peak_bytes(run, device: torch.device) -> int:
    """Peak bytes allocated while run() executes and its result is alive, above what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = run()
        torch.cuda.synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - base
    with PeakTensorBytes() as tracker:
        result = run()
        del result
    return tracker.peak


GEOMETRY = "llava-1.5-7b-geometry"


def bench_attention(model: str | None = None, batch: int = 1, text_len: int = 40) -> dict:
    """Peak memory of extracting 2 of N layers (last-token rows, image columns) against all layers' attentions.

    By default on a random model with LLaVA-1.5-7B's attention geometry (`geometry_model`), since the ratio
    depends on layers x heads x sequence length, which the toy does not have; `--model PATH` measures another.
    """
    from llava_circuits.bench import bench_model

    if model is None or model.startswith(GEOMETRY):
        width = int(model.split(":")[1]) if model and ":" in model else None
        return memory_ratio(geometry_model(width), batch, text_len)
    return memory_ratio(bench_model(model), batch, text_len)


def geometry_model(width: int | None = None):
    """Random LLaVA-1.5-7B geometry: 32 Llama layers x 32 heads, 24x24 = 576 image tokens, vocab 32064.

    d_model is `width` (MLP scaled as 11008/4096); None takes 4096 (the real one, bf16) on CUDA and 2048 on
    CPU, where 7B fp32 weights would not fit in RAM. A narrower width holds fewer hidden-state bytes, so the
    CPU ratio is a little lower than the 4096 one; the attention maps, the bulk of `full`, are the same.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from llava_circuits.models.anatomy import Anatomy
    from llava_circuits.models.load import Loaded

    cuda = torch.cuda.is_available()
    width = width or (4096 if cuda else 2048)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14)
    text = LlamaConfig(vocab_size=32064, hidden_size=width, intermediate_size=width * 11008 // 4096,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16 if cuda else torch.float32).eval()
    return Loaded(model, None, Anatomy.of(model), name_or_path=f"random LLaVA-1.5-7B geometry, d_model {width}")


def memory_ratio(loaded, batch: int = 4, text_len: int = 112) -> dict:
    """bench_attention on a loaded model: one forward of a random batch, each variant measured by peak_bytes.

    The ratio is taken without a KV cache (use_cache=False, as a plain output_attentions forward runs); the
    ratio with the cache that generate's prefill builds (held by both variants) is reported as context.
    """
    from llava_circuits.bench import _device, llava_batch

    a, net = loaded.anatomy, loaded.model
    device = next(net.parameters()).device
    inputs = {k: v.to(device) for k, v in llava_batch(loaded, batch=batch, text_len=text_len).items()}
    chosen = [a.n_layers // 2 - 1, a.n_layers // 2]
    sites = [f"layers.{i}.attn.probs" for i in chosen]

    def extract(use_cache: bool):
        with torch.no_grad(), capture(net, sites, positions="last", anatomy=a, key_positions="image") as cap:
            out = net(**inputs, use_cache=use_cache)
        return out, [cap[s] for s in sites]

    def full(use_cache: bool):
        with torch.no_grad():
            return net(**inputs, use_cache=use_cache, output_attentions=True)

    def plain():
        with torch.no_grad():
            return net(**inputs, use_cache=False)

    peaks = {"plain": peak_bytes(plain, device)}  # no attention kept: the floor any extraction could reach
    for cache in (False, True):
        peaks[f"extract{'_kv_cache' * cache}"] = peak_bytes(lambda: extract(cache), device)
    previous = net.config._attn_implementation
    net.set_attn_implementation("eager")
    try:
        for cache in (False, True):
            peaks[f"full{'_kv_cache' * cache}"] = peak_bytes(lambda: full(cache), device)
    finally:
        net.set_attn_implementation(previous)
    return {"ratios": {"memory_ratio": peaks["extract"] / peaks["full"]},
            "memory_ratio_with_kv_cache": peaks["extract_kv_cache"] / peaks["full_kv_cache"],
            "memory_ratio_plain_forward": peaks["plain"] / peaks["full"],
            "model": loaded.name_or_path, "layers": [len(chosen), a.n_layers], "batch": list(inputs["input_ids"].shape),
            "peak_bytes": peaks, "device": _device(),
            "measured": "cuda max_memory_allocated" if device.type == "cuda" else "PeakTensorBytes (dispatch mode)"}
