"""Networks for CMDA-style training: MiT encoders, attention-average fusion, DAFormer head, CycleGAN generator.

API for the training loop (everything is plain PyTorch; inputs are ``[B, 3, H, W]`` float tensors,
images ImageNet-normalised, events / ISR / IC1 in [-1, 1] repeated to 3 channels)::

    from train.models import CMDAModel, ic1_to_events
    from train.checkpoints.cyclegan import load_cyclegan

    model = CMDAModel("mit_b5", num_classes=19, checkpoint=True)   # checkpoint = recompute blocks in backward
    model.load_pretrained("pretrained/mit_b5.pth")                  # same ImageNet file into both encoders
    opt = torch.optim.AdamW(model.param_groups(lr=6e-5, weight_decay=0.01), lr=6e-5, betas=(0.9, 0.999))
    # each group has "lr_mult" (1 or 10) and "name"; scale group["lr"] = base_lr(it) * group["lr_mult"]

    gen = load_cyclegan("pretrained/cityscapes_ICD_to_dsec_EN.pth", device)   # frozen, eval mode
    src_events = ic1_to_events(gen, ic1)                                       # no grad, [B, 3, H, W]

    out = model(image=img, events=src_events, isr=isr)     # all four outputs; fusion = image + events
    out.logits["fusion"]        # [B, 19, H/4, W/4]: upsample to the label size before the loss
    out.features["fusion"][-1]  # [B, 512, H/32, W/32] deepest stage (also "image", "events", "isr")
    loss = sum(segmentation_terms(out.logits, label, cfg.loss).values())  # train.uda.losses: CMDA's weights

    # teacher pseudo-labels: only the image encoder, the event encoder on ISR, the fusion and the head run
    out = teacher(image=night_img, isr=night_isr, fuse_with="isr", outputs=("fusion",))

Rules worth knowing:
- ``outputs=None`` means every output the given inputs allow; a requested output without its input is a
  ValueError. Unrequested encoders do not run.
- ISR is encoded by the *event* encoder (CMDA shares it), and ``fuse_with="isr"`` fuses image with ISR
  through the same fusion blocks.
- Only the image output passes through the head's Dropout2d(0.1) (as in CMDA). ``model.eval()`` turns off
  dropout and drop path (what the EMA teacher needs).
- The four head calls are separate, so BatchNorm statistics are per branch (as in CMDA).
- Weight loading is strict: any missing / unknown / mis-shaped key raises ``pipeline.errors.InputError``
  naming the keys; only the ImageNet classifier ``head.*`` of the official MiT files is dropped.
"""

from train.models.cyclegan import ResnetGenerator, ic1_to_events
from train.models.event_only import EventOnlyModel
from train.models.fusion import FUSIONS, OUTPUTS, AttentionAvgFusion, AttentionFusion, CMDAModel, ModelOutput
from train.models.head import DAFormerHead
from train.models.mit import MIT_CONFIGS, MiTConfig, MixVisionTransformer, mit
from train.models.weights import load_mit_pretrained, read_state_dict

__all__ = [
    "FUSIONS",
    "MIT_CONFIGS",
    "OUTPUTS",
    "AttentionAvgFusion",
    "AttentionFusion",
    "CMDAModel",
    "DAFormerHead",
    "EventOnlyModel",
    "MiTConfig",
    "MixVisionTransformer",
    "ModelOutput",
    "ResnetGenerator",
    "ic1_to_events",
    "load_mit_pretrained",
    "mit",
    "read_state_dict",
]
