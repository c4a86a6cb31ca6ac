"""`llava-circuits bench NAME`: side-by-side measurements in one run, reported as ratios."""
from __future__ import annotations

import json as json_lib
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

TOY = Path(__file__).resolve().parent.parent / "checkpoints" / "toy-llava"


def interleaved_times(runs: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median wall time of each callable, run in turn so that machine noise hits all of them alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def bench_model(model: str | None = None):
    """The model a benchmark runs on: the given one, else the toy, else a tiny random LLaVA."""
    from llava_circuits.models.load import Loaded, load_model
    from llava_circuits.models.anatomy import Anatomy
    from llava_circuits.models.tiny import tiny_llava, tiny_processor

    if model is not None or TOY.is_dir():
        return load_model(model or TOY, dtype="float32")
    tiny = tiny_llava()
    return Loaded(tiny, tiny_processor(), Anatomy.of(tiny), name_or_path="tiny-random-llava")


def llava_batch(loaded, batch: int = 16, text_len: int = 24, seed: int = 0) -> dict:
    """A batch of random prompts with one image each, shaped as the processor makes them."""
    a = loaded.anatomy
    gen = torch.Generator().manual_seed(seed)
    vocab = loaded.model.config.get_text_config().vocab_size
    text = torch.randint(5, vocab, (batch, text_len), generator=gen)
    text[text == a.image_token_id] = 5
    parts = [text[:, :2], torch.full((batch, a.n_image_tokens), a.image_token_id), text[:, 2:]]
    vision = loaded.model.config.vision_config
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=gen)
    return {"input_ids": torch.cat(parts, dim=1), "pixel_values": pixels}


def bench_capture(model: str | None = None, repeats: int = 30) -> dict:
    """A forward capturing mlp.in and mlp.out of every layer against a plain forward."""
    from llava_circuits.sites import all_sites, capture

    loaded = bench_model(model)
    inputs = llava_batch(loaded)
    sites = all_sites(loaded.anatomy, ["mlp.in", "mlp.out"])

    @torch.no_grad()
    def plain():
        return loaded.model(**inputs).logits

    @torch.no_grad()
    def captured():
        with capture(loaded.model, sites) as cap:
            logits = loaded.model(**inputs).logits
        return logits, cap

    times = interleaved_times({"plain": plain, "capture": captured}, repeats=repeats)
    return {
        "ratios": {"capture_overhead": times["capture"] / times["plain"]},
        "model": loaded.name_or_path, "sites": len(sites), "batch": list(inputs["input_ids"].shape),
        "seconds": times, "device": _device(),
    }


def bench_eval(model: str | None = None, n: int = 32, batch: int = 16, repeats: int = 3) -> dict:
    """Greedy answers to n POPE-style prompts: batches of `batch` (left-padded) against one prompt at a time."""
    import tempfile

    import numpy as np
    from PIL import Image

    from llava_circuits.data.records import Sample
    from llava_circuits.evaluation.module import EvalModule, ResponseLog
    from llava_circuits.evaluation.tasks import task_for

    loaded = bench_model(model)
    rng = np.random.default_rng(0)
    size = loaded.model.config.vision_config.image_size
    items = [(Sample(id=str(i), question=f"Is there a {w} in the image?", image=Path(f"{i}.png")),
              Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)))
             for i, w in zip(range(n), ["cup", "ball", "dog", "cat"] * n)]
    module = EvalModule(loaded, task_for("pope"), [], ResponseLog(tempfile.mkdtemp()), max_new_tokens=8)

    def batched():
        return [module.generate(items[i : i + batch]) for i in range(0, n, batch)]

    def single():
        return [module.generate([item]) for item in items]

    with torch.no_grad():
        times = interleaved_times({"batched": batched, "single": single}, repeats=repeats, warmup=1)
    return {"ratios": {"batched_speedup": times["single"] / times["batched"]}, "model": loaded.name_or_path,
            "prompts": n, "batch": batch, "seconds": times, "device": _device()}


def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def bench_attention(model: str | None = None) -> dict:
    from llava_circuits.attention.bench import bench_attention as run

    return run(model)


def bench_steering(model: str | None = None) -> dict:
    from llava_circuits.steering.bench import bench_steering as run

    return run(model)


def bench_transcoders(model: str | None = None) -> dict:
    from llava_circuits.transcoders.bench import bench_transcoders as run

    return run(model)


def bench_transcoders_scale(model: str | None = None) -> dict:
    from llava_circuits.transcoders.bench import bench_transcoders_scale as run

    return run(model)


BENCHES: dict[str, Callable[..., dict]] = {
    "capture": bench_capture, "eval": bench_eval, "attention": bench_attention, "steering": bench_steering,
    "transcoders": bench_transcoders, "transcoders_scale": bench_transcoders_scale,
}


def bench(name: str, json: bool = False, model: str | None = None) -> dict:
    """Run benchmark NAME and print its ratios (the last line is JSON with --json).

    Args:
        name: which benchmark: capture (capture_overhead), eval (batched_speedup), attention (memory_ratio; default model: a random LLaVA-1.5-7B geometry), steering (steerfair_overhead, barrier_overhead), transcoders (all_layers_vs_layerwise, vs_sparsify), transcoders_scale (tokens/s and peak memory for 4 and 32 layers of a random LLaVA-1.5-7B at 32768 features: the GPU figures; --model llava-1.5-7b-geometry:WIDTH narrows it)
        json: print the result as one JSON object on the last line
        model: model id or path (default: the toy model)
    """
    if name not in BENCHES:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(sorted(BENCHES))}")
    result = BENCHES[name](model=model)
    for ratio, value in result["ratios"].items():
        print(f"{name}: {ratio} = {value:.3f}")
    for key, run in result.get("runs", {}).items():
        print(f"{name}: {key}: " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in run.items()))
    if json:
        print(json_lib.dumps(result))
    return result
