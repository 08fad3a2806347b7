"""The one protocol every optional component of the UDA step implements.

A component is an object with hook methods that :func:`train.uda.step.iteration` calls at fixed points
of one iteration, in the order of the enabled components' list (built once per run by
:func:`train.uda.components.build_components`). Every hook has a do-nothing default here, so a component
overrides only the points it needs; with every component off the list is empty and the iteration is
DACS as CMDA runs it. The hook points, in the order one iteration reaches them:

1. :meth:`start` - the iteration number (forget last iteration's leftovers);
2. :meth:`after_pseudo_labels` - the network inputs, the teacher's output and its pseudo-labels;
3. :meth:`after_mix` - the ClassMix sample (image, events, label, weight, target pixels), returned changed;
4. :meth:`extra_inputs` - inputs of a pass of the component's own, drawn on the full batch;
5. per micro-batch: :meth:`source_terms` and :meth:`mixed_terms` add loss terms before each pass's
   backward; :meth:`extra_pass` runs a pass of its own with its own backward;
6. :meth:`finish` - after the last pass, on the whole batch: bank updates, a second optimiser, metrics.

A component with state across iterations names its checkpoint key in ``state_key`` and implements
:meth:`state_dict` / :meth:`load_state_dict`; the engine saves and restores it under that key.
Randomness: hooks run in a fixed order and draw from torch's global generator, which the iteration
re-seeds from (seed, rank, iteration), so a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

Tensors = dict[str, torch.Tensor]


class Component:
    """Do-nothing hooks; subclass and override what the component needs (module docstring)."""

    #: checkpoint key of the component's state, or None when it keeps nothing across iterations
    state_key: str | None = None
    #: decoder embeddings (per output name) the student's and teacher's passes must return for it
    embeddings: tuple[str, ...] = ()

    def start(self, it: int) -> None:
        """A new iteration ``it`` begins."""

    def after_pseudo_labels(self, inputs: Tensors, teacher_out: Any, pseudo: torch.Tensor) -> None:
        """The teacher has labelled the target batch (full batch, no gradient)."""

    def after_mix(self, mixed: Tensors) -> Tensors:
        """The ClassMix sample (keys image, events, label, weight, target); return it, changed or not."""
        return mixed

    def extra_inputs(self, inputs: Tensors, pseudo: torch.Tensor, weight: torch.Tensor) -> None:
        """Draw the inputs of the component's own pass on the full batch (after the mix)."""

    def source_terms(self, out: Any, x: Tensors, part: slice) -> Tensors:
        """Loss terms from the source pass's output ``out`` on micro-batch ``part`` (before its backward)."""
        return {}

    def mixed_terms(self, out: Any, m: Tensors, part: slice) -> Tensors:
        """Loss terms from the mixed pass's output on micro-batch ``part`` (before its backward)."""
        return {}

    def extra_pass(self, student: torch.nn.Module, x: Tensors, part: slice, scale: float) -> Tensors:
        """A pass of the component's own on micro-batch ``part``, backpropagated here; its (scaled) terms."""
        return {}

    def finish(self) -> dict[str, float]:
        """After the last pass: updates on the whole batch; the component's metrics for metrics.jsonl."""
        return {}

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (only called when ``state_key`` is set)."""
