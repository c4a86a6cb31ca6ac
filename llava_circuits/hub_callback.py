"""HubPush: a Lightning callback that pushes a run's checkpoint (and an artifact) to a Hub repo.

Resume on another machine from what it pushed::

    path = llava_circuits.hub.pull("user/run")
    trainer.fit(module, datamodule=dm, ckpt_path=path / "last.ckpt", weights_only=True)
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import lightning as L

from llava_circuits.hub import push

log = logging.getLogger(__name__)


class HubPush(L.Callback):
    """Push `last.ckpt` (and an artifact) to a Hub repo every N optimizer steps and when training ends.

    Each push is one commit holding, at the repo root, the artifact written by `artifact_fn` (if any)
    and `last.ckpt`, a full Lightning checkpoint. The checkpoint is saved at the end of the training
    batch of the step it is pushed for (Lightning 2.6 resumes from one saved at epoch or fit end with one
    batch too many), so a run resumed from the final push goes on exactly as an uninterrupted run would;
    one resumed from a mid-epoch push does too if its dataloader is resumable (Lightning warns otherwise).
    Uploads run in a background thread while training goes on; the end of `fit` waits for them. A failed
    upload keeps its staged copy (DEFAULT_ROOT_DIR/hub_push/step-N, pushable by hand with `llava-circuits hub
    push`): during training it is logged and training goes on (the next push carries a newer state); the
    final one raises when `fit` ends.
    """

    def __init__(
        self,
        repo_id: str,
        every_n_steps: int | None = None,
        push_checkpoint: bool = True,
        artifact_fn: Callable[[L.LightningModule, Path], object] | None = None,
        private: bool = False,
    ):
        """
        Args:
            repo_id: the Hub repo to push to, "user/name"; created if missing.
            every_n_steps: also push every N optimizer steps (default: only when training ends).
            push_checkpoint: push `last.ckpt`, the checkpoint to resume from.
            artifact_fn: called as `artifact_fn(module, dir)` on rank 0 to write an artifact into `dir`
                (e.g. with `write_artifact`); its files are pushed next to the checkpoint.
            private: create the repo as private (ignored if it already exists).
        """
        if not push_checkpoint and artifact_fn is None:
            raise ValueError("HubPush with push_checkpoint=False and no artifact_fn has nothing to push")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps}")
        self.repo_id = repo_id
        self.every_n_steps = every_n_steps
        self.push_checkpoint = push_checkpoint
        self.artifact_fn = artifact_fn
        self.private = private
        self._pushed_step: int | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._upload: tuple[Future, Path] | None = None  # the upload under way and its staged folder

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0
        if step != self._pushed_step and (due or _is_final_step(trainer)):
            self._push(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._pushed_step:  # stopped before the planned last step
            self._push(trainer, pl_module)
        self._wait(final=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._wait()  # let the last good checkpoint finish uploading; the training error is the one to report

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _push(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        stage = Path(trainer.default_root_dir) / "hub_push" / f"step-{step}"
        if trainer.is_global_zero:
            self._wait()
            shutil.rmtree(stage, ignore_errors=True)
            if self.artifact_fn is not None:
                self.artifact_fn(pl_module, stage)
            stage.mkdir(parents=True, exist_ok=True)
        if self.push_checkpoint:
            trainer.save_checkpoint(stage / "last.ckpt")  # collective: every rank takes part
        self._pushed_step = step
        if trainer.is_global_zero:
            message = f"HubPush: {type(pl_module).__name__} at step {step}"
            self._executor = self._executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-push")
            self._upload = self._executor.submit(_push_and_clean, stage, self.repo_id, self.private, message), stage

    def _wait(self, final: bool = False) -> None:
        pending, self._upload = self._upload, None
        if pending is None:
            return
        upload, stage = pending
        try:
            upload.result()  # an upload error surfaces here, in the training thread
        except Exception as e:
            if final:
                raise RuntimeError(f"HubPush: the final upload to {self.repo_id} failed ({e}); it is kept in {stage}") from e
            log.warning("HubPush: upload to %s failed (%s); kept in %s, training goes on", self.repo_id, e, stage)


def _push_and_clean(stage: Path, repo_id: str, private: bool, message: str) -> None:
    push(stage, repo_id, private=private, commit_message=message)  # on failure the stage stays, to push by hand
    shutil.rmtree(stage, ignore_errors=True)
    with contextlib.suppress(OSError):
        stage.parent.rmdir()  # only if no other push is staged there


def _is_final_step(trainer: L.Trainer) -> bool:
    if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    return bool(max_epochs and max_epochs > 0 and trainer.is_last_batch and trainer.current_epoch + 1 >= max_epochs)
