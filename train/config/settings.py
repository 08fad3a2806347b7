"""The settings of a training run as typed dataclasses, one per section (``--set section.key=value``).

Each field's comment says what it means and, where cmda departs from CMDA, what CMDA does."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelConfig:
    backbone: str = "mit_b5"
    # Official SegFormer ImageNet weights (original key layout): "auto" = pretrained/<backbone>.pth
    # if it exists (else random init, said once), "none" = random init, or a path that must exist.
    pretrained: str = "auto"
    # CycleGAN IC1 -> night-event generator: "auto" = pretrained/cityscapes_ICD_to_dsec_EN.pth if it
    # exists, "none" = IC1 used directly as the source events, or a path that must exist.
    cyclegan: str = "auto"
    # Start the student from these weights (cmda checkpoint or CMDA's released file; "" = no): the teacher is
    # a copy of it and the optimiser starts fresh. Overrides the ImageNet weights.
    init: str = ""
    num_classes: int = 19
    head_channels: int = 256  # DAFormer head width; smaller only for quick CPU runs
    drop_path: float = 0.1
    fusion_drop_path: float = 0.05
    checkpoint: bool = False  # recompute encoder blocks in backward (saves memory at MiT-B5)
    # Fusion of the two encoders' stages: "attention_avg" (CMDA's DSEC model: one block per encoder, then
    # the mean) or "attention" (CMDA's image + ISR model: one block on concat(image, ISR) of width 2C, then
    # an Mlp 2C -> C -> C); `--target darkzurich|acdc` selects "attention".
    fusion: str = "attention_avg"


@dataclass
class DataConfig:
    datasets: Path = Path("datasets.yaml")
    # Night target: "dsec" (images + events, the default), "dsec-semantic" (DSEC-Semantic, events only, 11
    # classes: the event encoder and head alone; docs/dsec-semantic.md) or an image-only target, "darkzurich" or
    # "acdc" (the second encoder gets the night image's ISR; train/data/image_only.py). `--target` also applies
    # CMDA's cs2dz settings (TARGET_SETTINGS); `--set data.target=...` changes only this field.
    target: str = "dsec"
    # Where the labelled side comes from: "cityscapes" (the source domain, adapted to the target), or, with
    # target "dsec-semantic" and run.source_only, "dsec-semantic": its train labels (ESS's supervised
    # setting; `cmda train --target dsec-semantic --supervised`).
    source: str = "cityscapes"
    # Image-only targets: each image resized to (w, h) first (CMDA: 1920x1080 -> 960x540), then a random
    # `crop` x `crop` window and flip for training; val and test images are scored at this size.
    target_resize: tuple[int, int] = (960, 540)
    source_resize: tuple[int, int] = (1024, 512)  # (w, h) Cityscapes 2048x1024 -> 1024x512
    # "pil": as CMDA's loader (PIL bilinear, antialiased when shrinking; labels PIL nearest);
    # "cv2": cv2 INTER_LINEAR / INTER_NEAREST (no antialiasing; cmda's earlier loader, faster).
    source_resize_impl: str = "pil"
    crop: int = 512  # source crop and target output size
    # DAFormer's config re-crops while one class covers more than this share (0.75); CMDA's crops
    # once (1.0 = off).
    cat_max_ratio: float = 1.0
    target_crop: int = 400  # DSEC crop before resizing to `crop`
    target_crop_x: tuple[int, int] = (0, 240)
    target_crop_y: tuple[int, int] = (0, 80)
    flip: float = 0.5
    test_rows: int = 440  # evaluation crops images, events and labels to the top rows
    # Evaluation resizes the test frames by this factor before the model (logits are scored at full
    # size). 1 for CMDA's setting (training crops of 400 resized to 512 ~ native scale); a run
    # trained on downscaled crops should test at that scale, e.g. 128/400 for crop 128.
    test_scale: float = 1.0
    workers: int = 2
    # The three places the loaders depart from CMDA's code on purpose (docs/fidelity.md, "Differences from
    # CMDA"); `--preset cmda-exact` sets each to CMDA's. True: events_norm (and the ISR) of a part with no
    # cell of its sign is -1 everywhere, as CMDA's min-max makes it; False: that part stays 0.
    cmda_empty_part: bool = False
    # Events counted for events_norm's clip N / 500000 * 1.5: "inclusive" (every event of the window
    # idx_{i-1} .. idx_i) or "cmda" (CMDA's finish - start, one fewer).
    event_count: str = "inclusive"
    # ISR shift directions (DSEC target): "random" (uniform per sample) or "cmda" (CMDA's parity rules:
    # source from (crop x, flip), target from its crop offset, mixed image from the colour-jitter draw).
    isr_direction: str = "random"


@dataclass
class RcsConfig:
    enabled: bool = True
    temperature: float = 0.01
    min_pixels: int = 3000
    min_crop_ratio: float = 0.5


@dataclass
class OptimConfig:
    lr: float = 6e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    head_lr_mult: float = 10.0
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    min_lr: float = 0.0


@dataclass
class DacsConfig:
    ema_alpha: float = 0.999
    pseudo_threshold: float = 0.968
    # "share": DACS's rule, one weight = the share of pixels with confidence >= pseudo_threshold;
    # "adaptive": per-class thresholds min(running median confidence, adaptive_cap), pixels below
    # ignored (train/adaptive_threshold.py; `--set dacs.pseudo_threshold=adaptive` selects it too).
    pseudo_mode: str = "share"
    adaptive_cap: float = 0.9
    jitter_p: float = 0.8  # applied when U(0, 1) > 1 - p, one draw per batch (CMDA: > 0.2)
    jitter: float = 0.2  # brightness/contrast/saturation/hue strength
    # "cmda": kornia 0.5.8's ColorJitter as CMDA ran it (additive brightness, contrast a pure scale,
    # saturation/hue in HSV, random order), per sample; "kornia": today's kornia ColorJitter.
    jitter_impl: str = "cmda"
    classmix_per_sample: bool = True  # CMDA: each sample draws its own half of the batch's classes
    # Rows at the top / bottom of the pseudo weight map set to 0 (CMDA DSEC: 0 / 0; DAFormer and
    # CMDA's Dark Zurich config: 15 / 120).
    pseudo_weight_ignore_top: int = 0
    pseudo_weight_ignore_bottom: int = 0
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.15, 1.15)
    teacher_events_p: float = 0.5  # teacher fuses the image with events (else with ISR)
    # ImageNet feature distance (DAFormer); 0 = off, as in CMDA's DSEC config.
    fd_lambda: float = 0.0
    fd_classes: tuple[int, ...] = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
    fd_scale_min_ratio: float = 0.75


@dataclass
class LossConfig:
    """Segmentation loss weights (CMDA, Xia et al. ICCV 2023, configs of XiaRho/CMDA@9d25129) and the
    L2 feature-loss lambdas of the CMDA L2-loss study."""

    fusion: float = 0.5
    image: float = 0.5
    isr: float = 0.25
    events: float = 0.25
    rgb_event_src: float = 0.0  # mse(src image feat, src event feat), both sides get gradient
    fusion_st: float = 0.0  # mse(mixed fusion feat, src fusion feat.detach())
    rgb_st: float = 0.0  # mse(mixed image feat, src image feat.detach())
    event_s_rgb_t: float = 0.0  # mse(mixed image feat, src event feat.detach())
    event_st: float = 0.0  # mse(mixed event feat, src event feat.detach())
    mask_events: float = 0.0  # share of the mixed pass's event input hidden by random blocks
    mask_block: int = 32  # block size (pixels) of the event mask


@dataclass
class MicConfig:
    """Masked image consistency (MIC, Hoyer et al. CVPR 2023, lhoyer/MIC; train/uda/components/mic.py): a fifth
    pass on the masked target batch."""

    enabled: bool = False
    lambda_: float = 1.0  # `mic.lambda`: weight of the MIC loss
    block: int = 32  # mask block size in pixels (MIC: 64 at 1024 crops, 32 at DAFormer's 512)
    ratio: float = 0.7  # share of blocks hidden
    events: str = "same"  # same: the image's mask; independent: a fresh mask; none: events unmasked


# Cityscapes trainIds of DSRNSS's tail-class bank: rider, truck, bus, motorcycle, bicycle.
TAIL_CLASSES: tuple[int, ...] = (12, 14, 15, 17, 18)


@dataclass
class DsrConfig:
    """DSRNSS's three pieces (Rorisis/DSRNSS_codes; train/uda/components/dsr.py): grouped ClassMix, the tail-class
    bank, prototype alignment. Everything is off unless ``enabled``; each piece then has its own switch."""

    enabled: bool = False
    grouped_mix: bool = True          # ClassMix picks bring their companions (train.uda.components.dsr.COMPANIONS)
    bank: bool = True                 # tail-class bank pasted onto the mixed sample
    bank_classes: tuple[int, ...] = TAIL_CLASSES
    bank_capacity: int = 3            # source batches kept (oldest out); DSRNSS keeps ~3
    paste_every: int = 5              # paste at iterations where it % paste_every == 0 (0 = never)
    proto_weight: float = 0.1         # DSRNSS's 0.1 on each direction; 0 switches the term off
    proto_start: int = 0              # first iteration with the prototype terms (DSRNSS: after 8 epochs)
    proto_scale: float = 10.0         # cosine similarity x 10 -> logits
    proto_mix_factor: float = 0.1     # (source, mixed) term relative to (source, target): DSRNSS's / 10
    proto_class_weight: float = 2.0   # CE class weight of the dynamic/small classes (1.0 = DSRNSS's uniform)
    proto_features: str = "fusion"    # which branch's deepest features are aligned: "fusion" or "image"
    num_classes: int = 19             # must equal model.num_classes


@dataclass
class DidaConfig:
    """DIDA's instance bank and calibrated instance soft CE (RainJamesY/DIDA; train/uda/components/dida.py).
    Off unless ``enabled``."""

    enabled: bool = False
    bank_size: int = 300         # K instances, class-balanced
    dim: int = 256               # decoder embedding channels: must equal model.head_channels
    num_classes: int = 19        # must equal model.num_classes
    momentum: float = 0.999      # EMA of a slot towards its class's boundary mean
    update_every: int = 50       # EMA update interval (empty slots are filled whenever possible)
    boundary_min_labels: int = 2 # distinct labels in a 3x3 window that make a pixel 'boundary'
    weight: float = 0.5          # DIDA's ins_lambda
    calibrate: str = "prob"      # "prob" (student softmax), "logit" (DIDA's raw logits) or "none"
    target_only: bool = True     # loss on the mixed image's target pixels only (False = DIDA: all)
    chunk: int = 0               # pixels per chunk for the similarity maps (0 = all at once)


@dataclass
class AdvConfig:
    """Output-space adversarial training with the light discriminator of a BiSeNet real-time DA project
    (train/uda/components/adversarial.py).
    Off unless ``enabled``."""

    enabled: bool = False
    light: bool = True         # depthwise-separable discriminator (False: AdaptSegNet's standard one)
    ndf: int = 64
    weight: float = 1e-3       # lambda_adv on the target predictions
    lr: float = 1e-4           # discriminator Adam
    betas: tuple[float, float] = (0.9, 0.99)
    power: float = 0.9         # poly decay of the discriminator lr (0 = constant)
    input: str = "mixed"       # "mixed": the mixed pass's target pixels; "target": an extra student target pass
    upsample: int = 1          # resize factor of the logits before D (4 = full resolution, as the project)


@dataclass
class EntropyConfig:
    """Entropy minimisation on the mixed pass's target pixels (ADVENT; train/uda/components/entropy.py).
    Off unless ``enabled``; the worked example of docs/adding-a-component.md."""

    enabled: bool = False      # add `ent/target`, the mixed output's entropy on its night pixels (off: CMDA)
    weight: float = 0.01       # ADVENT's lambda_ent is 1e-3 at full resolution; a weight on the normalised entropy


@dataclass
class RepresentationConfig:
    """The event representation a DSEC run trains on (train/data/events_input.py, docs/representations.md)."""

    # "voxel" (CMDA's grid, events.zarr) or an entry of datasets.yaml's representation.kinds, by kind
    # ("histogram") or by store name ("histogram_b10_c10") when two entries share a kind. The event
    # encoder takes that kind's channels; the checkpoint records the kind and its parameters.
    kind: str = "voxel"


@dataclass
class RunConfig:
    variant: str = "baseline"
    source_only: bool = False
    iters: int = 40_000
    batch: int = 2  # per domain: 2 source + 2 target
    # Gradient accumulation: the batch runs as `accum` equal micro-batches with one optimiser step,
    # pseudo-labels, ClassMix and augmentation drawn on the full batch (exact but for BatchNorm).
    accum: int = 1
    seed: int = 0
    out: Path | None = None  # default runs/<date>-<variant>
    device: str = "auto"  # auto: cuda if available
    amp: bool = True  # bf16 autocast on CUDA (CPU always fp32); CMDA trains in fp32
    # TF32 matmuls/convolutions on CUDA (Ampere+). CMDA sets nothing (PyTorch's defaults then: TF32
    # off for matmuls). run.amp=false + run.tf32=false is true fp32. Set for the run, then restored.
    tf32: bool = True
    channels_last: bool = True
    compile: bool = False
    # cudnn.benchmark on CUDA: autotuned convolution algorithms (faster, not bitwise repeatable).
    # Process-wide torch state: the trainer sets it for the run and restores it afterwards.
    cudnn_benchmark: bool = True
    log_every: int = 50
    eval_every: int = 4000
    ckpt_every: int = 4000
    # Keep only the newest N iter_*.pt (0 = all; best.pt is never pruned). A MiT-B5 checkpoint with the
    # teacher and AdamW state is over a GB, and CMDA's 40k iterations at ckpt_every 4000 write ten.
    keep_ckpts: int = 0
    eval_max: int = 0  # 0 = every test frame


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rcs: RcsConfig = field(default_factory=RcsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dacs: DacsConfig = field(default_factory=DacsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mic: MicConfig = field(default_factory=MicConfig)
    dsr: DsrConfig = field(default_factory=DsrConfig)
    dida: DidaConfig = field(default_factory=DidaConfig)
    adv: AdvConfig = field(default_factory=AdvConfig)
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    representation: RepresentationConfig = field(default_factory=RepresentationConfig)


