"""Who am I in the job: rank and world size from ``torch.distributed``, or a single process.

Under ``torchrun --nproc-per-node K`` the environment carries ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init` starts the process group
from it (``nccl`` when CUDA is available, ``gloo`` otherwise) unless the caller already did.
Without those variables (a plain ``python`` or ``diffusolve`` run) the context is rank 0 of
a world of 1 and every collective is the identity, so the same code runs both ways.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DistContext", "init", "current"]


@dataclass(frozen=True)
class DistContext:
    """Rank ``rank`` of ``world`` processes.

    Attributes:
        rank: this process's rank, ``0 <= rank < world``.
        world: the number of processes (1 without ``torch.distributed``).
        backend: ``"gloo"``, ``"nccl"`` or ``None`` (world of 1, no process group).
        local_rank: the rank on this machine (``LOCAL_RANK``), which picks the GPU.

    Example:
        >>> ctx = DistContext()
        >>> (ctx.rank, ctx.world, ctx.is_main, ctx.owner(5))
        (0, 1, True, 0)
        >>> DistContext(rank=1, world=2, backend="gloo").owner(5)
        1
    """

    rank: int = 0
    world: int = 1
    backend: str | None = None
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"need 0 <= rank < world, got rank {self.rank}, world {self.world}")
        if self.world > 1 and self.backend is None:
            raise ValueError("a world of more than one process needs a backend (gloo or nccl)")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes manifests and merged records."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where collective tensors live: this rank's GPU under NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def owner(self, index: int) -> int:
        """The rank that owns item ``index`` (round-robin: ``index % world``)."""
        return int(index) % self.world

    def owns(self, index: int) -> bool:
        """Whether this rank owns item ``index``."""
        return self.owner(index) == self.rank

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a world of 1)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``tensor`` (a new tensor on ``tensor``'s device and dtype)."""
        if self.world == 1:
            return tensor.clone()
        import torch.distributed as dist

        buf = tensor.detach().to(self.device).clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(tensor.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def current() -> DistContext:
    """The context of the running process group, or rank 0 of 1 when none is initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        backend=str(dist.get_backend()),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init(backend: str | None = None) -> DistContext:
    """Start the process group from torchrun's environment if there is one, and return the
    context.

    ``backend`` defaults to ``nccl`` when CUDA is available and ``gloo`` otherwise. With
    ``WORLD_SIZE`` unset or 1 nothing is started (rank 0 of 1). A group the caller already
    initialised is used as it is.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return current()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError(
            f"WORLD_SIZE={world} but this torch build has no torch.distributed; run one process"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return current()
