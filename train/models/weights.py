"""Loading the official weight files strictly: every key accounted for, or an InputError that names them.

A silent partial load (mmcv's ``strict=False``) is how a b2 file ends up in a b5 model with 34 random
blocks and nobody notices; here any missing key, unknown key or shape mismatch stops the run with a
message listing the offending keys. The only tolerated extras are the ImageNet classifier
``head.weight``/``head.bias`` that every official ``mit_bX.pth`` carries.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import InputError
from train.models.mit import MIT_CONFIGS

MIT_IGNORED_KEYS = frozenset({"head.weight", "head.bias"})
"""ImageNet-1k classifier in the official MiT files: expected there, not part of the encoder."""

_LIST_MAX = 10


def key_listing(keys: Iterable[str], limit: int = _LIST_MAX) -> str:
    """``[a, b, ... (N more)]``: the first ``limit`` keys of an error message's list."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"[{shown}{more}]"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` state dict on the CPU; unwraps ``{'state_dict': ...}`` / ``{'model': ...}`` and ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "weight file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors all mean "not a usable weight file"
        raise InputError(path, f"cannot read as a PyTorch weight file ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise InputError(path, "does not hold a state dict (a non-empty mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(path, f"{len(bad)} entries are not tensors: {key_listing(map(str, bad))}")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def mismatches(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], ignored: Iterable[str] = ()
) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, 'key: file shape vs model shape' lines) of ``state`` against ``expected``."""
    ignored = set(ignored)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and k not in ignored]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    return missing, unexpected, shapes


def guess_mit_variant(state: Mapping[str, torch.Tensor]) -> str | None:
    """Name the MiT variant whose depths and widths a state dict has (None if it matches none)."""
    depths = []
    for s in range(1, 5):
        idx = {int(m.group(1)) for k in state if (m := re.match(rf"block{s}\.(\d+)\.", k))}
        depths.append(max(idx) + 1 if idx else 0)
    widths = tuple(int(state[f"norm{s}.weight"].shape[0]) if f"norm{s}.weight" in state else 0 for s in range(1, 5))
    for name, cfg in MIT_CONFIGS.items():
        if tuple(depths) == cfg.depths and widths == cfg.embed_dims:
            return name
    return None


def check_state_dict(
    path: str | Path,
    state: Mapping[str, torch.Tensor],
    model: nn.Module,
    what: str,
    ignored: Iterable[str] = (),
    hint: str = "",
) -> None:
    """Raise InputError listing missing / unexpected / mis-shaped keys of ``state`` for ``model``."""
    missing, unexpected, shapes = mismatches(state, model.state_dict(), ignored)
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches {key_listing(shapes)}")
    if missing:
        parts.append(f"{len(missing)} missing keys {key_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys {key_listing(unexpected)}")
    raise InputError(path, f"does not fit {what}{hint}: " + "; ".join(parts))


def load_mit_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load an official ImageNet ``mit_bX.pth`` into a :class:`MixVisionTransformer`, strictly.

    Only ``head.weight``/``head.bias`` may be extra; anything else that does not fit raises InputError.
    An encoder whose input is not RGB (an event representation of C channels) gets the first convolution's
    RGB filters averaged and repeated to C channels, times 3 / C: an input of C equal channels then starts
    with the response a grey RGB image of that value has (the usual inflation of ImageNet filters).
    """
    state = read_state_dict(path)
    state = inflate_first_conv(state, model)
    name = getattr(getattr(model, "config", None), "name", type(model).__name__)
    guess = guess_mit_variant(state)
    hint = f" (the file looks like {guess})" if guess and guess != name else ""
    check_state_dict(path, state, model, name, MIT_IGNORED_KEYS, hint)
    model.load_state_dict({k: v for k, v in state.items() if k not in MIT_IGNORED_KEYS}, strict=True)


FIRST_CONV = "patch_embed1.proj.weight"


def inflate_first_conv(state: Mapping[str, torch.Tensor], model: nn.Module) -> Mapping[str, torch.Tensor]:
    """``state`` with its 3-channel first convolution fitted to ``model``'s input channels (see
    :func:`load_mit_pretrained`); unchanged when they already agree or the keys are not there."""
    own = model.state_dict().get(FIRST_CONV)
    w = state.get(FIRST_CONV)
    if own is None or w is None or w.ndim != 4 or w.shape[1] != 3 or own.shape[1] == 3 or own.shape[0] != w.shape[0]:
        return state
    c = own.shape[1]
    grey = w.float().mean(dim=1, keepdim=True) * (3.0 / c)
    return {**state, FIRST_CONV: grey.repeat(1, c, 1, 1).to(w.dtype)}
