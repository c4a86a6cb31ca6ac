"""Supervised fine-tuning of a VLM or causal LM: loss on answer tokens only.

`SFTCollator` turns examples `{"prompt": str, "answer": str, "image": PIL.Image | None}` into a
batch: the prompt goes through the processor (which expands "<image>" into image tokens) or the
tokenizer, the answer's tokens plus EOS are appended, and `labels` are -100 everywhere except on
the answer tokens. `FinetuneModule` trains whatever parameters have `requires_grad`, so a model
with frozen extras attached (e.g. soft-pruning gates) trains around them.

    module = FinetuneModule(model, FinetuneConfig(lr=3e-4, warmup_steps=100))
    trainer = L.Trainer(max_steps=2000, callbacks=[FinalCheckpoint(dirpath=..., save_last=True)])
    trainer.fit(module, loader)                    # later: trainer.fit(module, loader, ckpt_path="last", weights_only=True)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor


class FinalCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes last.ckpt when training stops between two saves (max_steps), so that
    a finished run's last.ckpt holds its final weights and a later stage can resume from it."""

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


@dataclass
class FinetuneConfig:
    """Optimiser and schedule of a fine-tuning run."""

    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to matrices only (not to norms, biases or 1-d gates)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = 100
    """Linear warm-up from 0 to `lr` over this many optimiser steps."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr * min_lr_ratio."""
    total_steps: int | None = None
    """Length of the cosine schedule; None uses the trainer's estimated_stepping_batches."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value (None: no clipping)."""
    loss_per: str = "token"
    """"token": mean over all answer tokens of the batch (LLaVA's); "example": mean of each example's mean,
    so that one long answer (a caption) weighs as much as a one-letter answer."""


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def example_mean_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy averaged over each example's answer tokens, then over the examples that have any."""
    targets = labels[:, 1:]  # [batch, pos-1]: the token each position predicts
    mask = targets != -100
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)).transpose(1, 2), targets.clamp(min=0), reduction="none")  # [batch, pos-1]
    per_example = (nll * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_example[mask.any(1)].mean()


class FinetuneModule(L.LightningModule):
    """Fine-tunes `model` (a Hugging Face VLM or causal LM) on batches that carry `labels`."""

    def __init__(self, model: torch.nn.Module, config: FinetuneConfig | None = None):
        super().__init__()
        self.model = model
        self.config = config or FinetuneConfig()
        if self.config.loss_per not in ("token", "example"):
            raise ValueError(f"FinetuneConfig.loss_per must be 'token' or 'example', got {self.config.loss_per!r}")
        self.save_hyperparameters({"finetune": asdict(self.config)})

    def forward(self, **batch: Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.config.loss_per == "example":
            loss = example_mean_loss(self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
        else:
            loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out = self.model(**batch)
        labels = batch["labels"][:, 1:]  # [batch, pos-1], the token each position predicts
        mask = labels != -100
        right = (out.logits[:, :-1].argmax(-1) == labels) & mask
        n = batch["input_ids"].shape[0]
        self.log("val/loss", out.loss, batch_size=n)
        self.log("val/answer_token_acc", right.sum() / mask.sum().clamp(min=1), batch_size=n)

    def configure_optimizers(self) -> dict:
        cfg = self.config
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("FinetuneModule: the model has no parameter with requires_grad=True")
        groups = [
            {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)
        total = cfg.total_steps or int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, cfg.warmup_steps, total, cfg.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.config.grad_clip
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")


class SFTCollator:
    """Batches `{"prompt", "answer", "image"}` examples with labels on the answer tokens only.

    `processor` is a multimodal processor (LlavaProcessor) or a plain tokenizer. Prompts must be
    complete (chat template applied, "<image>" placeholder where the image goes); the answer is
    followed by EOS. Padding goes on `padding_side` ("right" for training, "left" for generation).
    """

    def __init__(self, processor: Any, padding_side: str = "right", max_length: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.padding_side = padding_side
        self.max_length = max_length

    def prompt_ids(self, examples: list[dict]) -> tuple[list[list[int]], Tensor | None]:
        """Token ids of each prompt (images expanded) and the pixel values of the examples with images."""
        ids: list[list[int] | None] = [None] * len(examples)
        with_image = [i for i, ex in enumerate(examples) if ex.get("image") is not None]
        pixel_values = None
        if with_image:
            enc = self.processor(
                text=[examples[i]["prompt"] for i in with_image],
                images=[examples[i]["image"] for i in with_image],
                padding=True,
                return_tensors="pt",
            )
            for row, i in enumerate(with_image):
                ids[i] = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
            pixel_values = enc["pixel_values"]  # [n_images, 3, H, W]
        for i, ex in enumerate(examples):
            if ids[i] is None:
                ids[i] = self.tokenizer(ex["prompt"])["input_ids"]
        return ids, pixel_values

    def __call__(self, examples: list[dict]) -> dict[str, Tensor]:
        prompts, pixel_values = self.prompt_ids(examples)
        eos = self.tokenizer.eos_token_id
        seqs, labels = [], []
        for ex, prompt in zip(examples, prompts):
            answer = self.tokenizer(ex["answer"], add_special_tokens=False)["input_ids"] + [eos]
            seq = prompt + answer
            lab = [-100] * len(prompt) + answer
            if self.max_length and len(seq) > self.max_length:
                raise ValueError(f"example of {len(seq)} tokens exceeds max_length={self.max_length}: {ex['prompt']!r}")
            seqs.append(seq)
            labels.append(lab)
        batch = pad(seqs, labels, self.tokenizer.pad_token_id, self.padding_side)
        if pixel_values is not None:
            batch["pixel_values"] = pixel_values
        return batch


def prompt_batches(processor: Any, examples: list[dict], batch_size: int):
    """Left-padded model inputs (no labels) of `examples` ({"prompt", "image"}), `batch_size` at a time, for
    reading the next token after each prompt."""
    collate = SFTCollator(processor)
    for i in range(0, len(examples), batch_size):
        ids, pixel_values = collate.prompt_ids(examples[i : i + batch_size])
        batch = pad(ids, ids, collate.tokenizer.pad_token_id, "left")
        del batch["labels"]
        if pixel_values is not None:
            batch["pixel_values"] = pixel_values
        yield batch


def pad(seqs: list[list[int]], labels: list[list[int]], pad_id: int, side: str) -> dict[str, Tensor]:
    """input_ids / attention_mask / labels padded to the longest sequence on `side`."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    label_ids = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, (seq, lab) in enumerate(zip(seqs, labels)):
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        input_ids[row, cols] = torch.tensor(seq)
        attention_mask[row, cols] = 1
        label_ids[row, cols] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}
