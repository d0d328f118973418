"""One image on several processes: the denoiser calls of every step shared out over torch.distributed ranks.

Every rank runs the same recipe with the same generators, so the views, dilated samples, jitter, permutations and
noise are drawn identically everywhere. Only the model calls are split: the adapter turns a step's requests into
a deterministic list of calls (same grouping and batches as on one process), rank ``r`` runs calls
``r, r + W, r + 2W, …`` (round robin continued from step to step: call counts differ by at most one), and one
``all_reduce`` per step sums
the predictions, each call's entries being non-zero on its owner only — so every rank holds exactly the
single-process predictions (``x + 0 = x``), assembles the same canvas and takes the same ``scheduler.step``.

Calls whose attention processors draw random numbers (ScaleDiff's NPA query shift) run on every rank, since a
draw skipped on one rank would desynchronise its generators. All ranks decode (the same work at the same time);
only rank 0 writes files. Launch with ``torchrun --nproc_per_node N -m hiresdiff generate … --parallel views`` or
``accelerate launch``; the process group is created from the usual environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) with a timeout, so a rank that dies makes the others stop with an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch

from hiresdiff.errors import HiresError, require

Call = TypeVar("Call")


def owners(count: int, world: int, offset: int) -> list[int]:
    """The rank of each of a step's ``count`` calls: round robin, starting where the previous step stopped (so the
    extra calls of uneven steps rotate over the ranks instead of always landing on rank 0)."""
    return [(offset + k) % world for k in range(count)]


#: seconds a collective may wait for a peer before the run stops with an error (a dead or stuck rank)
DEFAULT_TIMEOUT_S = 600


class Serial:
    """One process: every call runs here."""

    rank, world = 0, 1

    def map(
        self, calls: Sequence[Call], compute: Callable[[Call], torch.Tensor], shape: Callable[[Call], tuple[int, ...]]
    ) -> list[torch.Tensor]:
        return [compute(c) for c in calls]

    def replicated(self) -> Any:
        return nullcontext()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class Replicating:
    """The :meth:`replicated` switch shared by the call distributors (a depth counter, so blocks nest)."""

    _replicate: int = 0

    @contextmanager
    def replicated(self) -> Iterator[None]:
        """Inside the block every rank runs every call (processors that draw random numbers)."""
        self._replicate += 1
        try:
            yield
        finally:
            self._replicate -= 1


@dataclass
class ViewParallel(Replicating):
    """Round-robin split of each step's denoiser calls over the ranks of the default process group."""

    rank: int
    world: int
    #: calls this rank ran, per :meth:`map` (one entry per step): the balance tests read it
    counts: list[int] = field(default_factory=list)
    _offset: int = 0
    _warned: bool = False

    @classmethod
    def from_environment(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> ViewParallel:
        """Join (or create) the default process group from torchrun's environment: gloo on CPU, NCCL on CUDA."""
        import torch.distributed as dist

        require(
            "WORLD_SIZE" in os.environ and "RANK" in os.environ,
            "--parallel views runs under a launcher: torchrun --nproc_per_node N -m hiresdiff generate … (or "
            "accelerate launch)",
        )
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        return cls(dist.get_rank(), dist.get_world_size())

    def map(
        self, calls: Sequence[Call], compute: Callable[[Call], torch.Tensor], shape: Callable[[Call], tuple[int, ...]]
    ) -> list[torch.Tensor]:
        """``compute`` of every call, each run by one rank (all ranks when :meth:`replicated`), summed across."""
        if self._replicate or len(calls) == 0:
            return [compute(c) for c in calls]
        if len(calls) < self.world and not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.world} ranks share {len(calls)} denoiser call(s) in a step: some ranks idle there",
                stacklevel=2,
            )
        owned = [r == self.rank for r in owners(len(calls), self.world, self._offset)]
        self._offset += len(calls)
        self.counts.append(sum(owned))
        outs = [compute(c) if mine else None for c, mine in zip(calls, owned, strict=True)]
        ref = next((o for o in outs if o is not None), None)
        dtype = ref.dtype if ref is not None else torch.float32
        device = ref.device if ref is not None else _device()
        filled = [
            o if o is not None else torch.zeros(shape(c), dtype=dtype, device=device)
            for c, o in zip(calls, outs, strict=True)
        ]
        flat = self.sum_(torch.cat([o.reshape(-1) for o in filled]))
        pieces = flat.split([o.numel() for o in filled])
        return [p.view_as(o) for p, o in zip(pieces, filled, strict=True)]

    def _collective(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a collective; a peer that died or hangs past the timeout becomes one line, not a traceback."""
        try:
            return fn()
        except Exception as exc:  # gloo and NCCL raise several types for a lost peer
            first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise HiresError(f"rank {self.rank}: a peer rank stopped answering during {what} ({first[:160]})") from None

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (a one-line error when a peer does not answer)."""
        import torch.distributed as dist

        self._collective("the all-reduce", lambda: dist.all_reduce(tensor))
        return tensor

    def smallest(self, value: int) -> int:
        """The smallest of every rank's ``value`` (one all-gather)."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        self._collective("the batch-size agreement", lambda: dist.all_gather_object(gathered, int(value)))
        return min(int(v) for v in gathered)

    def check_same_request(self, description: dict[str, Any]) -> None:
        """Every rank must generate the same thing: compare a hash of the request before any model work."""
        import torch.distributed as dist

        digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()
        gathered: list[Any] = [None] * self.world
        self._collective("the settings check", lambda: dist.all_gather_object(gathered, digest))
        differing = [r for r, d in enumerate(gathered) if d != gathered[0]]
        require(
            not differing,
            f"ranks {', '.join(map(str, differing))} were given other settings than rank 0 (prompt, size, seed, "
            "method …); launch every rank with the same arguments",
        )


def rank_device() -> str:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is there, else the CPU."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
