"""`llava-circuits prune localize|apply|finetune|eval`: the soft-pruning pipeline, one run directory.

Every command takes the same --out RUN and reads what the previous one wrote there, in the reference
pipeline's folders:

    RUN/bias_localization_before/   influence.jsonl (CI per item), correlations.safetensors, localization.json,
                                    r_attn_max.png, r_head_norm.png (selected heads outlined after `apply`)
    RUN/bias_mitigation/pruning/    the `pruning` artifact (alpha per head, mode, selection)
    RUN/bias_mitigation/finetuned/  the pruned, fine-tuned model (pruning baked in), from_pretrained-loadable
    RUN/bias_mitigation/lightning/  fine-tuning checkpoints (last.ckpt: rerunning `finetune` resumes) and logs
    RUN/bias_evaluation/{before,pruned,finetuned}/{benchmark}/   harness runs
    RUN/bias_localization_after/    the same localization on the pruned, fine-tuned model
    RUN/results.csv, RUN/results.md one table: benchmark, metric, before, pruned, finetuned
"""
from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path

import torch

from llava_circuits.artifacts import ModelFingerprint, atomic_dir
from llava_circuits.data.readers import read_benchmark
from llava_circuits.evaluation.run import write_json
from llava_circuits.models.load import Loaded, load_model
from llava_circuits.pruning.config import PruningConfig, load_config, to_dict
from llava_circuits.pruning.finetune import restore, save_model
from llava_circuits.pruning.localize import Localization, localize, plot_heatmaps
from llava_circuits.pruning.prune import SoftPruning
from llava_circuits.pruning.report import (
    evaluate_benchmarks,
    results_rows,
    write_results,
)
from llava_circuits.pruning.select import select_heads

BEFORE = "bias_localization_before"
AFTER = "bias_localization_after"
EVALUATION = "bias_evaluation"
MITIGATION = "bias_mitigation"
PRUNING = f"{MITIGATION}/pruning"
FINETUNED = f"{MITIGATION}/finetuned"


def _load(model: str, dtype: str, quantization: str | None = None) -> Loaded:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(model, dtype=dtype, device=device, quantization=quantization)


def _override(config, **values):
    """config with the non-None values replaced."""
    return dataclasses.replace(config, **{k: v for k, v in values.items() if v is not None})


def localize_run(loaded: Loaded, config: PruningConfig, folder: Path, marked=()) -> Localization:
    """Localize on config.bbq into `folder` (scores, correlations, heatmaps)."""
    if not config.bbq:
        raise ValueError("no BBQ data to localize on: set `bbq:` in the config or pass --bbq")
    loc = localize(loaded, read_benchmark("bbq", config.bbq), config.influence, config.localize)
    loc.save(folder)
    plot_heatmaps(loc, folder, marked)
    return loc


def prune_localize(model: str, out: str, config: str | None = None, bbq: str | None = None,
                   variant: str | None = None, per_category: int | None = None, batch_size: int | None = None,
                   dtype: str = "auto", quantization: str | None = None) -> dict:
    """Score Context Influence on BBQ and correlate every attention head with it (RUN/bias_localization_before).

    Args:
        model: Hub id or local model directory
        out: run directory shared by the prune commands
        config: pruning recipe YAML (configs/*/pruning.yaml); defaults are the toy's
        bbq: BBQ category .jsonl or folder (overrides the config's bbq)
        variant: context influence: context or ambig_disambig (overrides the config)
        per_category: score at most N items per BBQ category
        batch_size: prompts per forward
        dtype: auto, float32, bfloat16 or float16
        quantization: 4bit or 8bit (bitsandbytes)
    """
    cfg = _override(load_config(config), bbq=bbq)
    cfg = dataclasses.replace(cfg, influence=_override(cfg.influence, variant=variant, per_category=per_category),
                              localize=_override(cfg.localize, batch_size=batch_size))
    loc = localize_run(_load(model, dtype, quantization), cfg, Path(out) / BEFORE)
    summary = {"items": int(loc.n[0]), "categories": loc.categories, "top_heads": loc.top_heads(5)}
    print(json.dumps(summary, indent=2))
    return summary


def prune_apply(out: str, config: str | None = None, mode: str | None = None, threshold: float | None = None,
                min_fraction: float | None = None, max_heads: int | None = None, schedule: str | None = None,
                alpha_max: float | None = None) -> dict:
    """Select heads by cross-category voting and write the pruning artifact (RUN/bias_mitigation/pruning).

    Args:
        out: run directory holding bias_localization_before/ (from prune localize)
        config: pruning recipe YAML; its select section and mode apply
        mode: gate (per-head gate on o_proj's input) or qkv (Q/K/V row scaling)
        threshold: a category votes for a head when |r| >= threshold
        min_fraction: keep heads voted for by at least this fraction of the categories
        max_heads: keep at most this many heads
        schedule: alpha from |r|: constant, linear or affine
        alpha_max: the largest alpha
    """
    cfg = _override(load_config(config), mode=mode)
    select = _override(cfg.select, threshold=threshold, min_fraction=min_fraction, max_heads=max_heads,
                       schedule=schedule, alpha_max=alpha_max)
    folder = Path(out) / BEFORE
    loc = Localization.load(folder)
    pruning = make_pruning(loc, dataclasses.replace(cfg, select=select))
    pruning.save(Path(out) / PRUNING)
    plot_heatmaps(loc, folder, [(l, h) for l, h, _ in pruning.heads])
    summary = pruning.describe()
    if not pruning.heads:
        summary["warning"] = "no head passed the vote: lower select.threshold or select.min_fraction"
    print(json.dumps(summary, indent=2))
    return summary


def make_pruning(loc: Localization, cfg: PruningConfig) -> SoftPruning:
    """The SoftPruning that the selection of `loc` under cfg.select gives, with its provenance."""
    selection = select_heads(loc, cfg.select)
    fingerprint = ModelFingerprint(**loc.model) if loc.model else None
    provenance = {"select": to_dict(cfg.select), "influence": to_dict(cfg.influence), "bbq": cfg.bbq,
                  "selection": selection.describe(), "n_categories": selection.n_categories}
    extra = {"r": loc.r, "votes": selection.votes.float(), "weight": selection.weight}
    return SoftPruning(selection.alpha, cfg.mode, fingerprint, provenance, extra)


def prune_finetune(model: str, out: str, config: str | None = None, data: str | None = None,
                   steps: int | None = None, resume: bool = True, dtype: str = "auto") -> dict:
    """Fine-tune with the pruning in place to restore utility; save the model (RUN/bias_mitigation/finetuned).

    Args:
        model: the model that was localized (Hub id or local directory)
        out: run directory holding bias_mitigation/pruning (from prune apply)
        config: pruning recipe YAML; its finetune section applies
        data: fine-tuning examples (.jsonl of prompt/answer, LLaVA-Instruct .json, or toy)
        steps: optimiser steps
        resume: continue from RUN/bias_mitigation/lightning/checkpoints/last.ckpt when it exists
        dtype: auto, float32, bfloat16 or float16
    """
    cfg = load_config(config)
    restore_cfg = _override(cfg.finetune, data=data, steps=steps)
    loaded = _load(model, dtype)
    pruning = SoftPruning.load(Path(out) / PRUNING, loaded)
    record = restore(loaded, pruning, restore_cfg, Path(out) / MITIGATION, resume)
    target = Path(out) / FINETUNED
    with atomic_dir(target, replaceable=lambda p: (p / "config.json").is_file()) as tmp:
        save_model(loaded, tmp)
    record["model"] = str(target)
    print(json.dumps(record, indent=2))
    return record


def prune_eval(model: str, out: str, config: str | None = None, finetuned: str | None = None,
               batch_size: int | None = None, dtype: str = "auto", quantization: str | None = None) -> dict:
    """BBQ, StereoSet, CrowS-Pairs, MMLU, HellaSwag before pruning, after pruning and after fine-tuning.

    Args:
        model: the original model (Hub id or local directory)
        out: run directory of the prune commands; receives bias_evaluation/, results.csv and results.md
        config: pruning recipe YAML; its benchmarks section lists what is evaluated
        finetuned: the pruned, fine-tuned model (default RUN/bias_mitigation/finetuned when it exists)
        batch_size: samples per batch
        dtype: auto, float32, bfloat16 or float16
        quantization: 4bit or 8bit (bitsandbytes; needs the gate mode)
    """
    cfg = _override(load_config(config), eval_batch_size=batch_size)
    if not cfg.benchmarks:
        raise ValueError("no benchmarks to evaluate: list them under `benchmarks:` in the config")
    root = Path(out)
    loaded = _load(model, dtype, quantization)
    pruning = SoftPruning.load(root / PRUNING, loaded)
    results = {"before": evaluate_benchmarks(loaded, cfg.benchmarks, root / EVALUATION / "before",
                                             batch_size=cfg.eval_batch_size),
               "pruned": evaluate_benchmarks(loaded, cfg.benchmarks, root / EVALUATION / "pruned", [pruning],
                                             cfg.eval_batch_size)}
    tuned_path = Path(finetuned) if finetuned else root / FINETUNED
    if tuned_path.is_dir():
        del loaded
        gc.collect()
        tuned = _load(str(tuned_path), dtype, quantization)
        results["finetuned"] = evaluate_benchmarks(tuned, cfg.benchmarks, root / EVALUATION / "finetuned",
                                                   batch_size=cfg.eval_batch_size)
        if cfg.localize_after and cfg.bbq:
            localize_run(tuned, cfg, root / AFTER, [(l, h) for l, h, _ in pruning.heads])
    write_results(results_rows(results, cfg.benchmarks), root)
    write_json(root / "results.json", results)
    print((root / "results.md").read_text())
    return results
