"""torch.distributed plumbing for ``torchrun`` (gloo on CPU, nccl on GPU); a no-op in one process."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os

import torch
import torch.distributed as dist

from rdcd.errors import RdcdError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DistContext:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, device: str = "auto") -> "DistContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RdcdError("--device cuda: no CUDA device is available here (use --device cpu)")
            index = local_rank if world > 1 else (torch.device(device).index or 0)
            dev = torch.device("cuda", index)
            torch.cuda.set_device(dev)
        elif device == "cpu":
            dev = torch.device("cpu")
        else:
            raise RdcdError(f"unknown --device {device!r}: use auto, cpu, cuda or cuda:N")
        ctx = cls(world, rank, local_rank, dev, None)
        if world > 1:
            ctx.backend = "nccl" if dev.type == "cuda" else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(ctx.backend, timeout=datetime.timedelta(minutes=60),
                                        **({"device_id": dev} if dev.type == "cuda" else {}))
        return ctx

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ collectives
    @torch.no_grad()
    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate ``t`` from every rank along dim 0 (no gradient); same shape on every rank."""
        if self.world == 1:
            return t
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return torch.cat(out)

    def gather_with_grad(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate from every rank, keeping the gradient path to every rank's rows."""
        if self.world == 1:
            return t
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(t.contiguous()))

    @torch.no_grad()
    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast_object(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out
