"""Run independent pipeline tasks in parallel with dask, locally or on a dask.distributed cluster.

Every per-frame or per-file job in the pipeline is a list of zero-argument callables that write
their own results (atomically) and return something small. Locally they run on dask's threaded
scheduler (the kernels release the GIL: Numba ``nogil``, OpenCV, Blosc); with ``scheduler`` set
they are submitted to an existing dask.distributed cluster, whose workers must see the same paths
(a shared filesystem). A tqdm bar counts finished tasks either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def default_workers() -> int:
    """One thread per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def run_tasks(
    tasks: Sequence[Callable[[], T]],
    *,
    desc: str,
    scheduler: str | None = None,
    workers: int = 0,
    unit: str = "task",
    weights: Sequence[int] | None = None,
    on_done: Callable[[int, T], None] | None = None,
) -> list[T]:
    """Run ``tasks`` and return their results in order.

    ``weights`` (e.g. frames per task) scale the progress bar; ``on_done(i, result)`` is called in
    the calling thread as each task finishes, in completion order (used to record progress).
    """
    n = len(tasks)
    results: list[Any] = [None] * n
    if n == 0:
        return []
    weights = list(weights) if weights is not None else [1] * n
    bar = tqdm(total=sum(weights), desc=desc, unit=unit, dynamic_ncols=True, disable=None)
    try:
        if scheduler:
            _run_distributed(tasks, scheduler, results, bar, weights, on_done)
        else:
            _run_threads(tasks, workers or default_workers(), results, bar, weights, on_done)
    finally:
        bar.close()
    return results


def _run_threads(tasks, workers, results, bar, weights, on_done) -> None:
    # dask's threaded scheduler on a plain task graph: dask.delayed + dask.compute would add
    # ~5 ms of graph optimisation before the first task, a tenth of a small sequence's runtime.
    from dask.callbacks import Callback
    from dask.threaded import get

    keys = {f"cmda-task-{i}": i for i in range(len(tasks))}

    def posttask(key, result, dsk, state, worker_id) -> None:  # runs in the scheduling thread
        i = keys.get(key)
        if i is None:
            return
        results[i] = result
        if on_done is not None:
            on_done(i, result)
        bar.update(weights[i])

    graph = {k: (task,) for k, task in zip(keys, tasks, strict=True)}
    # Our own pool, shut down with wait=True: when one task fails, the tasks already running finish
    # (and finish their atomic writes) before the error propagates, so no temp file is left behind.
    with ThreadPoolExecutor(workers) as pool, Callback(posttask=posttask):
        get(graph, list(keys), num_workers=workers, pool=pool)


def _run_distributed(tasks, address, results, bar, weights, on_done) -> None:
    from distributed import Client, as_completed

    with Client(address, set_as_default=False) as client:
        futures = [client.submit(task, pure=False) for task in tasks]
        index = {f.key: i for i, f in enumerate(futures)}
        for fut in as_completed(futures, loop=client.loop):
            i = index[fut.key]
            results[i] = fut.result()
            if on_done is not None:
                on_done(i, results[i])
            bar.update(weights[i])
