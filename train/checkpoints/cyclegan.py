"""The CycleGAN IC1 -> night-event generator's weights, from any file that holds them.

CMDA's released file ``cityscapes_ICD_to_dsec_EN.pth``, CMDA's released training checkpoint
(its ``cyclegan_itrd2en.*`` keys) or a cmda checkpoint converted from one (``cmda convert``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from pipeline.errors import InputError
from train.checkpoints.cmda_keys import CYCLEGAN
from train.checkpoints.cmda_layout import describe_layout, is_cmda_mmcv, read_checkpoint_object, state_dict_of
from train.checkpoints.files import FORMAT
from train.models.cyclegan import ResnetGenerator
from train.models.weights import check_state_dict


def cyclegan_state(path: str | Path) -> dict[str, torch.Tensor]:
    """CycleGAN generator weights from a standalone ``.pth``, a CMDA checkpoint (``cyclegan_itrd2en.*``) or a
    cmda checkpoint converted from one."""
    path = Path(path)
    obj = read_checkpoint_object(path)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        gan = obj.get("cyclegan")
        if not isinstance(gan, Mapping):
            raise InputError(path, "this cmda checkpoint holds no CycleGAN weights (only one converted from a CMDA "
                             "checkpoint with cyclegan_itrd2en.* does)")
        return dict(gan)
    sd = state_dict_of(obj)
    if sd is None:
        raise InputError(path, f"not a CycleGAN weight file: it looks like {describe_layout(obj)}")
    if any(k.startswith(CYCLEGAN) for k in sd):
        return {k[len(CYCLEGAN):]: v for k, v in sd.items() if k.startswith(CYCLEGAN)}
    if is_cmda_mmcv(obj):
        raise InputError(path, "CMDA checkpoint holds no cyclegan_itrd2en.* weights (use the standalone "
                         "cityscapes_ICD_to_dsec_EN.pth)")
    state = dict(sd)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_cyclegan(path: str | Path, device: str | torch.device = "cpu") -> ResnetGenerator:
    """Load ``cityscapes_ICD_to_dsec_EN.pth`` into a frozen, eval-mode 1->1 channel ResNet generator.

    Also takes CMDA's released checkpoint (its ``cyclegan_itrd2en.*`` weights) or a cmda checkpoint converted
    from one (``cmda convert``).
    """
    state = cyclegan_state(path)
    gen = ResnetGenerator(input_nc=1, output_nc=1, ngf=64, n_blocks=9)
    check_state_dict(path, state, gen, "the CycleGAN ResNet-9 generator (1->1 channel, 64 filters)")
    gen.load_state_dict(state, strict=True)
    gen.requires_grad_(False)
    return gen.eval().to(device)
