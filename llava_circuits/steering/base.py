"""The one protocol every intervention follows, so the evaluation harness runs any of them, or a stack, alike."""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Iterator

from llava_circuits.artifacts import read_artifact
from llava_circuits.models.load import Loaded

KINDS: dict[str, type["Intervention"]] = {}


class Intervention(ABC):
    """Something that changes a model while attached: steering, feature edits, soft-pruning gates."""

    kind: ClassVar[str]
    """The artifact kind it is saved as (steerfair, barrier, feature-analysis, pruning, ...)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            KINDS[cls.kind] = cls

    @abstractmethod
    def attach(self, loaded: Loaded) -> None:
        """Install the change (hooks or weight edits) on the loaded model."""

    @abstractmethod
    def detach(self) -> None:
        """Undo attach exactly."""

    @abstractmethod
    def describe(self) -> dict:
        """A JSON-able summary for run.json and reports."""

    @abstractmethod
    def save(self, path: str | Path) -> Path:
        """Write the intervention as an artifact directory."""

    @classmethod
    @abstractmethod
    def load(cls, path: str | Path, loaded: Loaded) -> "Intervention":
        """Read an artifact written by save, checked against the loaded model."""

    @contextlib.contextmanager
    def applied(self, loaded: Loaded) -> Iterator["Intervention"]:
        """Attached inside the block, detached after it, also on error."""
        self.attach(loaded)
        try:
            yield self
        finally:
            self.detach()


# modules whose import registers an Intervention kind; imported on first load so that the CLI stays fast
INTERVENTION_MODULES = ("llava_circuits.steering.steerfair", "llava_circuits.steering.barrier",
                        "llava_circuits.transcoders.replacement", "llava_circuits.pruning.prune",
                        "llava_circuits.features.steer")


def import_intervention_modules() -> None:
    import importlib

    for name in INTERVENTION_MODULES:
        importlib.import_module(name)


def load_intervention(path_or_repo_id: str | Path, loaded: Loaded) -> Intervention:
    """The intervention an artifact (local path or Hub id) holds, by its kind."""
    artifact = read_artifact(path_or_repo_id)
    import_intervention_modules()
    if artifact.kind not in KINDS:
        raise ValueError(f"{path_or_repo_id}: artifact kind {artifact.kind!r} is not an intervention; known: {sorted(KINDS)}")
    return KINDS[artifact.kind].load(artifact.path, loaded)
