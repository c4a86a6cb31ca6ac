"""`llava-circuits bench transcoders`: training throughput side by side, same model, tokens, width and k.

    (a) all_layers   TranscoderModule: one frozen forward per step feeds every layer's transcoder
    (b) layerwise    the reference pipeline's way: one training run per layer, each step a full frozen
                     forward for that one layer (the same module with layers=[l], stop_early=False)
    (c) sparsify     EleutherAI's eai-sparsify Trainer (TopK transcoders on every MLP), when importable

Every run trains TopK transcoders (no AuxK, as sparsify's default) for `steps` steps on the same
text-token batches (sparsify feeds input_ids only, so no images). Ratios are of tokens per second:
`all_layers_vs_layerwise` (target >= 0.6 x n_layers) and `vs_sparsify` (a over c, target >= 1.0).
"""
from __future__ import annotations

import contextlib
import io
import tempfile
import time

import torch

from llava_circuits.bench import _device, bench_model, interleaved_times


def text_batches(loaded, steps: int, batch: int, seq: int, seed: int = 0) -> list[dict]:
    """`steps` batches of random text tokens [batch, seq] (no image, no padding), all weighted 1."""
    gen = torch.Generator().manual_seed(seed)
    vocab = loaded.model.config.get_text_config().vocab_size
    image = loaded.anatomy.image_token_id
    out = []
    for _ in range(steps):
        ids = torch.randint(5, vocab, (batch, seq), generator=gen)
        if image is not None:
            ids[ids == image] = 5
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_weight": torch.ones(batch, seq)})
    return out


def fit_ours(loaded, batches: list[dict], layers: list[int], n_features: int, k: int, stop_early: bool = True,
             callbacks: tuple = ()) -> None:
    import lightning as L

    from llava_circuits.transcoders.module import TranscoderModule
    from llava_circuits.transcoders.transcoder import TranscoderConfig

    cfg = TranscoderConfig(n_features=n_features, activation="topk", k=k, aux_k_coeff=0.0)
    module = TranscoderModule.for_loaded(loaded, layers=layers, transcoder=cfg, stop_early=stop_early,
                                         replacement_check=False, log_every=10**9)
    trainer = L.Trainer(accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=1,
                        max_steps=len(batches), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks))
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, train_dataloaders=loader)


def fit_sparsify(loaded, batches: list[dict], layers: list[int], n_features: int, k: int) -> None:
    from sparsify import SaeConfig, Trainer, TrainConfig

    base = loaded.model.base_model
    names = {id(m): n for n, m in base.named_modules()}
    hookpoints = [names[id(loaded.anatomy.mlp(l))] for l in layers]  # the MLP modules, found by identity
    rows = [{"input_ids": row} for b in batches for row in b["input_ids"]]
    quiet = contextlib.ExitStack()
    quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
    quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))  # its progress bar
    with tempfile.TemporaryDirectory() as tmp, quiet:
        cfg = TrainConfig(SaeConfig(transcode=True, num_latents=n_features, k=k), batch_size=len(batches[0]["input_ids"]),
                          hookpoints=hookpoints, loss_fn="fvu", log_to_wandb=False, save_dir=tmp, save_every=10**9)
        Trainer(cfg, rows, loaded.model).fit()


def bench_transcoders(model: str | None = None, steps: int = 20, batch: int = 16, seq: int = 64,
                      n_features: int = 512, k: int = 16, repeats: int = 7, warmup: int = 1) -> dict:
    """Tokens/s of (a) our all-layer trainer, (b) a layer-by-layer loop, (c) eai-sparsify; see the module docstring."""
    torch.manual_seed(0)
    loaded = bench_model(model)
    layers = list(range(loaded.anatomy.n_layers))
    batches = text_batches(loaded, steps, batch, seq)
    runs = {
        "all_layers": lambda: fit_ours(loaded, batches, layers, n_features, k),
        "layerwise": lambda: [fit_ours(loaded, batches, [l], n_features, k, stop_early=False) for l in layers],
    }
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a Triton notice, which would break --json
            import sparsify  # noqa: F401

        runs["sparsify"] = lambda: fit_sparsify(loaded, batches, layers, n_features, k)
        sparsify_note = "eai-sparsify " + _version("eai-sparsify")
    except ImportError as err:  # the `bench` extra is not installed
        sparsify_note = f"not measured: eai-sparsify is not importable ({err}); pip install 'llava-circuits[bench]'"
    seconds = interleaved_times(runs, repeats=repeats, warmup=warmup)
    tokens = steps * batch * seq
    per_second = {name: tokens / s for name, s in seconds.items()}
    ratios = {"all_layers_vs_layerwise": per_second["all_layers"] / per_second["layerwise"],
              "vs_sparsify": per_second["all_layers"] / per_second["sparsify"] if "sparsify" in per_second else None}
    return {
        "ratios": ratios, "n_layers": len(layers), "target_all_layers_vs_layerwise": 0.6 * len(layers),
        "tokens_per_second": per_second, "seconds": seconds, "tokens": tokens, "model": loaded.name_or_path,
        "n_features": n_features, "k": k, "batch": [batch, seq], "steps": steps, "device": _device(),
        "sparsify": sparsify_note,
    }


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


# --- at LLaVA-1.5-7B scale (the GPU figures) -------------------------------------------------------

SCALE_MODEL = "llava-1.5-7b-geometry"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _step_clock(first: int, last: int):
    """A Lightning callback whose `seconds` is the wall time from the start of step `first` to the end of
    step `last` (CUDA synchronised)."""
    import lightning as L

    class StepClock(L.Callback):
        def __init__(self):
            self.marks: list[float] = []

        @property
        def seconds(self) -> float:
            return self.marks[1] - self.marks[0]

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == first:
                _sync()
                self.marks.append(time.perf_counter())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == last:
                _sync()
                self.marks.append(time.perf_counter())

    return StepClock()


def bench_transcoders_scale(model: str | None = None, layer_counts: tuple[int, ...] = (4, 32), n_features: int = 32768,
                            k: int = 64, batch: int = 4, seq: int = 512, steps: int = 6, warmup: int = 2) -> dict:
    """Tokens/s and peak memory of our all-layer trainer on a random-init LLaVA-1.5-7B (bf16 on CUDA, its
    32 x 4096 Llama; `llava-1.5-7b-geometry:WIDTH` narrows it, for CPU runs) for the first 4 and all 32
    layers, TopK transcoders at `n_features`, fp32 with Adam. A count that does not fit reports the error
    and the transcoder state it needed (weights, gradients and Adam's two moments: 16 bytes per parameter).
    """
    from llava_circuits.attention.bench import geometry_model

    name = model or SCALE_MODEL
    if not name.startswith(SCALE_MODEL):
        raise ValueError(f"bench transcoders_scale runs on {SCALE_MODEL}[:WIDTH], not {name!r}")
    width = int(name.split(":")[1]) if ":" in name else None
    loaded = geometry_model(width)
    d = loaded.anatomy.d_model
    batches = text_batches(loaded, warmup + steps, batch, seq)
    cuda = torch.cuda.is_available()
    results = {}
    for n_layers in layer_counts:
        layers = list(range(min(n_layers, loaded.anatomy.n_layers)))
        row = {"layers": len(layers), "transcoder_state_gb": len(layers) * (2 * n_features * d + n_features + d) * 16 / 1e9}
        clock = _step_clock(warmup, warmup + steps - 1)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            fit_ours(loaded, batches, layers, n_features, k, callbacks=(clock,))
            row["tokens_per_second"] = steps * batch * seq / clock.seconds
        except torch.OutOfMemoryError as err:
            row["error"] = f"out of memory: {str(err).splitlines()[0]}"
        if cuda:
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        results[str(n_layers)] = row
    return {"ratios": {}, "runs": results, "model": loaded.name_or_path, "d_model": d, "n_features": n_features, "k": k,
            "batch": [batch, seq], "steps": steps, "warmup_steps": warmup, "device": _device()}
