"""EvalModule: a LightningModule that answers benchmark samples by greedy generation or scores continuations."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader

from llava_circuits.data import prompts
from llava_circuits.data.records import Sample
from llava_circuits.evaluation.tasks import Task
from llava_circuits.models.load import Loaded


class ResponseLog:
    """responses.jsonl and errors.jsonl of a run: one line per sample, appended as it goes, so a rerun skips done ids."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("responses", "errors"):
            self.end_cut_line(name)

    def end_cut_line(self, name: str) -> None:
        """End a last line a kill cut short, so the next record starts a line of its own instead of joining it."""
        path = self.path(name)
        if path.exists() and path.stat().st_size:
            with open(path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def path(self, name: str) -> Path:
        return self.out / f"{name}.jsonl"

    def append(self, name: str, record: dict) -> None:
        """One os.write per line on an O_APPEND file: whole lines even with several ranks writing at once."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        fd = os.open(self.path(name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def read(self, name: str) -> dict[str, dict]:
        """Records by id; a line cut short by a kill is ignored (that sample is redone)."""
        records: dict[str, dict] = {}
        if self.path(name).exists():
            for number, line in enumerate(self.path(name).read_text().splitlines(), 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(record, dict) or "id" not in record:
                    raise ValueError(f"{self.path(name)}:{number}: not a record with an 'id': {line[:80]!r}")
                records.setdefault(str(record["id"]), record)
        return records

    def done_ids(self) -> set[str]:
        return set(self.read("responses")) | set(self.read("errors"))


def format_prompt(loaded: Loaded, body: str, has_image: bool) -> str:
    """The model's own prompt around `body`: LLaVA-1.5's USER/ASSISTANT template, or the tokenizer's chat template."""
    if loaded.anatomy.family == "llava":
        return prompts.llava_prompt(body, image=has_image)
    template = getattr(loaded.tokenizer, "chat_template", None)
    if template:
        messages = [{"role": "user", "content": body}]
        return loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return body


def collate(samples: list[Sample]) -> tuple[list[tuple[Sample, Image.Image | None]], list[dict]]:
    """Open each sample's image; a sample whose image cannot be opened becomes an error record, not a crash."""
    ready, errors = [], []
    for sample in samples:
        try:
            image = Image.open(sample.image).convert("RGB") if sample.image is not None else None
        except (OSError, ValueError) as err:
            errors.append({"id": sample.id, "error": f"{type(err).__name__}: {err}"})
            continue
        ready.append((sample, image))
    return ready, errors


class EvalModule(L.LightningModule):
    """Answers a shard of samples per rank and appends every answer to responses.jsonl as soon as it exists."""

    def __init__(self, loaded: Loaded, task: Task, samples: Sequence[Sample], log: ResponseLog,
                 interventions: Sequence = (), batch_size: int = 8, max_new_tokens: int | None = None):
        super().__init__()
        self.loaded, self.task, self.samples, self.log = loaded, task, list(samples), log
        self.interventions = list(interventions)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens or task.max_new_tokens
        self.model = loaded.model  # registered so Lightning moves it to the rank's device

    def predict_dataloader(self) -> DataLoader:
        done = self.log.done_ids()
        todo = [s for s in self.samples if s.id not in done]
        shard = todo[self.global_rank :: self.trainer.world_size]  # no DistributedSampler: it would pad by repeating
        return DataLoader(shard, batch_size=self.batch_size, collate_fn=collate, shuffle=False)

    def on_predict_start(self) -> None:
        stack = contextlib.ExitStack()
        try:
            for intervention in self.interventions:
                stack.enter_context(intervention.applied(self.loaded))
        except BaseException:  # a failed attach takes the ones before it off again
            stack.close()
            raise
        self._attached = stack

    def on_predict_end(self) -> None:
        self.detach_interventions()

    def detach_interventions(self) -> None:
        """Take the interventions off the model (after the run, or when it failed half way)."""
        stack, self._attached = getattr(self, "_attached", None), None
        if stack is not None:
            stack.close()

    def configure_callbacks(self) -> list[L.Callback]:
        return [_DetachOnException()]

    @torch.no_grad()
    def predict_step(self, batch, batch_idx: int) -> None:
        ready, errors = batch
        for error in errors:
            self.log.append("errors", error)
        if not ready:
            return None
        answer = self.generate if self.task.mode == "generate" else self.loglik
        try:
            records = answer(ready)
        except Exception:  # find the sample at fault; the others are still answered
            records = []
            for item in ready:
                try:
                    records += answer([item])
                except Exception as err:
                    self.log.append("errors", {"id": item[0].id, "error": f"{type(err).__name__}: {err}"})
        for record in records:
            self.log.append("responses", record)
        return None

    def encode(self, texts: list[str], images: list[Image.Image]) -> dict:
        if self.loaded.anatomy.family == "llava":
            inputs = self.loaded.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        else:
            inputs = self.loaded.tokenizer(texts, return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in inputs.items()}

    def generate(self, items: list[tuple[Sample, Image.Image | None]]) -> list[dict]:
        texts = [format_prompt(self.loaded, self.task.body(s), image is not None) for s, image in items]
        inputs = self.encode(texts, [image for _, image in items if image is not None])
        tokenizer = self.loaded.tokenizer
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [{"id": s.id, "prompt": t, "response": a.strip()} for (s, _), t, a in zip(items, texts, answers)]

    def loglik(self, items: list[tuple[Sample, Image.Image | None]]) -> list[dict]:
        return [self.loglik_one(sample, image) for sample, image in items]

    def loglik_one(self, sample: Sample, image: Image.Image | None) -> dict:
        """Summed log-probability of each continuation after the body; all continuations in one batch."""
        tokenizer = self.loaded.tokenizer
        body = self.task.body(sample)
        context = format_prompt(self.loaded, body, True) if image is not None else body
        inputs = self.encode([context], [image] if image is not None else [])
        ctx = inputs["input_ids"][0]
        if ctx.numel() == 0:  # an empty context still needs one token to predict the first continuation token
            ctx = torch.tensor([tokenizer.bos_token_id or tokenizer.eos_token_id], device=self.device)
        conts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in self.task.continuations(sample)]
        seqs = [torch.cat([ctx, torch.tensor(c, dtype=ctx.dtype, device=self.device)]) for c in conts]
        ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=tokenizer.pad_token_id or 0)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
        extra = {k: v.expand(len(seqs), *v.shape[1:]) for k, v in inputs.items() if k == "pixel_values"}
        logprobs = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask, **extra).logits.float(), -1)
        scores = []
        for row, cont in enumerate(conts):
            start = len(ctx)
            targets = ids[row, start : start + len(cont)]
            scores.append(logprobs[row, start - 1 : start - 1 + len(cont)].gather(-1, targets[:, None]).sum().item())
        return {"id": sample.id, "logliks": scores, "n_tokens": [len(c) for c in conts]}


class _DetachOnException(L.Callback):
    """Lightning skips on_predict_end when a step raises: the interventions come off here instead."""

    def on_exception(self, trainer, module, exception) -> None:
        module.detach_interventions()
