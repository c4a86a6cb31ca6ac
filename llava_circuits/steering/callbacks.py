"""Lightning callbacks for steering: SteeringFit fits SteerFair during Trainer.predict over demonstrations;
InterventionEval answers every batch of an EvalModule run twice (baseline, then with interventions
attached) and writes both metrics side by side, with the samples that flipped.

`compare(...)` runs an EvalModule with InterventionEval: one Trainer run, one harness, two answers per
sample. Its output directory holds baseline/ and intervened/ (responses.jsonl, errors.jsonl, each
resumable), metrics.json ({"baseline", "intervened", "flips", "interventions"}), logs/metrics.csv, run.json.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch.utils.data import DataLoader

from llava_circuits.data.records import Sample
from llava_circuits.evaluation.module import EvalModule, ResponseLog, collate
from llava_circuits.evaluation.run import versions, write_json
from llava_circuits.evaluation.tasks import Task, predicted_letter, task_for
from llava_circuits.metrics import parse_pope_answer
from llava_circuits.models.load import Loaded
from llava_circuits.sites import capture
from llava_circuits.steering.steerfair import (
    Demo,
    SteerFair,
    SteerFairConfig,
    kde_plots,
)

CHOICE_TASKS = ("scienceqa", "bbq", "bbq_loglik", "mmlu", "hellaswag")


# --- fitting SteerFair ------------------------------------------------------------------------------

class DemonstrationModule(L.LightningModule):
    """Forward passes over demonstration prompts, nothing generated: SteeringFit reads their activations."""

    def __init__(self, loaded: Loaded, demos: Sequence[Demo], batch_size: int = 8):
        super().__init__()
        self.loaded, self.demos, self.batch_size = loaded, list(demos), batch_size
        self.model = loaded.model  # registered so Lightning moves it to the device

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.demos, batch_size=self.batch_size, shuffle=False, collate_fn=list)

    @torch.no_grad()
    def predict_step(self, batch: list[Demo], batch_idx: int) -> None:
        images = [Image.open(d.image).convert("RGB") for d in batch if d.image is not None]
        self.model(**encode(self.loaded, [d.text for d in batch], images, self.device), logits_to_keep=1)


def encode(loaded: Loaded, texts: list[str], images: list, device) -> dict:
    """Model inputs for prompts (left-padded) and their images, on `device`."""
    if loaded.anatomy.family == "llava":
        inputs = loaded.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    else:
        inputs = loaded.tokenizer(texts, return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in inputs.items()}


class SteeringFit(Callback):
    """Captures `layers.{i}.attn.heads` of every layer at the last token of each demonstration batch,
    then fits SteerFair when predict ends (`self.steerfair`); writes the artifact and the KDE plots
    (kde_top_heads.png) when given where."""

    def __init__(self, config: SteerFairConfig | None = None, artifact: str | Path | None = None,
                 plots: str | Path | None = None):
        self.config = config or SteerFairConfig()
        self.artifact = Path(artifact) if artifact is not None else None
        self.plots = Path(plots) if plots is not None else None
        self.steerfair: SteerFair | None = None
        self.acts: torch.Tensor | None = None  # [n, n_layers, n_heads, head_dim] after predict
        self.rules: torch.Tensor | None = None  # [n]
        self._parts: list[torch.Tensor] = []
        self._rules: list[int] = []
        self._stack: contextlib.ExitStack | None = None
        self._capture = None

    def _sites(self, module) -> list[str]:
        return [f"layers.{i}.attn.heads" for i in range(module.loaded.anatomy.n_layers)]

    def on_predict_start(self, trainer, module) -> None:
        if trainer.world_size > 1:
            raise ValueError("SteeringFit runs on one device (devices=1)")
        self._parts, self._rules = [], []

    def on_predict_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        self._stack = contextlib.ExitStack()
        self._capture = self._stack.enter_context(
            capture(module.loaded.model, self._sites(module), positions="last", anatomy=module.loaded.anatomy))

    def on_predict_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        acts = torch.stack([self._capture[s][:, -1] for s in self._sites(module)], dim=1)  # [b, L, H, hd]
        self._parts.append(acts.float().cpu())
        self._rules += [d.rule for d in batch]
        self._close()

    def on_exception(self, trainer, module, exception) -> None:
        self._close()

    def _close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack, self._capture = None, None

    def on_predict_end(self, trainer, module) -> None:
        self.acts, self.rules = torch.cat(self._parts), torch.tensor(self._rules)
        self.steerfair = SteerFair.fit(self.acts, self.rules, self.config, module.loaded.fingerprint())
        if self.artifact is not None:
            self.steerfair.save(self.artifact)
        if self.plots is not None:
            kde_plots(self.acts, self.rules, self.steerfair.importance, self.plots)


def fit_steerfair(loaded: Loaded, demos: Sequence[Demo], config: SteerFairConfig | None = None,
                  artifact: str | Path | None = None, plots: str | Path | None = None, batch_size: int = 8,
                  progress: bool = False) -> SteerFair:
    """Fit SteerFair on demonstrations with SteeringFit in one Trainer.predict run."""
    fit = SteeringFit(config, artifact, plots)
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=progress, callbacks=[fit])
    trainer.predict(DemonstrationModule(loaded, demos, batch_size), return_predictions=False)
    return fit.steerfair


# --- baseline against intervened, in one run --------------------------------------------------------

def sample_correct(task: Task, sample: Sample, response: dict) -> bool | None:
    """Whether a response is right, for benchmarks with one right answer per sample (else None)."""
    if task.name == "pope":
        return parse_pope_answer(response["response"]) == sample.answer
    if task.name in CHOICE_TASKS and isinstance(sample.answer, int):
        return predicted_letter(sample, response) == sample.answer
    return None


def side_by_side(task: Task, samples: Sequence[Sample], baseline: dict, intervened: dict) -> dict:
    """Both metrics on the samples answered in both runs, and the samples whose correctness flipped."""
    both = [s for s in samples if s.id in baseline and s.id in intervened]
    flips: dict[str, list[str]] = {"right_to_wrong": [], "wrong_to_right": []}
    for s in both:
        before, after = sample_correct(task, s, baseline[s.id]), sample_correct(task, s, intervened[s.id])
        if before is not None and before != after:
            flips["right_to_wrong" if before else "wrong_to_right"].append(s.id)
    return {
        "baseline": task.score(both, baseline),
        "intervened": task.score(both, intervened),
        "flips": {"compared": len(both), "right_to_wrong": len(flips["right_to_wrong"]),
                  "wrong_to_right": len(flips["wrong_to_right"]),
                  **{f"{k}_ids": v for k, v in flips.items()}},
    }


def _flat(metrics: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class InterventionEval(Callback):
    """Answers each batch of an EvalModule predict run a second time with `interventions` attached
    (into out/intervened/), then scores baseline and intervened side by side into out/metrics.json
    and the Trainer's loggers. The EvalModule itself must run without interventions: it is the baseline."""

    def __init__(self, interventions: Sequence, out: str | Path):
        self.interventions = list(interventions)
        self.out = Path(out)
        self.responses = ResponseLog(self.out / "intervened")  # not `log`: Lightning sets callback.log
        self.metrics: dict | None = None

    def _answer(self, module: EvalModule, batch) -> None:
        """EvalModule.predict_step on `batch` with the interventions attached, logging into out/intervened."""
        baseline_log, module.log = module.log, self.responses
        try:
            with contextlib.ExitStack() as stack:
                for intervention in self.interventions:
                    stack.enter_context(intervention.applied(module.loaded))
                module.predict_step(batch, -1)
        finally:
            module.log = baseline_log

    def on_predict_start(self, trainer, module) -> None:
        if module.interventions:
            raise ValueError("InterventionEval: the EvalModule is the baseline; give the interventions to the callback")

    def on_predict_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        ready, errors = batch
        done = self.responses.done_ids()
        todo = ([item for item in ready if item[0].id not in done], [e for e in errors if e["id"] not in done])
        if todo[0] or todo[1]:
            self._answer(module, todo)

    def on_predict_end(self, trainer, module) -> None:
        self.catch_up(module, trainer.global_rank, trainer.world_size)
        trainer.strategy.barrier()
        if trainer.global_rank == 0:
            self.finish(module, trainer.loggers)

    def catch_up(self, module: EvalModule, rank: int = 0, world_size: int = 1) -> None:
        """Answer, with interventions, the samples the baseline answered in an interrupted earlier run."""
        done, base = self.responses.done_ids(), module.log.done_ids()
        left = [s for s in module.samples[rank::world_size] if s.id in base and s.id not in done]
        for i in range(0, len(left), module.batch_size):
            self._answer(module, collate(left[i : i + module.batch_size]))

    def finish(self, module: EvalModule, loggers: Sequence = ()) -> dict:
        """Score both runs side by side into metrics.json (and the loggers)."""
        metrics = side_by_side(module.task, module.samples, module.log.read("responses"), self.responses.read("responses"))
        self.metrics = {**metrics, "interventions": [i.describe() for i in self.interventions]}
        write_json(self.out / "metrics.json", self.metrics)
        for logger in loggers:
            logger.log_metrics(_flat({k: metrics[k] for k in ("baseline", "intervened", "flips")}))
            logger.save()
        return self.metrics


def compare(loaded: Loaded, bench: str, samples: Sequence[Sample], interventions: Sequence, out: str | Path,
            batch_size: int = 8, max_new_tokens: int | None = None, accelerator: str = "auto",
            progress: bool = False, config: dict | None = None) -> dict:
    """Baseline and intervened answers to `samples` in one Trainer run (EvalModule + InterventionEval)."""
    out = Path(out)
    task = task_for(bench)
    start = time.time()
    module = EvalModule(loaded, task, samples, ResponseLog(out / "baseline"), (), batch_size, max_new_tokens)
    callback = InterventionEval(interventions, out)
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=CSVLogger(out, name="logs", version=""),
                        callbacks=[callback], enable_checkpointing=False, enable_model_summary=False,
                        use_distributed_sampler=False, enable_progress_bar=progress)
    trainer.predict(module, return_predictions=False)
    if callback.metrics is None:  # Lightning skips every hook when the baseline has nothing left to answer
        callback.catch_up(module)
        callback.finish(module, trainer.loggers)
    write_json(out / "run.json", {
        "command": sys.argv, "bench": bench, "model": loaded.name_or_path, "samples": len(samples),
        "interventions": [i.describe() for i in interventions], "config": config or {},
        "wall_seconds": round(time.time() - start, 3), "versions": versions()})
    return callback.metrics


# --- YAML recipes for the steering commands ---------------------------------------------------------

def recipe(path: str | Path | None, section: str, cls, run: dict, run_defaults: dict, method: dict):
    """Settings of a steering command: an argument given (not None) wins over the YAML recipe, which wins
    over the defaults. Top-level YAML keys are run options (`run_defaults`); `section` holds `cls` fields.
    Returns the run options, the `cls` instance and the names of the fields set by the recipe or arguments."""
    raw = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
    unknown = sorted(set(raw) - set(run_defaults) - {section})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(run_defaults) + [section]}")
    fields = {f.name for f in dataclasses.fields(cls)}
    block = raw.get(section) or {}
    unknown = sorted(set(block) - fields)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown} in {section!r}; known: {sorted(fields)}")
    settled = {k: run[k] if run.get(k) is not None else raw.get(k, default) for k, default in run_defaults.items()}
    given = {**block, **{k: v for k, v in method.items() if v is not None}}
    return settled, cls(**given), set(given)


def load_run_model(run: dict) -> Loaded:
    """The model a steering command runs on, from its settled run options (model, dtype, quantization)."""
    from llava_circuits.models.load import load_model

    if not run["model"]:
        raise ValueError("no model: pass --model or set `model:` in the --config recipe")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(run["model"], dtype=run["dtype"], quantization=run["quantization"], device=device)
