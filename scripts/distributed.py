"""Data-parallel training over torchrun (configs/multi_gpu_train.yaml): process group, rank-0-only work,
and gradient averaging.

DSAN runs E four times and every discriminator twice per iteration, through sub-module calls
(``segmenter.encoder``, ``segmenter.classify``) and with the discriminators frozen for the generator step.
DistributedDataParallel synchronises gradients only for parameters used through its wrapper's single
``forward`` and expects each to be ready once per backward, so the trainer instead averages every
optimiser's gradients across ranks itself, in one flattened all-reduce per optimiser step: the same
result as DistributedDataParallel's, without its one-forward restriction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def init_process_group() -> int:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) and pin this rank's GPU; return the rank."""
    if not is_distributed():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    return dist.get_rank()


def rank_device() -> torch.device:
    """This rank's device: its own GPU under torchrun on CUDA, else the CPU."""
    return torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")


def on_rank_zero_first(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 while the other ranks wait (e.g. generating a dataset into a shared folder)."""
    result = fn() if rank() == 0 else None
    if is_distributed():
        dist.barrier()
    return result


def rank_zero_only(items: list) -> list:
    """``items`` on rank 0, nothing on the other ranks (validation, saving, logging handlers)."""
    return items if rank() == 0 else []


def broadcast_from_rank_zero(modules: Iterable[nn.Module], buffers_only: bool = False) -> None:
    """Give every rank rank 0's parameters and buffers (or only the buffers, e.g. batch-norm statistics,
    as DistributedDataParallel does before each forward), so the ranks stay in step."""
    if not is_distributed():
        return
    for module in modules:
        tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Replace each gradient by its mean over the ranks (one all-reduce per dtype and device)."""
    if not is_distributed():
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    world = dist.get_world_size()
    for grads in groups.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= world
        for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(averaged)
