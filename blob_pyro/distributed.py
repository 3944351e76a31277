"""Data-parallel SVI on ``torch.distributed``: K processes at per-process batch b take exactly the steps
of one process at batch K*b.

Launch with ``torchrun --nproc_per_node K -m blob_pyro.train ...`` or ``accelerate launch`` (both set
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); backend gloo on CPU, NCCL
on CUDA (each process uses ``cuda:LOCAL_RANK``). ``--batch-size`` is per process, as in the official
code (accelerate): the global batch is ``K * --batch-size``.

Per global step (:meth:`DataParallel.step`):

1. Every process builds the same global batch of n = K*b examples (same data seed) and keeps the
   contiguous shard ``[start, stop)`` of :func:`shard_bounds` (n_r examples; sizes differ by at most
   one when an epoch's last batch is short).
2. Rank 0's torch random state (CPU, and the current CUDA device's) is broadcast, so the guide draws the
   same A on every process: one posterior draw per global step, the draw a single process would make.
3. Flipout signs are drawn for the whole global batch and sliced to the shard
   (:func:`blob_pyro.models.flipout_signs.global_batch_rows`): the signs of the one-process run.
4. The objective computes its loss on the shard. ELBO: ``(N / n_r) NLL_r + w KL`` (the data plate
   scales by the shard size). Parity: the shard-mean NLL.
5. Before any optimiser step the gradients of every trainable parameter (guide parameters and the
   deterministic B) become ``sum_r (n_r / n) g_r`` (one all-reduce). For the ELBO that is the gradient
   of ``(N / n) sum_i NLL_i + w KL``: the global-batch ELBO (BLoB eq. 9 with the data plate's N / n,
   n the GLOBAL batch) with the KL counted once. For parity it is the gradient of the global-batch mean
   NLL; the second (KL) step's closed-form gradient is identical on every process and is not reduced.
   Gradient clipping then sees the global gradient.

Logged ``loss`` and ``nll`` are the same weighted sums (the global-batch values). BLoB's dataset
rescaling uses the process count, M = int(100 N^(pi/gamma) / P / b) (``build_objective(processes=P)``).
Only rank 0 writes files and evaluates (the other processes stop after training).
"""

from __future__ import annotations

import atexit
import functools
import os
from dataclasses import dataclass, field
from datetime import timedelta

import pyro
import torch
import torch.distributed as dist

from blob_pyro.models.flipout_signs import global_batch_rows

__all__ = ["DataParallel", "environment_world_size", "shard_bounds", "shard_batch", "check_divisible_epochs"]

#: Statistics of a step that are per-process averages over the shard; reduced with the shard weights.
SHARD_STATISTICS = ("loss", "nll")


def environment_world_size() -> int:
    """The number of processes: of the initialised process group, else ``WORLD_SIZE`` (1 when unset)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def shard_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of process ``rank``'s contiguous shard of ``total`` examples; the first
    ``total % world_size`` shards hold one example more (``torch.tensor_split``'s rule)."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard_batch(batch: dict, start: int, stop: int) -> dict:
    """Examples ``[start, stop)`` of a padded ``batch``. Every tensor's leading dimension holds the n
    examples, or a whole number of rows per example in example-major order (``choice_layout=separate``:
    n * K rows); widths are kept, so each row is padded exactly as in the global batch."""
    total = len(batch["labels"])
    shard = {}
    for key, value in batch.items():
        rows = value.shape[0]
        if rows % total:
            raise ValueError(
                f"cannot shard batch entry {key!r}: {rows} rows for {total} examples; expected a whole number of rows per example"
            )
        per_example = rows // total
        shard[key] = value[start * per_example : stop * per_example]
    return shard


def check_divisible_epochs(num_data: int, global_batch: int, world_size: int) -> None:
    """Every process needs at least one example of every global batch: an epoch's last batch of
    ``num_data % global_batch`` examples must then be empty or hold at least ``world_size``."""
    last = num_data % global_batch
    if 0 < last < world_size:
        raise ValueError(
            f"the last batch of each epoch holds {last} of {num_data} training examples, fewer than the "
            f"{world_size} processes: choose --num-train or --batch-size so that num_train % (processes * "
            "batch_size) is 0 or at least the number of processes"
        )


@dataclass
class DataParallel:
    """This process's place in a data-parallel run (``world_size == 1``: a plain single-process run).

    :param rank: global rank. :param world_size: number of processes K. :param local_rank: rank on this
    machine (the CUDA device index). :param comm_device: device of the tensors sent through collectives
    (CPU for gloo, ``cuda:LOCAL_RANK`` for NCCL).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    comm_device: torch.device = torch.device("cpu")
    _weight: float = field(default=1.0, init=False, repr=False)  # n_r / n of the current step

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and evaluates."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device: str = "auto", *, timeout_minutes: float = 60.0) -> "DataParallel":
        """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, accelerate launch) and join the process
        group (``env://``), unless one is already initialised; single process when ``WORLD_SIZE`` is unset or 1.

        Backend: NCCL when the run uses CUDA (``device`` ``auto`` with CUDA available, or ``cuda``), gloo
        otherwise. ``timeout_minutes`` bounds how long a process waits at a collective, e.g. the other processes for
        rank 0's zero-shot and final evaluation (``--dist-timeout-minutes``).
        """
        world_size = environment_world_size()
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
        if world_size <= 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if device.startswith("cuda:"):
            raise ValueError(
                f"--device {device} names one GPU, but under torchrun each of the {world_size} processes uses "
                "cuda:LOCAL_RANK; pass --device cuda or auto"
            )
        if cuda:
            torch.cuda.set_device(local_rank)  # "cuda" below means this process's GPU
        if not dist.is_initialized():
            if not dist.is_available():
                raise RuntimeError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed")
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
            atexit.register(_destroy)
        comm_device = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, comm_device=comm_device)

    # --- one step -----------------------------------------------------------------------------------

    def attach(self, objective) -> None:
        """Make ``objective`` combine its gradients across processes before every optimiser step."""
        from blob_pyro.objectives import ELBOObjective, ParityObjective

        if isinstance(objective, ELBOObjective):  # Pyro's SVI hands the optimiser a set: order by name
            objective.optim.gradient_reducer = functools.partial(self.reduce_gradients, order_by_name=True)
        elif isinstance(objective, ParityObjective):  # its optimisers' parameter lists have a fixed order
            objective.gradient_reducer = self.reduce_gradients
        else:
            raise TypeError(
                f"data-parallel training supports ELBOObjective and ParityObjective, got {type(objective).__name__}; "
                "run it in one process"
            )

    def step(self, objective, batch: dict, step: int) -> dict:
        """One step of ``objective`` on the global ``batch`` (every process passes the same one); this
        process computes on its shard. ``objective`` must be :meth:`attach` ed. Returns the step's
        statistics for the global batch. A single process just calls ``objective.step(batch, step)``."""
        if not self.active:
            return objective.step(batch, step)
        total = len(batch["labels"])
        start, stop = shard_bounds(total, self.rank, self.world_size)
        if start == stop:
            raise ValueError(f"a global batch of {total} examples leaves process {self.rank} of {self.world_size} without any")
        shard = shard_batch(batch, start, stop)
        self._weight = (stop - start) / total
        self.synchronise_random_state()
        with global_batch_rows(start, stop, total):
            stats = objective.step(shard, step)
        values = torch.tensor([float(stats[k]) * self._weight for k in SHARD_STATISTICS if k in stats],
                              dtype=torch.float64, device=self.comm_device)
        if values.numel():
            dist.all_reduce(values)
            reduced = iter(values.tolist())
            stats = {**stats, **{k: next(reduced) for k in SHARD_STATISTICS if k in stats}}
        return stats

    def synchronise_random_state(self) -> None:
        """Give every process rank 0's torch random state (CPU and the current CUDA device)."""
        states = [torch.get_rng_state()]
        if self.comm_device.type == "cuda":
            states.append(torch.cuda.get_rng_state())
        for i, state in enumerate(states):
            buffer = state.to(self.comm_device)
            dist.broadcast(buffer, src=0)
            if i == 0:
                torch.set_rng_state(buffer.cpu())
            else:
                torch.cuda.set_rng_state(buffer.cpu())

    def reduce_gradients(self, params: list, *, order_by_name: bool = False) -> list:
        """Replace every gradient by ``sum_r w_r g_r`` (``w_r = n_r / n``) across processes, in place.

        The all-reduce pairs tensors by position, so the order must be the same on every process: the
        given order, or with ``order_by_name`` (Pyro's SVI passes a set) the order of the Pyro
        parameter-store names. Returns the parameters with a gradient, in that order. One all-reduce per
        (dtype, device) group of flattened gradients.
        """
        params = [p for p in params if p.grad is not None]
        if order_by_name:
            store = pyro.get_param_store()
            named = [(store.param_name(p), p) for p in params]
            unnamed = [tuple(p.shape) for name, p in named if name is None]
            if unnamed:
                raise RuntimeError(
                    f"{len(unnamed)} trained tensors (shapes {unnamed[:3]}) are not in Pyro's parameter store, so "
                    "their order cannot be agreed across processes; register them with pyro.param or a PyroModule"
                )
            params = [p for _, p in sorted(named, key=lambda pair: pair[0])]
        groups: dict[tuple, list] = {}
        for p in params:
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
        for group in groups.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group]).mul_(self._weight)
            moved = flat.to(self.comm_device)
            dist.all_reduce(moved)
            flat = moved.to(flat.device)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n
        return params

    def agree_to_stop(self, stop) -> bool:
        """Whether any process has received a stop signal (``stop.signum`` set, blob_pyro.interrupt): then
        all stop after the same step, and rank 0 writes the checkpoint. One small all-reduce per step."""
        flag = stop.signum is not None
        if not self.active:
            return flag
        value = torch.tensor([float(flag)], device=self.comm_device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def wait_for_main(self, *, failed: bool = False) -> bool:
        """Block every process until all reach this point, e.g. until rank 0 has written the checkpoint of
        an interrupted run: a process that left earlier could be relaunched (``--resume``) before the
        checkpoint exists, or make the launcher stop rank 0 in the middle of writing it. Returns whether
        any process passed ``failed=True`` (e.g. rank 0's write raised), so that all can raise together.
        Alone: returns ``failed``."""
        if not self.active:
            return failed
        value = torch.tensor([float(failed)], device=self.comm_device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())  # .item() waits for the result: NCCL's all_reduce only queues it

    # --- checks -------------------------------------------------------------------------------------

    def broadcast_parameters(self, tensors: list) -> None:
        """Copy rank 0's values of ``tensors`` (e.g. the freshly initialised trainable parameters) to
        every process, as DistributedDataParallel does at construction."""
        with torch.no_grad():
            for t in tensors:
                buffer = t.detach().to(self.comm_device).clone()
                dist.broadcast(buffer, src=0)
                t.copy_(buffer.to(t.device))

    def max_parameter_difference(self) -> float:
        """Largest absolute difference between this process's Pyro parameters (every trained tensor:
        guide parameters, B) and rank 0's, maximised over processes (0.0 when they stayed in step)."""
        worst = torch.zeros((), dtype=torch.float64, device=self.comm_device)
        store = pyro.get_param_store()
        for _, t in sorted(store.named_parameters()):
            mine = t.detach().to(self.comm_device, torch.float64)
            reference = mine.clone()
            dist.broadcast(reference, src=0)
            worst = torch.maximum(worst, (mine - reference).abs().max() if mine.numel() else worst)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return float(worst)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
