"""Image-text batches for transcoder training, deterministic in (seed, step) and resumable.

Sources:
    toy        the toy world's training stream (prompt + answer, scenes drawn on the fly)
    instruct   LLaVA-Instruct style json + image folder (`data.instruct.read_conversations`)
    captions   an image-caption folder: `metadata.jsonl` lines {"file_name", "text"} (Hugging Face
               imagefolder), or images with a same-stem `.txt` caption beside them

Global batch b holds examples b*batch_size ... (b+1)*batch_size-1 of the stream (files are read in a
seeded order that is reshuffled every pass). With N data-parallel ranks, rank r takes rows
[r*batch_size/N, (r+1)*batch_size/N) of each global batch, so the tokens of a step do not depend on N.
The loader starts at the batch recorded in the checkpoint (`state_dict`), so a resumed run sees
exactly the batches an uninterrupted one would.

Each batch carries `token_weight` [batch, pos]: 0 on padding, BOS and excluded token ids,
`image_weight` on image tokens and `text_weight` on the other tokens.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Iterator

import lightning as L
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from llava_circuits.data.prompts import llava_prompt

SOURCES = ("toy", "instruct", "captions")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_QUERY = "Describe this image."


class Batches(IterableDataset):
    """Batches start, start+1, ... (stop excluded, or forever); worker i of n makes every n-th batch."""

    def __init__(self, make: Callable[[int], dict], start: int, stop: int | None):
        self.make, self.start, self.stop = make, start, stop

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.start + worker
        while self.stop is None or b < self.stop:
            yield self.make(b)
            b += n_workers


def open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read image ({err})") from None


def read_captions(folder: Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs of an image-caption folder (metadata.jsonl, or same-stem .txt files)."""
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        pairs = []
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            text = rec.get("text", rec.get("caption"))
            if not isinstance(rec.get("file_name"), str) or not isinstance(text, str):
                raise ValueError(f"{meta}:{n}: need string fields 'file_name' and 'text' (or 'caption')")
            pairs.append((folder / rec["file_name"], text))
        return pairs
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").is_file())
    if not images:
        raise ValueError(f"{folder}: no metadata.jsonl and no image with a same-stem .txt caption")
    return [(p, p.with_suffix(".txt").read_text().strip()) for p in images]


class TranscoderDataModule(L.LightningDataModule):
    """Deterministic, resumable image-text batches for TranscoderModule (see the module docstring)."""

    def __init__(
        self,
        model: str = "",
        source: str = "toy",
        path: str | None = None,
        images: str | None = None,
        batch_size: int = 16,
        seed: int = 0,
        max_length: int = 512,
        val_batches: int = 2,
        exclude_bos: bool = True,
        exclude_token_ids: list[int] | None = None,
        image_weight: float = 1.0,
        text_weight: float = 1.0,
        num_workers: int = 0,
    ):
        """
        Args:
            model: model directory or Hub id whose processor tokenizes the data (the CLI links it to the model's).
            source: toy, instruct or captions.
            path: instruct: the conversations json; captions: the folder.
            images: instruct: the image folder (default: the json's folder).
            batch_size: sequences per optimiser step, over all ranks together.
            seed: seed of the example order.
            max_length: sequences are cut to this many tokens.
            val_batches: batches in the validation set (drawn from a separate stream).
            exclude_bos: give the BOS token weight 0.
            exclude_token_ids: more token ids to give weight 0.
            image_weight: weight of image-token positions in the loss.
            text_weight: weight of text-token positions in the loss.
            num_workers: DataLoader worker processes.
        """
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"data source must be one of {SOURCES}, got {source!r}")
        if source != "toy" and not path:
            raise ValueError(f"data source {source!r} needs path")
        self.model, self.source, self.path, self.images = model, source, path, images
        self.batch_size, self.seed, self.max_length, self.val_batches = batch_size, seed, max_length, val_batches
        self.exclude_bos, self.exclude_token_ids = exclude_bos, list(exclude_token_ids or [])
        self.image_weight, self.text_weight, self.num_workers = image_weight, text_weight, num_workers
        self.processor = None  # set before fit to skip loading it from `model`
        self._records: list | None = None
        self._start = 0

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The next global batch to train on, saved in every checkpoint."""
        trainer = self.trainer
        done = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else self._start
        return {"next_batch": int(done), "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed or state.get("batch_size", self.batch_size) != self.batch_size:
            raise ValueError(f"checkpoint data was seed={state.get('seed')}, batch_size={state.get('batch_size')}; "
                             f"this run has seed={self.seed}, batch_size={self.batch_size}: "
                             "resuming would change the batches")
        self._start = int(state["next_batch"])

    # --- loaders --------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.processor is None:
            self.processor = load_processor(self.model)
        if self.source != "toy" and self._records is None:
            self._records = self._read()

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        accum = trainer.accumulate_grad_batches if trainer is not None else 1
        stop = trainer.max_steps * accum if trainer is not None and trainer.max_steps > 0 else None
        return self._loader(Batches(lambda b: self.batch(b, "train"), self._start, stop))

    def val_dataloader(self) -> DataLoader:
        return self._loader(Batches(lambda b: self.batch(b, "val"), 0, self.val_batches))

    def _loader(self, batches: Batches) -> DataLoader:
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers)

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def batch(self, b: int, split: str = "train") -> dict[str, Tensor]:
        """This rank's rows of global batch b of `split`, collated, with `token_weight`."""
        rank, world = self._rank()
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by the number of ranks ({world})")
        per = self.batch_size // world
        rows = range(b * self.batch_size + rank * per, b * self.batch_size + (rank + 1) * per)
        return self.collate([self.example(i, split) for i in rows])

    # --- examples -------------------------------------------------------------------------------
    def example(self, i: int, split: str = "train") -> dict:
        """Example i of the stream: {"prompt", "answer", "image"}."""
        if self.source == "toy":
            return toy_example(random.Random(f"transcoders:{split}:{self.seed}:{i}"))
        records = self._records if self._records is not None else self._read()
        n_val = min(self.val_batches * self.batch_size, len(records) // 2)  # the last records are held out
        if split == "val":
            return self._format(records[len(records) - n_val + i % max(n_val, 1)])
        n = len(records) - n_val
        order = list(range(n))
        random.Random(f"transcoders:{self.seed}:pass{i // n}").shuffle(order)
        return self._format(records[order[i % n]])

    def _read(self) -> list:
        if self.source == "instruct":
            from llava_circuits.data.instruct import read_conversations

            return read_conversations(Path(self.path), Path(self.images) if self.images else None)
        return read_captions(Path(self.path))

    def _format(self, record) -> dict:
        if self.source == "captions":
            image, text = record
            return {"prompt": llava_prompt(CAPTION_QUERY), "answer": text, "image": open_image(image)}
        (user, assistant), *rest = record.turns
        eos = getattr(self._tokenizer(), "eos_token", None) or ""
        answer = assistant + "".join(f"{eos}USER: {u} ASSISTANT: {a}" for u, a in rest)
        image = open_image(record.image) if record.image is not None else None
        return {"prompt": llava_prompt(user, image=image is not None), "answer": answer, "image": image}

    def _tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def collate(self, examples: list[dict]) -> dict[str, Tensor]:
        """input_ids, attention_mask, token_weight [batch, pos] (+ pixel_values), cut to max_length."""
        from llava_circuits.finetune import SFTCollator

        batch = SFTCollator(self.processor, padding_side="right")(examples)
        batch.pop("labels")
        for key in ("input_ids", "attention_mask"):
            batch[key] = batch[key][:, : self.max_length]
        batch["token_weight"] = self.weights(batch["input_ids"], batch["attention_mask"])
        return batch

    def weights(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[batch, pos] float: 0 on padding/BOS/excluded ids, image_weight on image tokens, text_weight elsewhere."""
        tok = self._tokenizer()
        image_id = getattr(self.processor, "image_token_id", None)
        is_image = input_ids == image_id if image_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        w = torch.where(is_image, self.image_weight, self.text_weight) * attention_mask.float()
        excluded = list(self.exclude_token_ids)
        if self.exclude_bos and tok.bos_token_id is not None:
            excluded.append(tok.bos_token_id)
        if excluded:
            w = w.masked_fill(torch.isin(input_ids, torch.tensor(excluded)), 0.0)
        return w


def toy_example(rng: random.Random) -> dict:
    """One example of the toy world's training stream, its task kind drawn with the stream's mix."""
    from llava_circuits.toy.train import ToyDataConfig, training_example

    cfg = ToyDataConfig()
    kind = rng.choices(list(cfg.mix), weights=list(cfg.mix.values()))[0]
    ex = training_example(rng, cfg, kind)
    return {"prompt": ex["prompt"], "answer": ex["answer"], "image": ex["image"]}


def load_processor(model: str):
    """The processor (LLaVA) or tokenizer (text models) saved with a model directory or Hub id."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    from llava_circuits.models.load import resolve_source

    if not model:
        raise ValueError("TranscoderDataModule needs `model` (the model whose processor tokenizes the data)")
    source = resolve_source(model)
    is_llava = AutoConfig.from_pretrained(source).model_type == "llava"
    return (AutoProcessor if is_llava else AutoTokenizer).from_pretrained(source)
