"""Restore utility after soft pruning: fine-tune with FinetuneModule while the pruning stays in place.

Mode "gate": the gates are hooks with fixed factors, attached for the whole run, so they cannot train;
the weights around them adapt. After training the gates are baked into o_proj's input columns (the same
map), so the result is a standalone model. Mode "qkv": the Q/K/V rows are scaled once, before training,
as the reference pipeline does, and fine-tuning starts from the scaled weights (it may move them).

Batches are deterministic in (seed, step): batch b draws its examples from Random(f"{seed}:{b}"), so a
run resumed from last.ckpt sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import random
from pathlib import Path

import lightning as L
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from llava_circuits.data.files import field, jsonl
from llava_circuits.data.instruct import read_conversations
from llava_circuits.evaluation.module import format_prompt
from llava_circuits.evaluation.run import write_json
from llava_circuits.finetune import FinalCheckpoint, FinetuneModule, SFTCollator
from llava_circuits.models.load import Loaded
from llava_circuits.pruning.config import RestoreConfig
from llava_circuits.pruning.prune import SoftPruning


def read_examples(path: str | Path, images: str | Path | None = None) -> list[dict]:
    """{"prompt" (body), "answer", "image" (path or None)} from a .jsonl of such records or a LLaVA-Instruct .json."""
    path = Path(path)
    folder = Path(images) if images is not None else path.parent
    if path.suffix == ".json":
        return [{"prompt": c.turns[0][0], "answer": c.turns[0][1], "image": c.image}
                for c in read_conversations(path, images)]
    out = []
    for at, rec in jsonl(path):
        image = rec.get("image")
        out.append({"prompt": field(rec, "prompt", str, at), "answer": field(rec, "answer", str, at),
                    "image": folder / image if image else None})
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def toy_examples(n: int, seed: int = 0) -> list[dict]:
    """The toy's restore set: text-only utility items and disambiguated BBQ-style items, gold answers, half each."""
    from llava_circuits.toy import tasks

    rng = random.Random(f"pruning-restore:{seed}")
    out = []
    for i in range(n):
        if i % 2:
            record = tasks.random_bbq_item(rng, condition="disambig")
            body, gold = tasks.bbq_text(record), record["label"]
        else:
            item = tasks.utility_item(rng)
            body, gold = item.text(), item.answer
        out.append({"prompt": body, "answer": tasks.LETTERS[gold], "image": None})
    return out


def restore_examples(config: RestoreConfig) -> list[dict]:
    if config.data == "toy":
        return toy_examples(config.n_examples, config.seed)
    return read_examples(config.data, config.images)


class StepBatches(Dataset):
    """Item i is batch `start + i`: `batch_size` examples drawn by Random(f"{seed}:{start + i}"), templated."""

    def __init__(self, loaded: Loaded, examples: list[dict], batch_size: int, length: int, start: int, seed: int):
        self.loaded, self.examples, self.batch_size = loaded, examples, batch_size
        self.length, self.start, self.seed = length, start, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> list[dict]:
        rng = random.Random(f"{self.seed}:{self.start + i}")
        picks = rng.sample(range(len(self.examples)), min(self.batch_size, len(self.examples)))
        batch = []
        for j in picks:
            ex = self.examples[j]
            image = Image.open(ex["image"]).convert("RGB") if ex["image"] is not None else None
            batch.append({"prompt": format_prompt(self.loaded, ex["prompt"], image is not None),
                          "answer": ex["answer"], "image": image})
        return batch


class RestoreData(L.LightningDataModule):
    """Serves StepBatches from the step the trainer is at (0, or the restored global_step on resume)."""

    def __init__(self, loaded: Loaded, examples: list[dict], config: RestoreConfig):
        super().__init__()
        self.loaded, self.examples, self.config = loaded, examples, config
        self.collate = SFTCollator(loaded.processor, padding_side="right")

    def train_dataloader(self) -> DataLoader:
        done = self.trainer.global_step if self.trainer is not None else 0
        batches = StepBatches(self.loaded, self.examples, self.config.batch_size, self.config.steps - done, done,
                              self.config.seed)
        return DataLoader(batches, batch_size=None, shuffle=False, collate_fn=self.collate)


TRAINABLE = ("all", "language_model", "attention", "mlp", "pruned_layers", "not_pruned_attention")


def trainable(loaded: Loaded, which: str, pruning: SoftPruning) -> dict[str, bool]:
    """Set requires_grad for the run (RestoreConfig.trainable); returns the previous flags by parameter name."""
    a = loaded.anatomy
    if which not in TRAINABLE:
        raise ValueError(f"finetune.trainable must be one of {TRAINABLE}, got {which!r}")
    before = {n: p.requires_grad for n, p in loaded.model.named_parameters()}
    if which == "all":
        return before
    pruned_layers = sorted({l for l, _, _ in pruning.heads})
    if which in ("language_model", "not_pruned_attention"):
        modules = [a.language_model, a.lm_head]
    elif which == "attention":
        modules = [a.attn(i) for i in range(a.n_layers)]
    elif which == "mlp":
        modules = [a.mlp(i) for i in range(a.n_layers)]
    else:
        modules = [a.layer(i) for i in pruned_layers]
    keep = {id(p) for m in modules for p in m.parameters()}
    if which == "not_pruned_attention":  # the pruned heads' layers cannot scale their attention back up
        keep -= {id(p) for i in pruned_layers for p in a.attn(i).parameters()}
    if not keep:
        raise ValueError(f"finetune.trainable={which!r} leaves nothing to train (no pruned head?)")
    for p in loaded.model.parameters():
        p.requires_grad_(id(p) in keep)
    return before


def restore(loaded: Loaded, pruning: SoftPruning, config: RestoreConfig, out: str | Path, resume: bool = True) -> dict:
    """Fine-tune `loaded.model` in place with `pruning` kept in place; afterwards the pruning is baked in.

    `out` receives lightning/checkpoints (last.ckpt every `ckpt_every` steps) and lightning/logs; with
    `resume`, a run finds out/lightning/checkpoints/last.ckpt and continues from it.
    """
    out = Path(out)
    examples = restore_examples(config)
    ckpt_dir = out / "lightning" / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    resume_from = str(last) if resume and last.exists() else None
    if pruning.mode == "qkv":
        pruning.bake(loaded)  # the reference pipeline fine-tunes the scaled weights
    else:
        pruning.attach(loaded)
    flags = trainable(loaded, config.trainable, pruning)
    device = next(loaded.model.parameters()).device
    try:
        trainer = trainer_for(out / "lightning", config, "gpu" if device.type == "cuda" else "cpu")
        module = FinetuneModule(loaded.model, config.optim)
        loaded.model.train()
        trainer.fit(module, datamodule=RestoreData(loaded, examples, config),
                    ckpt_path=resume_from, weights_only=True)
        loss = trainer.callback_metrics.get("train/loss")
    finally:
        loaded.model.to(device).eval()  # Lightning's teardown moves the module to the CPU
        for name, p in loaded.model.named_parameters():
            p.requires_grad_(flags[name])
        if pruning.mode == "gate":
            pruning.detach()
    if pruning.mode == "gate":
        pruning.bake(loaded)
    record = {"steps": int(trainer.global_step), "examples": len(examples), "mode": pruning.mode,
              "pruning_baked": True, "resumed_from": resume_from,
              "final_loss": float(loss) if loss is not None else None}
    write_json(out / "finetune.json", record)
    return record


def trainer_for(root: Path, config: RestoreConfig, accelerator: str) -> L.Trainer:
    from lightning.pytorch.loggers import CSVLogger

    checkpoint = FinalCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=config.ckpt_every)
    return L.Trainer(
        accelerator=accelerator, devices=1, max_steps=config.steps, max_epochs=-1, callbacks=[checkpoint],
        logger=CSVLogger(root, name="logs"), log_every_n_steps=10, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root, precision=config.precision,
    )


def save_model(loaded: Loaded, out: str | Path) -> Path:
    """Write the (pruned, fine-tuned) model and its processor as a from_pretrained directory."""
    out = Path(out)
    loaded.model.save_pretrained(out)
    loaded.processor.save_pretrained(out)
    return out
