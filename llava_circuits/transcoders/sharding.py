"""Layer-sharded training: each rank owns a subset of the layers' transcoders.

Every rank runs the frozen model on its own rows of the global batch and captures `mlp.in` and
`mlp.out` of every chosen layer. `send_to_owners` then hands each layer's activations to the rank that
owns the layer (one `gather` per rank), so each rank trains its layers on the global batch. Gradients
never cross ranks, so the LightningModule is not wrapped in DistributedDataParallel
(`LayerShardedStrategy`, registered as `--trainer.strategy layer_sharded`).

Checkpoints stay one file: `collect_on_rank0` streams every rank's tensors to rank 0 (point to point,
one tensor at a time), and on resume each rank keeps its own layers' entries.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor


class LayerShardedStrategy(DDPStrategy):
    """DDP process group and launcher, without the DDP wrapper: every rank trains its own layers."""

    strategy_name = "layer_sharded"

    def setup(self, trainer) -> None:
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)


if "layer_sharded" not in StrategyRegistry:
    StrategyRegistry.register(
        "layer_sharded", LayerShardedStrategy, description="each rank trains the transcoders of its own layers",
        start_method="popen",
    )


def owned_layers(layers: list[int], rank: int, world: int) -> list[int]:
    """The layers rank `rank` of `world` trains: every world-th layer, starting at its rank."""
    if world > len(layers):
        raise ValueError(f"layer sharding needs at most one rank per layer: {world} ranks for {len(layers)} layers")
    return sorted(layers)[rank::world]


def send_to_owners(parts: dict[int, Tensor], extra: Tensor, layers: list[int]) -> tuple[dict[int, Tensor], Tensor]:
    """Give each layer's rows to its owner: parts layer -> [n_local, c] (same c for all), extra [n_local, e].

    Returns this rank's layers -> [n_global, c] and extra rows [n_global, e], rows ordered by rank.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    n_local = torch.tensor([extra.shape[0]], device=extra.device)
    counts = [torch.zeros_like(n_local) for _ in range(world)]
    dist.all_gather(counts, n_local)
    counts = [int(c) for c in counts]
    n_max = max(counts)
    received: dict[int, Tensor] = {}
    extras = None
    for owner in range(world):
        mine = owned_layers(layers, owner, world)
        pack = torch.cat([extra.to(parts[mine[0]].dtype)] + [parts[l] for l in mine], dim=1)  # [n_local, e + m*c]
        pack = torch.nn.functional.pad(pack, (0, 0, 0, n_max - pack.shape[0]))
        bufs = [torch.empty_like(pack) for _ in range(world)] if owner == rank else None
        dist.gather(pack, bufs, dst=owner)
        if owner == rank:
            rows = torch.cat([b[:c] for b, c in zip(bufs, counts)])  # [n_global, e + m*c]
            e, c = extra.shape[1], parts[mine[0]].shape[1]
            extras = rows[:, :e].to(extra.dtype)
            for i, l in enumerate(mine):
                received[l] = rows[:, e + i * c : e + (i + 1) * c]
    return received, extras


def gather_rows(t: Tensor) -> Tensor:
    """Every rank's rows of t [n_rank, ...] (n may differ between ranks), concatenated in rank order."""
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    n_max = int(max(counts))
    padded = torch.cat([t, t.new_zeros(n_max - t.shape[0], *t.shape[1:])])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts)])


def collect_on_rank0(local: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Every rank's named tensors, on rank 0 (on the CPU); other ranks get {}. Names must not collide."""
    rank, world = dist.get_rank(), dist.get_world_size()
    metas: list = [None] * world
    dist.all_gather_object(metas, [(name, tuple(t.shape), t.dtype) for name, t in local.items()])
    out: dict[str, Tensor] = {}
    for src, meta in enumerate(metas):
        for name, shape, dtype in meta:
            if src == rank == 0:
                out[name] = local[name].detach().cpu()
            elif src == rank:
                dist.send(local[name].detach().to(device).contiguous(), dst=0)
            elif rank == 0:
                buf = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(buf, src=src)
                out[name] = buf.cpu()
    return out
