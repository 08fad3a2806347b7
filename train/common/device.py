"""Devices: the one reading of a ``--device`` option, and mixed precision where it applies.

Pure syntax first (:func:`parse_device`, no torch query), so options are checked where they are
parsed; whether CUDA is present is :func:`resolve_device`'s question.
"""

from __future__ import annotations

import contextlib
import re

import torch

from pipeline.errors import InputError

_DEVICE = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")


def parse_device(spec: str) -> tuple[str, int | None]:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> (kind, index or None); anything else is an InputError.

    Pure syntax (no torch, no CUDA query), so options are checked where they are parsed; whether
    CUDA is present is :func:`train.common.device.resolve_device`'s question.
    """
    m = _DEVICE.fullmatch(str(spec).strip())
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise InputError(None, f"run.device: unknown device {spec!r} (use auto, cpu, cuda or cuda:N)")
    return m.group(1), None if m.group(2) is None else int(m.group(2))


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA; CPU runs in fp32 (CPU bf16 is slow and not what users train with)."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(device: str, local_rank: int = 0, cuda_available: bool | None = None) -> torch.device:
    """The one reading of a device option, for train, evaluate, predict alike.

    'auto' -> ``cuda:<local_rank>`` when CUDA is available, else cpu; 'cuda' -> ``cuda:<local_rank>``
    (an index is needed by ``torch.cuda.set_device``; under torchrun each process takes its own GPU);
    'cuda:N' as given; 'cpu'. CUDA asked for where there is none, or any other name, is an InputError.
    """
    kind, index = parse_device(device)
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if kind == "cpu" or (kind == "auto" and not available):
        return torch.device("cpu")
    if not available:
        raise InputError(None, f"device {device!r} requested but CUDA is not available on this machine "
                         "(use --device cpu or auto)")
    return torch.device("cuda", local_rank if index is None else index)


