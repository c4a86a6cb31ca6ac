"""`features capture`: a benchmark through the replacement model, with every sample's sparse feature activations.

The evaluation harness answers the benchmark (EvalModule, one Trainer.predict, sharded across devices);
the replacement model computes the transcoder features in the forward pass, and a `Recorder` (an identity
feature edit) keeps the non-zero ones of every forward, tagged by what each position is (image token,
prompt text, generated token). The `ActivationCapture` callback writes them as a shard after each batch,
then the batch's responses (features/store.py explains why in that order), so a killed run resumes where
it stopped, losing and repeating nothing.

    RUN/capture.json      what was captured (bench, data, model, transcoders, settings)
    RUN/responses.jsonl   answers (errors.jsonl: samples that failed), RUN/metrics.json: official metrics
    RUN/acts/*.safetensors the sparse activations (features/store.py)
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from llava_circuits.data.readers import read_benchmark
from llava_circuits.evaluation.module import EvalModule, ResponseLog
from llava_circuits.evaluation.run import versions, write_json
from llava_circuits.evaluation.tasks import task_for
from llava_circuits.features.config import TAGS, CaptureConfig, load_config, override
from llava_circuits.features.store import SampleActs, repair, write_shard
from llava_circuits.models.load import Loaded
from llava_circuits.sites import HookContext
from llava_circuits.transcoders.replacement import ReplacementModel

IMAGE, PROMPT, GENERATED = (TAGS.index(t) for t in TAGS)


def stop_ids(loaded: Loaded) -> list[int]:
    """Token ids after which a generated sequence is over (eos, pad)."""
    eos = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return sorted({int(i) for i in [*ids, loaded.tokenizer.pad_token_id, loaded.tokenizer.eos_token_id] if i is not None})


class PositionTagger:
    """For the forward in progress: each position's tag, whether it is a real token, and its index among the
    sequence's real tokens (left padding and tokens fed after a generated stop token are not real); `last` marks
    each sequence's last prompt position (in the prefill; none while decoding)."""

    def __init__(self, loaded: Loaded):
        self.anatomy, self.stops = loaded.anatomy, torch.tensor(stop_ids(loaded))
        self._step, self._out = None, None
        self.pad: Tensor | None = None  # [batch] left padding of the prompt
        self.prompt_len = 0
        self.last: Tensor | None = None  # [b, s] bool, for the forward of the last call

    def __call__(self, ctx: HookContext) -> tuple[Tensor, Tensor, Tensor]:
        """(tag [b, s] uint8, real [b, s] bool, index [b, s] long) for the forward of ctx."""
        step = ctx.step
        if step is self._step:
            return self._out
        b, s = ctx.shape
        device = step.input_ids.device
        if step.phase == "prefill":
            mask = step.real() if step.attention_mask is not None else torch.ones(b, s, dtype=torch.bool, device=device)
            self.pad, self.prompt_len = (~mask).sum(1), s
            tag = torch.where(self.anatomy.image_mask(step.input_ids), IMAGE, PROMPT).to(torch.uint8)
            real = mask
            last_col = s - 1 - mask.flip(1).long().argmax(1)  # [b]: the last real position, whatever the padding side
            self.last = torch.zeros(b, s, dtype=torch.bool, device=device)
            self.last[torch.arange(b, device=device), last_col] = mask.any(1)
        else:
            generated = step.seq_ids[:, self.prompt_len : step.past_len + s]  # [b, generated so far]
            stopped = torch.isin(generated, self.stops.to(device)).long().cumsum(1) > 0
            real = ~stopped[:, -s:]
            tag = torch.full((b, s), GENERATED, dtype=torch.uint8, device=device)
            self.last = torch.zeros(b, s, dtype=torch.bool, device=device)
        index = torch.arange(step.past_len, step.past_len + s, device=device)[None, :] - self.pad.to(device)[:, None]
        self._step, self._out = step, (tag, real, index)
        return self._out


class Recorder:
    """An identity edit per layer that keeps the non-zero feature activations of each real position."""

    def __init__(self, tagger: PositionTagger, layers: list[int], tags: list[str]):
        self.tagger, self.layers = tagger, sorted(layers)
        self.keep_tags = torch.tensor([TAGS.index(t) for t in tags], dtype=torch.uint8)
        self.done: dict[str, SampleActs] = {}
        self.start()

    def start(self) -> None:
        """Forget a generate's partial recording (call before each generate). Samples already finished stay until
        `take`: after a failed batch, EvalModule answers its samples one by one, each its own generate."""
        self.parts: dict[str, list[Tensor]] = defaultdict(list)  # name -> [k, ...] chunks

    def edit(self, layer: int):
        def record(acts: Tensor, ctx: HookContext) -> Tensor:  # acts [n, d_tc], n = batch x pos of this forward
            tag, real, index = self.tagger(ctx)
            rows, cols = ctx.batch, ctx.pos - ctx.past_len  # [n]
            if layer == self.layers[0]:
                keep = real[rows, cols]
                self.parts["pos"].append(torch.stack([rows[keep], index[rows, cols][keep], tag[rows, cols][keep].long()], 1).cpu())
            n, f = (acts != 0).nonzero(as_tuple=True)
            r, c = rows[n], cols[n]
            keep = real[r, c] & torch.isin(tag[r, c], self.keep_tags.to(tag.device))
            layer_col = torch.full_like(f[keep], layer)
            self.parts["entry"].append(torch.stack([r[keep], layer_col, index[r, c][keep], f[keep]], 1).cpu())
            self.parts["value"].append(acts[n[keep], f[keep]].detach().float().cpu())
            return acts  # the same tensor: the replacement model sees no edit

        return record

    def finish(self, ids: list[str]) -> None:
        """Assign what was recorded since `start` to the samples of the batch rows, in order."""
        pos = torch.cat(self.parts["pos"]) if self.parts["pos"] else torch.zeros(0, 3, dtype=torch.long)
        entry = torch.cat(self.parts["entry"]) if self.parts["entry"] else torch.zeros(0, 4, dtype=torch.long)
        value = torch.cat(self.parts["value"]) if self.parts["value"] else torch.zeros(0)
        for row, sample_id in enumerate(ids):
            p = pos[pos[:, 0] == row]
            tags = torch.zeros(int(p[:, 1].max()) + 1 if len(p) else 0, dtype=torch.uint8)
            tags[p[:, 1]] = p[:, 2].to(torch.uint8)
            mine = entry[:, 0] == row
            e, v = entry[mine], value[mine]
            order = torch.argsort((e[:, 1] * (len(tags) + 1) + e[:, 2]) * (int(e[:, 3].max()) + 1 if len(e) else 1) + e[:, 3])
            e, v = e[order], v[order]
            self.done[sample_id] = SampleActs(sample_id, tags, e[:, 1].to(torch.int16), e[:, 2].to(torch.int32),
                                              e[:, 3].to(torch.int32), v)
        self.parts.clear()

    def take(self) -> dict[str, SampleActs]:
        done, self.done = self.done, {}
        return done


class BufferedLog(ResponseLog):
    """A ResponseLog that holds a batch's responses until its activations are on disk (errors go straight in)."""

    def __init__(self, out: str | Path):
        super().__init__(out)
        self.pending: list[dict] = []

    def append(self, name: str, record: dict) -> None:
        if name == "responses":
            self.pending.append(record)
        else:
            super().append(name, record)

    def take(self) -> list[dict]:
        pending, self.pending = self.pending, []
        return pending

    def write(self, record: dict) -> None:
        super().append("responses", record)


class CaptureModule(EvalModule):
    """EvalModule whose every generate call is bracketed by the recorder, so rows map to sample ids."""

    def __init__(self, *args, recorder: Recorder, **kwargs):
        super().__init__(*args, **kwargs)
        if self.task.mode != "generate":
            raise ValueError(f"features capture needs a generation benchmark; {self.task.name} is scored by log-likelihood")
        self.recorder = recorder

    def generate(self, items):
        self.recorder.start()  # a failed attempt leaves no partial recording (finished samples stay)
        records = super().generate(items)
        self.recorder.finish([s.id for s, _ in items])
        return records


class ActivationCapture(Callback):
    """After every predict batch: write the batch's activations as a shard, then its responses."""

    def __init__(self, run: str | Path, recorder: Recorder, log: BufferedLog, value_dtype: str = "float32",
                 info: dict | None = None):
        self.run, self.recorder, self.log, self.value_dtype, self.info = Path(run), recorder, log, value_dtype, info

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        records, acts = self.log.take(), self.recorder.take()
        if not records:
            return
        missing = [r["id"] for r in records if r["id"] not in acts]
        if missing:
            raise RuntimeError(f"no activations were recorded for sample(s) {missing}")
        write_shard(self.run, trainer.global_rank, [acts[r["id"]] for r in records], records, self.value_dtype, self.info)
        for record in records:
            self.log.write(record)


def launcher_rank() -> int:
    """This process's global rank as Lightning's launcher sets it for the processes it starts (0 otherwise)."""
    return int(os.environ.get("NODE_RANK", "0")) * 1000 + int(os.environ.get("LOCAL_RANK", "0"))


RESUME_FREE = ("samples", "batch_size")
"""capture.json entries a resumed run may change: how many samples (--limit) and how they are batched."""


def same_run(path: Path, settings: dict) -> None:
    """Refuse to resume into `path`'s folder with settings that would mix its shards with other ones."""
    if not path.is_file():
        return
    stored = json.loads(path.read_text())
    flat = lambda d: {**{k: v for k, v in d.items() if k != "config"}, **d.get("config", {})}  # noqa: E731
    old, new = flat(stored), flat(json.loads(json.dumps(settings)))
    for key in sorted(set(old) | set(new)):
        if key not in RESUME_FREE and old.get(key) != new.get(key):
            raise ValueError(f"{path}: this run's {key} {new.get(key)!r} differs from the stored {old.get(key)!r}; "
                             "capture into a new folder (or delete this one) to change it")


def capture_loaded(loaded: Loaded, replacement: ReplacementModel, bench: str, data: str | Path, out: str | Path,
                   images: str | Path | None = None, cfg: CaptureConfig | None = None, limit: int | None = None,
                   devices: int = 1, progress: bool = False, record: dict | None = None) -> dict | None:
    """Capture a benchmark into `out`; returns the official metrics of the answers (None on ranks other than 0)."""
    cfg, out = cfg or CaptureConfig(), Path(out)
    task = task_for(bench)
    samples = read_benchmark(task.reader or task.name, data, images)[:limit]
    layers = sorted(cfg.layers if cfg.layers is not None else replacement.layers)
    replacement.record = False
    log = BufferedLog(out)
    first = launcher_rank() == 0  # DDP re-runs this in every process: only the first repairs and records
    restored = repair(out, ResponseLog(out)) if first else 0  # straight to the file, not the batch buffer
    if first:
        settings = {"bench": task.name, "data": str(data), "images": str(images) if images else None,
                    "model": loaded.name_or_path, "layers": layers, "n_features": replacement.transcoders.cfg.n_features,
                    "config": dataclasses.asdict(cfg), "samples": len(samples), **(record or {})}
        same_run(out / "capture.json", settings)
        write_json(out / "capture.json", settings)
    recorder = Recorder(PositionTagger(loaded), layers, cfg.tags)
    for layer in layers:
        replacement.edit(layer, recorder.edit(layer))
    module = CaptureModule(loaded, task, samples, log, [replacement], cfg.batch_size, cfg.max_new_tokens, recorder=recorder)
    callback = ActivationCapture(out, recorder, log, cfg.value_dtype, {"layers": layers})
    trainer = L.Trainer(accelerator="auto", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                        enable_checkpointing=False, enable_model_summary=False, use_distributed_sampler=False,
                        enable_progress_bar=progress, callbacks=[callback])
    start = time.time()
    try:
        trainer.predict(module, return_predictions=False)
    finally:  # an exception skips on_predict_end: take the hooks off the model anyway
        replacement.detach()
        replacement.clear_edits()
    trainer.strategy.barrier()
    if trainer.global_rank != 0:
        return None
    metrics = task.score(samples, log.read("responses"))
    write_json(out / "metrics.json", metrics)
    write_json(out / "run.json", {"restored_lines": restored, "answered": len(log.read("responses")),
                                  "errors": len(log.read("errors")), "wall_seconds": round(time.time() - start, 3),
                                  "versions": versions()})
    return metrics


def features_capture(bench: str, model: str, transcoders: str, data: str, out: str, images: str | None = None,
                     config: str | None = None, limit: int | None = None, batch_size: int | None = None,
                     max_new_tokens: int | None = None, error_term: bool | None = None, devices: int = 1,
                     dtype: str = "auto", quantization: str | None = None) -> dict | None:
    """Answer a benchmark through the replacement model and save every sample's sparse feature activations.

    Args:
        bench: generation benchmark: pope, scienceqa, bbq, amber or chair
        model: Hub id or local model directory
        transcoders: transcoders artifact (path or Hub id) made for the model
        data: the benchmark file or folder in its official format
        out: run directory (responses.jsonl, acts/, capture.json); a rerun resumes it
        images: image folder (default: next to the data file)
        config: features recipe YAML (configs/*/features.yaml); its capture section
        limit: capture only the first N samples
        batch_size: samples per generate call (overrides the config)
        max_new_tokens: generation length (overrides the config; default: the benchmark's)
        error_term: keep the MLPs' exact outputs (answers are the original model's) instead of replacing them
        devices: processes / GPUs (DDP; each writes its own shards)
        dtype: auto, float32, bfloat16 or float16
        quantization: 4bit or 8bit (bitsandbytes)
    """
    from llava_circuits.models.load import load_model

    cfg = override(load_config(config).capture, batch_size=batch_size, max_new_tokens=max_new_tokens, error_term=error_term)
    device = "cuda" if torch.cuda.is_available() and devices == 1 else "cpu"
    loaded = load_model(model, dtype=dtype, quantization=quantization, device=device)
    replacement = ReplacementModel.load(transcoders, loaded, error_term=cfg.error_term)
    metrics = capture_loaded(loaded, replacement, bench, data, out, images, cfg, limit, devices, progress=True,
                             record={"transcoders": str(transcoders), "config_file": config})
    if metrics is not None:
        print(f"features capture: {out} ({metrics})")
    return metrics
