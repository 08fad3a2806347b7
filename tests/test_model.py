"""CMDAModel: output combinations, lazy branches, exact average fusion, head dropout, param groups, precision."""

from __future__ import annotations

import itertools

import pytest
import torch

from train.models import OUTPUTS, CMDAModel, ModelOutput
from train.models.fusion import AttentionAvgFusion
from train.models.mit import map_to_tokens, mit

H = W = 32  # tiny inputs keep the suite fast; stage maps are 8, 4, 2, 1 pixels


@pytest.fixture(scope="module")
def model() -> CMDAModel:
    torch.manual_seed(0)
    return CMDAModel("mit_b0", num_classes=19).eval()


def _inputs(b: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(b, 3, H, W, generator=g) for k in ("image", "events", "isr")}


def _count_calls(model: CMDAModel) -> tuple[dict[str, int], list]:
    calls = {"backbone_image": 0, "backbone_events": 0, "fusion_module": 0, "decode_head": 0}
    handles = []
    for name in calls:

        def hook(*_, _name=name):
            calls[_name] += 1

        handles.append(getattr(model, name).register_forward_hook(hook))
    return calls, handles


COMBOS = [c for r in range(1, 5) for c in itertools.combinations(OUTPUTS, r)]


@pytest.mark.parametrize("fuse_with", ["events", "isr"])
@pytest.mark.parametrize("outputs", COMBOS, ids=lambda c: "+".join(c))
def test_every_output_combination_has_the_right_shapes_and_runs_only_what_it_needs(model, outputs, fuse_with):
    x = _inputs()
    calls, handles = _count_calls(model)
    try:
        with torch.no_grad():
            out = model(**x, fuse_with=fuse_with, outputs=outputs)
    finally:
        for h in handles:
            h.remove()
    assert isinstance(out, ModelOutput)
    assert set(out.logits) == set(outputs)
    for logits in out.logits.values():
        assert logits.shape == (2, 19, H // 4, W // 4)
    need_img = "image" in outputs or "fusion" in outputs
    evt_inputs = {"events" for o in outputs if o == "events"} | {"isr" for o in outputs if o == "isr"}
    if "fusion" in outputs:
        evt_inputs.add(fuse_with)
    assert calls["backbone_image"] == int(need_img)
    assert calls["backbone_events"] == len(evt_inputs)  # shared events/ISR encoder, each input once
    assert calls["fusion_module"] == int("fusion" in outputs)
    assert calls["decode_head"] == len(outputs)
    expected_feats = ({"image"} if need_img else set()) | evt_inputs | ({"fusion"} if "fusion" in outputs else set())
    assert set(out.features) == expected_feats
    for feats in out.features.values():
        assert [tuple(f.shape) for f in feats] == [(2, 32, 8, 8), (2, 64, 4, 4), (2, 160, 2, 2), (2, 256, 1, 1)]
    assert out.fused_with == (fuse_with if "fusion" in outputs else None)


def test_default_outputs_are_what_the_inputs_allow(model):
    x = _inputs()
    with torch.no_grad():
        assert set(model(**x).logits) == set(OUTPUTS)
        assert set(model(image=x["image"], events=x["events"]).logits) == {"image", "events", "fusion"}
        assert set(model(image=x["image"], isr=x["isr"]).logits) == {"image", "isr"}
        assert set(model(image=x["image"], isr=x["isr"], fuse_with="isr").logits) == {"image", "isr", "fusion"}
        assert set(model(events=x["events"]).logits) == {"events"}


def test_a_single_output_name_may_be_a_string(model):
    x = _inputs()
    with torch.no_grad():
        assert set(model(**x, outputs="fusion").logits) == {"fusion"}


def test_sizes_that_are_not_multiples_of_32_work(model):
    x = torch.randn(1, 3, 56, 88)  # like the 440x640 evaluation crop: stage maps are ceil-divided
    with torch.no_grad():
        out = model(image=x, events=x)
    assert out.logits["fusion"].shape == (1, 19, 14, 22)
    assert [tuple(f.shape[-2:]) for f in out.features["fusion"]] == [(14, 22), (7, 11), (4, 6), (2, 3)]


def test_missing_input_or_unknown_output_is_a_value_error(model):
    x = _inputs()
    with pytest.raises(ValueError, match="needs the image and isr input"):
        model(image=x["image"], events=x["events"], fuse_with="isr", outputs=("fusion",))
    with pytest.raises(ValueError, match="needs the events input"):
        model(image=x["image"], outputs=("events",))
    with pytest.raises(ValueError, match="unknown outputs"):
        model(**x, outputs=("depth",))
    with pytest.raises(ValueError, match="fuse_with"):
        model(**x, fuse_with="rgb")


def test_pseudo_label_pass_leaves_unused_encoder_without_gradients():
    torch.manual_seed(0)
    m = CMDAModel("mit_b0").train()
    x = _inputs()
    out = m(image=x["image"], events=x["events"], outputs=("image",))
    out.logits["image"].sum().backward()
    assert all(p.grad is None for p in m.backbone_events.parameters())
    assert all(p.grad is None for p in m.fusion_module.parameters())
    assert m.backbone_image.patch_embed1.proj.weight.grad is not None
    m.zero_grad(set_to_none=True)
    out = m(image=x["image"], isr=x["isr"], fuse_with="isr", outputs=("fusion",))
    out.logits["fusion"].sum().backward()
    assert m.backbone_events.patch_embed1.proj.weight.grad is not None  # ISR uses the event encoder
    assert m.fusion_module.blocks[7].mlp.fc2.weight.grad is not None


def test_fusion_is_exactly_the_average_of_the_two_blocks(model):
    x = _inputs()
    with torch.no_grad():
        out = model(**x, outputs=("fusion",))
        img, evt = out.features["image"], out.features["events"]
        for i, fused in enumerate(out.features["fusion"]):
            h, w = img[i].shape[-2:]
            a = model.fusion_module.blocks[2 * i](map_to_tokens(img[i]), h, w)
            b = model.fusion_module.blocks[2 * i + 1](map_to_tokens(evt[i]), h, w)
            expected = ((a + b) / 2).reshape(2, h, w, -1).permute(0, 3, 1, 2)
            torch.testing.assert_close(fused, expected, atol=0, rtol=0)


def test_fusion_blocks_follow_cmda():
    f = AttentionAvgFusion((32, 64, 160, 256), (8, 4, 2, 1), drop_path=0.05)
    assert len(f.blocks) == 8
    for i, blk in enumerate(f.blocks):
        assert blk.attn.num_heads == 1
        assert blk.attn.sr_ratio == (8, 4, 2, 1)[i // 2]
        assert blk.drop_path.p == 0.05
        assert blk.attn.q.bias is not None
        assert blk.mlp.fc1.out_features == 4 * (32, 64, 160, 256)[i // 2]


def test_head_dropout_applies_to_the_image_output_only():
    m = CMDAModel("mit_b0").train()
    seen = []
    m.decode_head.dropout.register_forward_hook(lambda *_: seen.append(1))
    x = _inputs()
    with torch.no_grad():
        m(**x)
    assert len(seen) == 1  # four head calls, one dropout
    seen.clear()
    with torch.no_grad():
        m(**x, outputs=("events", "fusion", "isr"))
    assert seen == []


def test_eval_mode_is_deterministic(model):
    x = _inputs()
    with torch.no_grad():
        a = model(**x).logits
        b = model(**x).logits
    for k in a:
        assert torch.equal(a[k], b[k])


def test_b1_deepest_features_have_512_channels_at_stride_32():
    m = CMDAModel("mit_b1").eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = m(image=x, events=x)
    for name in ("image", "events", "fusion"):
        assert out.features[name][-1].shape == (1, 512, 2, 3)


def test_param_groups_cover_every_parameter_once_with_cmda_rules(model):
    groups = model.param_groups(lr=6e-5, weight_decay=0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_decay", "head"}
    assert by_name["backbone"]["lr"] == 6e-5 and by_name["backbone"]["weight_decay"] == 0.01
    assert by_name["backbone_no_decay"]["lr"] == 6e-5 and by_name["backbone_no_decay"]["weight_decay"] == 0.0
    assert by_name["head"]["lr"] == pytest.approx(6e-4) and by_name["head"]["weight_decay"] == 0.01
    assert [g["lr_mult"] for g in groups] == [1.0, 1.0, 10.0]
    group_of = {id(p): g["name"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert group_of[id(named["decode_head.conv_seg.weight"])] == "head"
    assert group_of[id(named["decode_head.fuse_layer.bottleneck.bn.weight"])] == "head"  # mmcv: 'head' wins
    assert group_of[id(named["backbone_image.block1.0.norm1.weight"])] == "backbone_no_decay"
    assert group_of[id(named["backbone_events.patch_embed2.norm.bias"])] == "backbone_no_decay"
    assert group_of[id(named["backbone_image.norm4.weight"])] == "backbone_no_decay"
    assert group_of[id(named["backbone_image.block3.1.attn.q.bias"])] == "backbone"  # biases decay, as in mmcv
    assert group_of[id(named["fusion_module.blocks.0.attn.norm.weight"])] == "backbone_no_decay"
    assert group_of[id(named["fusion_module.blocks.5.mlp.fc1.weight"])] == "backbone"  # fusion is not head
    opt = torch.optim.AdamW(groups, lr=6e-5, betas=(0.9, 0.999))
    assert len(opt.param_groups) == 3


def test_param_groups_skip_frozen_parameters():
    m = CMDAModel("mit_b0")
    m.backbone_events.requires_grad_(False)
    n = sum(len(g["params"]) for g in m.param_groups(1e-4, 0.01))
    assert n == len([p for p in m.parameters() if p.requires_grad])


def test_channels_last_bf16_autocast_forward():
    torch.manual_seed(0)
    m = CMDAModel("mit_b0").eval()
    x = {k: v.contiguous(memory_format=torch.channels_last) for k, v in _inputs(b=1).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = m(**x)
    assert set(out.logits) == set(OUTPUTS)
    assert all(v.dtype == torch.bfloat16 for v in out.logits.values())
    assert all(torch.isfinite(v.float()).all() for v in out.logits.values())


@pytest.mark.slow  # CPUs without native bf16 run the head's depthwise convs group by group (~10-30 s)
def test_channels_last_bf16_autocast_backward():
    torch.manual_seed(0)
    m = CMDAModel("mit_b0").train()
    x = {k: v.contiguous(memory_format=torch.channels_last) for k, v in _inputs(b=1).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = m(image=x["image"], events=x["events"], outputs=("fusion",))
        loss = 0.5 * fused.logits["fusion"].float().logsumexp(1).mean()
    loss.backward()
    assert torch.isfinite(m.decode_head.conv_seg.weight.grad).all()
    assert m.fusion_module.blocks[1].attn.q.weight.grad is not None
    assert m.backbone_events.patch_embed1.proj.weight.grad is not None


def test_channels_last_input_matches_contiguous(model):
    x = _inputs()
    xc = {k: v.contiguous(memory_format=torch.channels_last) for k, v in x.items()}
    with torch.no_grad():
        a, b = model(**x).logits, model(**xc).logits
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)


def test_checkpoint_flag_reaches_both_encoders():
    m = CMDAModel("mit_b0", checkpoint=True)
    assert m.backbone_image.checkpoint and m.backbone_events.checkpoint
    m.checkpoint = False
    assert not m.backbone_image.checkpoint and not m.backbone_events.checkpoint


def test_load_pretrained_fills_both_encoders(tmp_path):
    src = mit("mit_b0")
    state = dict(src.state_dict())
    state["head.weight"], state["head.bias"] = torch.zeros(1000, 256), torch.zeros(1000)
    path = tmp_path / "mit_b0.pth"
    torch.save(state, path)
    m = CMDAModel("mit_b0")
    m.load_pretrained(path)
    for k, v in src.state_dict().items():
        assert torch.equal(m.backbone_image.state_dict()[k], v)
        assert torch.equal(m.backbone_events.state_dict()[k], v)


def test_head_channels_can_shrink_the_decoder_for_cpu_runs():
    m = CMDAModel("mit_b0", head_channels=16).eval()
    assert m.decode_head.conv_seg.in_channels == 16
    assert m.decode_head.embed_layers[0].proj.out_features == 16
    x = _inputs(b=1)
    with torch.no_grad():
        out = m(**x)
    assert all(v.shape == (1, 19, H // 4, W // 4) for v in out.logits.values())


def test_head_aspp_gets_a_contiguous_input_on_cpu():
    """The SepASPP input is a channels-last view of token embeddings; on the CPU it is made contiguous
    first, because oneDNN's dilated depthwise conv is several times slower on channels-last input
    (benchmarks/bench_infer.py measures the whole model). The values must not change."""
    from train.models.head import SepASPP

    torch.manual_seed(0)
    aspp = SepASPP(32, 16, (1, 2, 3)).eval()
    seen: list[bool] = []
    for m in aspp.aspp_modules[1:]:
        m.depthwise_conv.conv.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].is_contiguous()))
    x = torch.randn(1, 32, 9, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = aspp(x)
        assert seen == [True, True]
        ref = aspp.bottleneck(torch.cat([m(x.contiguous()) for m in aspp.aspp_modules], dim=1))
    torch.testing.assert_close(y, ref)
