"""The training batches through a DataLoader, with input errors carried back from the workers as data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.errors import InputError
from train.engine.signals import worker_init


@dataclass(frozen=True)
class WorkerFailure:
    """An InputError/OSError raised inside a loader worker, carried back as data: the DataLoader
    would re-raise it as ``RuntimeError: Caught InputError in DataLoader worker`` (a traceback)."""

    path: str | None
    problem: str


class ReportingBatches(torch.utils.data.Dataset):
    """The run's batches (:class:`train.data.batches.PairedBatches` or SemanticBatches) whose input errors come
    back as :class:`WorkerFailure` items."""

    def __init__(self, batches: Dataset) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, it: int) -> dict[str, torch.Tensor] | WorkerFailure:
        try:
            return self.batches[it]
        except InputError as exc:
            return WorkerFailure(None if exc.path is None else str(exc.path), exc.problem)
        except OSError as exc:
            return WorkerFailure(exc.filename and str(exc.filename), exc.strerror or str(exc))


def checked(batch: dict[str, torch.Tensor] | WorkerFailure) -> dict[str, torch.Tensor]:
    if isinstance(batch, WorkerFailure):
        raise InputError(batch.path, batch.problem)
    return batch


def shut_down(batches: object) -> None:
    """Stop a DataLoader iterator's worker processes now, whatever ended the loop.

    Workers ignore SIGTERM (see :func:`train.engine.signals.worker_init`), so if an error left the
    iterator alive until interpreter exit, multiprocessing's exit handler would SIGTERM them (ignored)
    and wait for them forever: the process would hang after printing its error.
    """
    stop = getattr(batches, "_shutdown_workers", None)
    if stop is not None:
        stop()


def batch_loader(batches: Dataset, start: int, iters: int, workers: int, pin_memory: bool) -> DataLoader:
    """Iterations ``start`` .. ``iters``, one whole batch per item (randomness is a function of the iteration)."""
    return DataLoader(ReportingBatches(batches), batch_size=None, sampler=range(start, iters), num_workers=workers,
                      pin_memory=pin_memory, worker_init_fn=worker_init, prefetch_factor=2 if workers else None)
