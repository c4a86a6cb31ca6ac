"""`llava-circuits bench steering`: greedy generation with SteerFair and with barrier steering against without."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llava_circuits.bench import _device, bench_model, interleaved_times
from llava_circuits.data.prompts import short_answer_body
from llava_circuits.data.records import Sample
from llava_circuits.evaluation.module import format_prompt
from llava_circuits.steering.barrier import Barrier, BarrierConfig
from llava_circuits.steering.callbacks import encode
from llava_circuits.steering.steerfair import SteerFair, SteerFairConfig


def bench_steering(model: str | None = None, n: int = 16, max_new_tokens: int = 8, repeats: int = 31) -> dict:
    """The same n POPE-style prompts (one batch, greedy, max_new_tokens) plain, with SteerFair (default
    settings, random unit directions: the cost does not depend on them) and with barrier steering (default
    settings, every layer, both phases). Ratios: steerfair_overhead, barrier_overhead (time with / without)."""
    loaded = bench_model(model)
    a = loaded.anatomy
    rng = np.random.default_rng(0)
    size = loaded.model.config.vision_config.image_size
    items = [(Sample(id=str(i), question=f"Is there a {w} in the image?", image=Path(f"{i}.png")),
              Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)))
             for i, w in zip(range(n), ["cup", "ball", "dog", "cat"] * n)]
    texts = [format_prompt(loaded, short_answer_body(s), True) for s, _ in items]
    inputs = encode(loaded, texts, [image for _, image in items], loaded.model.device)
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(a.n_layers, a.n_heads, 4, a.head_dim, generator=gen, dtype=torch.float64)
    steerfair = SteerFair(directions / directions.norm(dim=-1, keepdim=True),
                          torch.rand(a.n_layers, a.n_heads, 4, generator=gen, dtype=torch.float64), SteerFairConfig())
    barrier = Barrier(BarrierConfig())

    def generate(intervention=None):
        def run():  # exactly max_new_tokens each time, whatever the answers
            with intervention.applied(loaded) if intervention else contextlib.nullcontext():
                return loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                             do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
        return run

    with torch.no_grad():
        times = interleaved_times({"plain": generate(), "steerfair": generate(steerfair), "barrier": generate(barrier)},
                                  repeats=repeats, warmup=1)
        counted = Barrier(BarrierConfig(), record=True)  # one untimed run: how many positions it steered
        generate(counted)()
    summary = counted.summary()
    return {
        "ratios": {"steerfair_overhead": times["steerfair"] / times["plain"],
                   "barrier_overhead": times["barrier"] / times["plain"]},
        "model": loaded.name_or_path, "prompts": n, "max_new_tokens": max_new_tokens, "seconds": times,
        "steerfair_heads": len(steerfair.heads), "barrier_layers": a.n_layers,
        "barrier_positions_steered": summary["positions_steered"], "barrier_positions_seen": summary["positions_seen"],
        "device": _device(),
    }
