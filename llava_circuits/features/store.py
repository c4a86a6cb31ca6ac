"""Sparse feature activations on disk: safetensors shards written as a capture goes, read back per sample.

A capture run directory holds `acts/acts-r{rank}-{index:06d}.safetensors`, one file per batch and rank, with
only the non-zero activations (storage grows with the active features, not with layers x features):

    layer     [M] int16     position [M] int32     feature [M] int32     value [M] float
    tag       [P] uint8     the tag of each of a sample's positions (0 image, 1 prompt text, 2 generated)
    entries   [n+1] int64   sample i's activations are rows entries[i]:entries[i+1] (sorted by layer, position)
    positions [n+1] int64   sample i's tags are tag[positions[i]:positions[i+1]]; position p is the p-th
                            non-padding token of its sequence (prompt, then generated tokens)

and, as safetensors metadata, the sample ids and their responses.jsonl lines. The shard is the record of
a sample: it is written (temp file + rename) before the sample's line goes into responses.jsonl, and
`repair` restores any line a kill cut off, so a resumed run neither loses nor repeats a sample.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from llava_circuits.features.config import TAGS

FORMAT = "llava-circuits sparse features v1"
SHARD = re.compile(r"^acts-r(\d+)-(\d+)\.safetensors$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SampleActs:
    """One sample's non-zero feature activations."""

    id: str
    tags: Tensor  # [n_pos] uint8: TAGS index of each position
    layer: Tensor  # [m] int16
    position: Tensor  # [m] int32, into tags
    feature: Tensor  # [m] int32
    value: Tensor  # [m] float

    def positions(self, tags: list[str]) -> Tensor:
        """[n_pos] bool: the positions with one of `tags` ("prompt_last": the last prompt position)."""
        keep = torch.isin(self.tags, torch.tensor([TAGS.index(t) for t in tags if t in TAGS], dtype=self.tags.dtype))
        if "prompt_last" in tags:
            prompt = (self.tags == TAGS.index("prompt")).nonzero()
            if len(prompt):
                keep[prompt[-1, 0]] = True
        return keep

    def at(self, tags: list[str]) -> SampleActs:
        """Only the activations at positions with one of `tags`."""
        keep = self.positions(tags)[self.position.long()]
        return SampleActs(self.id, self.tags, self.layer[keep], self.position[keep], self.feature[keep], self.value[keep])

    def n_positions(self, tags: list[str]) -> int:
        return int(self.positions(tags).sum())

    def dense(self, layer: int, n_features: int) -> Tensor:
        """[n_pos, n_features] activations of one layer."""
        out = torch.zeros(len(self.tags), n_features, dtype=torch.float32)
        rows = self.layer == layer
        out[self.position[rows].long(), self.feature[rows].long()] = self.value[rows].float()
        return out


def acts_dir(run: str | Path) -> Path:
    return Path(run) / "acts"


def shards(run: str | Path) -> list[Path]:
    """Every finished shard of a run, in (rank, index) order."""
    folder = acts_dir(run)
    found = [p for p in folder.glob("acts-r*.safetensors") if SHARD.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: tuple(int(g) for g in SHARD.match(p.name).groups()))


def write_shard(run: str | Path, rank: int, samples: list[SampleActs], records: list[dict],
                value_dtype: str = "float32", info: dict | None = None) -> Path:
    """Write one shard atomically and return its path (the next free index of this rank)."""
    folder = acts_dir(run)
    folder.mkdir(parents=True, exist_ok=True)
    taken = [int(SHARD.match(p.name).group(2)) for p in shards(run) if int(SHARD.match(p.name).group(1)) == rank]
    target = folder / f"acts-r{rank}-{max(taken, default=-1) + 1:06d}.safetensors"
    cat = lambda parts, dtype: torch.cat([p.to(dtype) for p in parts]) if parts else torch.zeros(0, dtype=dtype)
    tensors = {
        "layer": cat([s.layer for s in samples], torch.int16),
        "position": cat([s.position for s in samples], torch.int32),
        "feature": cat([s.feature for s in samples], torch.int32),
        "value": cat([s.value for s in samples], DTYPES[value_dtype]),
        "tag": cat([s.tags for s in samples], torch.uint8),
        "entries": torch.tensor([0] + [len(s.layer) for s in samples]).cumsum(0),
        "positions": torch.tensor([0] + [len(s.tags) for s in samples]).cumsum(0),
    }
    meta = {"format": FORMAT, "ids": json.dumps([s.id for s in samples]),
            "responses": json.dumps(records, ensure_ascii=False), "info": json.dumps(info or {})}
    tmp = folder / f".{target.name}.tmp-{os.getpid()}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # on disk before the name says it is done: resume trusts every named shard
    finally:
        os.close(fd)
    tmp.replace(target)
    return target


def read_meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a feature shard of this format ({meta.get('format')!r} != {FORMAT!r})")
    return {"ids": json.loads(meta["ids"]), "responses": json.loads(meta["responses"]), "info": json.loads(meta["info"])}


def read_shard(path: Path) -> Iterator[SampleActs]:
    ids = read_meta(path)["ids"]
    t = load_file(str(path))
    e, p = t["entries"].tolist(), t["positions"].tolist()
    for i, sample_id in enumerate(ids):
        rows = slice(e[i], e[i + 1])
        yield SampleActs(sample_id, t["tag"][p[i] : p[i + 1]], t["layer"][rows], t["position"][rows],
                         t["feature"][rows], t["value"][rows])


def iter_samples(run: str | Path, ids: set[str] | None = None) -> Iterator[SampleActs]:
    """Every captured sample once (the first copy if a sample was ever written twice), optionally only `ids`."""
    seen: set[str] = set()
    for path in shards(run):
        for sample in read_shard(path):
            if sample.id in seen or (ids is not None and sample.id not in ids):
                continue
            seen.add(sample.id)
            yield sample


def captured_ids(run: str | Path) -> list[str]:
    """Sample ids in shard order, with repeats if any (a correct run has none)."""
    return [i for path in shards(run) for i in read_meta(path)["ids"]]


def repair(run: str | Path, log) -> int:
    """Drop temp files a kill left behind and re-append responses a kill cut off; returns the lines restored."""
    folder = acts_dir(run)
    if folder.is_dir():
        for tmp in folder.glob(".acts-*.tmp-*"):
            tmp.unlink(missing_ok=True)
    log.end_cut_line("responses")
    have = set(log.read("responses"))
    restored = 0
    for path in shards(run):
        for record in read_meta(path)["responses"]:
            if str(record["id"]) not in have:
                log.append("responses", record)
                have.add(str(record["id"]))
                restored += 1
    return restored
