"""The demo's `transcoders` stage: every layer of the toy model in one quick run, then the replacement check.

Figures (demo metrics.json, stage `transcoders`):
    fvu_max, l0_fraction_max, dead_fraction_max   worst layer on the validation stream (dead: no firing
                                                  on any of its tokens)
    next_token_agreement                          replaced (no error terms) vs original greedy next token
                                                  on the toy POPE and BBQ prompts
    exact_with_error_max_abs_diff                 max |logit difference| with error terms on those prompts
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from llava_circuits.models.load import Loaded
from llava_circuits.transcoders.transcoder import TranscoderConfig

TOY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "transcoders" / "toy.yaml"
"""The recipe the demo follows (transcoder, optimiser, batch size and steps), so the two cannot drift apart."""


def toy_recipe(path: Path = TOY_CONFIG) -> dict:
    """{"transcoder": TranscoderConfig, "optim": OptimConfig, "batch_size": int, "steps": int} from the toy YAML."""
    import yaml

    from llava_circuits.transcoders.module import OptimConfig

    raw = yaml.safe_load(Path(path).read_text())
    return {
        "transcoder": TranscoderConfig(**raw["model"]["transcoder"]),
        "optim": OptimConfig(**raw["model"].get("optim", {})),
        "batch_size": raw["data"]["batch_size"],
        "steps": raw["trainer"]["max_steps"],
    }


def toy_prompts(data_dir: str | Path, limit: int = 240) -> list[dict]:
    """{"prompt", "image"} for the toy POPE (every split) and BBQ items listed in data_dir/manifest.json."""
    from llava_circuits.data.prompts import bbq_body, llava_prompt
    from llava_circuits.data.readers import read_benchmark
    from llava_circuits.transcoders.data import open_image

    manifest_path = Path(data_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: write the toy benchmarks first (llava-circuits toy data --out {data_dir})")
    manifest = json.loads(manifest_path.read_text())
    prompts = []
    for split in ("pope_random", "pope_popular", "pope_adversarial"):
        files = manifest[split]["files"]
        for s in read_benchmark("pope", files[0], images=files[1])[: limit // 4]:
            prompts.append({"prompt": llava_prompt(s.question), "image": open_image(s.image)})
    for s in read_benchmark("bbq", manifest["bbq"]["files"][0])[: limit // 4]:
        prompts.append({"prompt": llava_prompt(bbq_body(s), image=False), "image": None})
    return prompts


@torch.no_grad()
def replacement_agreement(loaded: Loaded, transcoders, prompts: list[dict], batch_size: int = 32) -> dict:
    """Greedy next-token agreement without error terms, and the max logit difference with them."""
    from llava_circuits.finetune import prompt_batches
    from llava_circuits.transcoders.replacement import ReplacementModel

    param = next(loaded.model.parameters())
    agree, total, max_diff = 0, 0, 0.0
    for batch in prompt_batches(loaded.processor, prompts, batch_size):
        batch = {k: v.to(param.device, param.dtype if v.is_floating_point() else None) for k, v in batch.items()}
        real = batch["attention_mask"].bool()
        orig = loaded.model(**batch).logits.float()
        replaced = ReplacementModel(transcoders, record=False).forward(loaded, **batch).logits.float()
        exact = ReplacementModel(transcoders, error_term=True, record=False).forward(loaded, **batch).logits.float()
        agree += int((orig[:, -1].argmax(-1) == replaced[:, -1].argmax(-1)).sum())
        total += len(real)
        max_diff = max(max_diff, float((exact - orig)[real].abs().max()))
    return {"next_token_agreement": agree / total, "exact_with_error_max_abs_diff": max_diff, "prompts": total}


def transcoders_stage(loaded: Loaded, data_dir: str | Path, out: str | Path, steps: int | None = None,
                      recipe: str | Path = TOY_CONFIG, val_sequences: int = 256, prompts: int = 240) -> dict:
    """Train transcoders for every layer of `loaded` on the toy stream in one run (the recipe of
    configs/transcoders/toy.yaml), save them under out/transcoders, and return the stage's figures
    (validation on `val_sequences` held-out sequences, agreement on `prompts` toy prompts)."""
    import lightning as L

    from llava_circuits.transcoders.data import TranscoderDataModule
    from llava_circuits.transcoders.io import save_transcoders
    from llava_circuits.transcoders.module import TranscoderModule

    out, cfg = Path(out), toy_recipe(Path(recipe))
    steps, batch_size = steps or cfg["steps"], cfg["batch_size"]
    start = time.time()
    module = TranscoderModule.for_loaded(loaded, transcoder=cfg["transcoder"], optim=cfg["optim"], dead_window=10**12)
    data = TranscoderDataModule(model=loaded.name_or_path, source="toy", batch_size=batch_size,
                                val_batches=max(1, val_sequences // batch_size))
    data.processor = loaded.processor
    trainer = L.Trainer(accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=1, max_steps=steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out / "lightning")
    trainer.fit(module, datamodule=data)
    trained = time.time() - start
    trainer.limit_val_batches = 1.0
    trainer.validate(module, datamodule=data, verbose=False)
    val = module.val_results
    artifact = save_transcoders(module.transcoders, out / "transcoders", loaded.fingerprint(),
                                {"steps": steps, "batch_size": batch_size, "source": "toy stream", "validation": val})
    check = replacement_agreement(loaded, module.transcoders, toy_prompts(data_dir, limit=prompts))
    return {
        "fvu_max": val["fvu_max"], "l0_fraction_max": val["l0_fraction_max"], "dead_fraction_max": val["dead_fraction_max"],
        "next_token_agreement": check["next_token_agreement"],
        "exact_with_error_max_abs_diff": check["exact_with_error_max_abs_diff"],
        "n_layers": len(module.layers), "n_features": module.transcoder_cfg.n_features, "k": module.transcoder_cfg.k,
        "steps": steps, "train_seconds": trained, "prompts": check["prompts"], "artifact": str(artifact.path),
        "ce_recovered": val.get("ce_recovered"), "val_agreement": val.get("agreement"),
        **{f"{name}_by_layer": [val[f"{name}/layer_{l}"] for l in module.layers]
           for name in ("fvu", "l0_fraction", "dead_fraction")},
    }
