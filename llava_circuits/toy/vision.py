"""Stage 0 of the toy recipe: pre-train the toy CLIP to tell what is in each patch.

LLaVA starts from a CLIP that was pre-trained elsewhere and keeps it frozen. The toy world has no
such CLIP, and a randomly initialised one trained jointly with the language model learns far too
slowly (its features are dominated by colour and background, and the LM cannot bind question words
to them). So the toy CLIP is first trained on its own, briefly, to name the object and the colour
in every patch: two linear heads on the patch tokens of `vision_feature_layer`, cross-entropy
against the scene's ground truth ("none" for empty cells). The heads are thrown away; the tower is
then frozen for stage 1 (`llava_circuits.toy.train`), as LLaVA-1.5 freezes its CLIP.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from llava_circuits.finetune import warmup_cosine
from llava_circuits.toy.scenes import COLOURS, GRID, OBJECTS, render, sample_scene


@dataclass
class VisionPretrainConfig:
    """Stage 0: per-patch object/colour classification of the toy CLIP."""

    steps: int = 600
    """Optimiser steps (0 skips stage 0)."""
    batch_size: int = 64
    """Scenes per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW, warm-up then cosine to 10%)."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    seed: int = 4321
    """Seed of the scene stream."""


class PatchStream(Dataset):
    """Batch b: `batch_size` scenes from Random(f"toy-vision:{seed}:{b}") with per-patch labels."""

    def __init__(self, processor, cfg: VisionPretrainConfig, cooccur: float):
        self.processor, self.cfg, self.cooccur = processor, cfg, cooccur

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, b: int) -> dict[str, Tensor]:
        rng = random.Random(f"toy-vision:{self.cfg.seed}:{b}")
        scenes = [sample_scene(rng, cooccur=self.cooccur) for _ in range(self.cfg.batch_size)]
        objects = torch.full((len(scenes), GRID * GRID), len(OBJECTS))  # [batch, patch], "none" = len(OBJECTS)
        colours = torch.full((len(scenes), GRID * GRID), len(COLOURS))
        for i, scene in enumerate(scenes):
            for o in scene.objects:
                objects[i, o.patch] = OBJECTS.index(o.name)
                colours[i, o.patch] = list(COLOURS).index(o.colour)
        pixels = self.processor.image_processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "objects": objects, "colours": colours}


class VisionPretrainModule(L.LightningModule):
    """The vision tower of a LLaVA model plus two throw-away linear heads on its patch tokens."""

    def __init__(self, model, cfg: VisionPretrainConfig):
        super().__init__()
        self.tower = model.model.vision_tower
        self.layer = model.config.vision_feature_layer
        width = model.config.vision_config.hidden_size
        self.object_head = torch.nn.Linear(width, len(OBJECTS) + 1)
        self.colour_head = torch.nn.Linear(width, len(COLOURS) + 1)
        self.cfg = cfg

    def patch_logits(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.layer][:, 1:]  # [batch, patch, width]
        return self.object_head(hidden), self.colour_head(hidden)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        objects, colours = self.patch_logits(batch["pixel_values"])
        loss_o = torch.nn.functional.cross_entropy(objects.flatten(0, 1), batch["objects"].flatten())
        loss_c = torch.nn.functional.cross_entropy(colours.flatten(0, 1), batch["colours"].flatten())
        full = batch["objects"] < len(OBJECTS)
        acc = (objects.argmax(-1) == batch["objects"])[full].float().mean()
        n = batch["objects"].shape[0]
        self.log_dict({"vision/loss": loss_o + loss_c, "vision/object_acc": acc}, batch_size=n)
        return loss_o + loss_c

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=self.cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, self.cfg.warmup_steps, self.cfg.steps, 0.1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def pretrain_vision(model, processor, cfg: VisionPretrainConfig, cooccur: float, logger=None) -> float:
    """Run stage 0 on `model`'s vision tower in place; returns the final per-patch object accuracy."""
    module = VisionPretrainModule(model, cfg)
    loader = DataLoader(PatchStream(processor, cfg, cooccur), batch_size=None, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=cfg.steps, max_epochs=1, logger=logger or False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=25)
    trainer.fit(module, loader)
    return float(trainer.callback_metrics.get("vision/object_acc", float("nan")))
