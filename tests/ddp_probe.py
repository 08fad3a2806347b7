"""`cmda train` under torchrun, recording each rank's student weights after the first optimiser step
(and, with ``CMDA_DDP_SIGTERM_RANK=r``, sending SIGTERM to rank r alone during iteration 2).

With the peer components on, it also writes a digest of their state (tail bank, instance bank,
discriminator + optimiser) after the first iteration to ``rank<RANK>_peers.txt``.

Used by tests/test_end_to_end.py::test_torchrun_ddp_on_cpu: the EMA update of iteration 1 receives
the student right after step 1, on every rank; this writes a SHA-256 of its parameters to
``$CMDA_DDP_PROBE/rank<RANK>.txt``. Ranks draw different batches (seed + 1000 * rank), so equal
digests mean the gradients really were averaged across ranks (DistributedDataParallel at work).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from train.engine import loop as engine_loop
from train.uda import step as step_module

_real_ema_update = step_module.ema_update


def _probe(teacher, student, alpha) -> None:
    if os.environ.get("CMDA_DDP_SIGTERM_RANK") == os.environ.get("RANK", "0"):
        import signal

        os.environ.pop("CMDA_DDP_SIGTERM_RANK")
        signal.raise_signal(signal.SIGTERM)  # this rank alone is asked to stop, during iteration 2
    if not getattr(_probe, "done", False):
        _probe.done = True
        digest = hashlib.sha256()
        for p in student.parameters():
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        out = Path(os.environ["CMDA_DDP_PROBE"])
        (out / f"rank{os.environ.get('RANK', '0')}.txt").write_text(digest.hexdigest())
    _real_ema_update(teacher, student, alpha)


step_module.ema_update = _probe

_real_iteration = engine_loop.iteration


def _probe_peers(cfg, method, *args, **kw):
    """After the first iteration's component updates: a digest of every component's state per rank."""
    extra = _real_iteration(cfg, method, *args, **kw)
    if not getattr(_probe_peers, "done", False):
        _probe_peers.done = True
        digest = hashlib.sha256()
        states = {p.state_key: p.state_dict() for p in method.stateful()}
        for key, state in sorted(states.items()):
            digest.update(key.encode())
            for t in _tensors(state):
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        out = Path(os.environ["CMDA_DDP_PROBE"])
        (out / f"rank{os.environ.get('RANK', '0')}_peers.txt").write_text(digest.hexdigest())
    return extra


def _tensors(obj):
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k])
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "detach"):
        yield obj


engine_loop.iteration = _probe_peers

if __name__ == "__main__":
    from cli import app

    sys.exit(app(sys.argv[1:]))
