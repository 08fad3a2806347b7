"""MiT encoder: parity with transformers' SegFormer, key layout, eps, layouts, checkpointing, strict loading."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from torch import nn

from pipeline.errors import InputError
from train.models.mit import BLOCK_NORM_EPS, DEFAULT_NORM_EPS, MIT_CONFIGS, mit
from train.models.weights import guess_mit_variant, load_mit_pretrained

# ---------------------------------------------------------------- HF parity


def _hf_name(ours: str, layout: str) -> str | tuple[str, str]:
    """Map one of our parameter names to the transformers SegFormer name(s); kv maps to (key, value)."""
    m = re.fullmatch(r"patch_embed(\d)\.(proj|norm)\.(weight|bias)", ours)
    if m:
        s, part, leaf = int(m.group(1)) - 1, m.group(2), m.group(3)
        if layout == "stages":
            return f"stages.{s}.patch_embeddings.{'proj' if part == 'proj' else 'layer_norm'}.{leaf}"
        return f"encoder.patch_embeddings.{s}.{'proj' if part == 'proj' else 'layer_norm'}.{leaf}"
    m = re.fullmatch(r"norm(\d)\.(weight|bias)", ours)
    if m:
        s, leaf = int(m.group(1)) - 1, m.group(2)
        return f"stages.{s}.layer_norm.{leaf}" if layout == "stages" else f"encoder.layer_norm.{s}.{leaf}"
    m = re.fullmatch(r"block(\d)\.(\d+)\.(.+)\.(weight|bias)", ours)
    assert m, ours
    s, j, mod, leaf = int(m.group(1)) - 1, int(m.group(2)), m.group(3), m.group(4)
    if layout == "stages":
        prefix = f"stages.{s}.blocks.{j}."
        table = {
            "norm1": "layernorm_before", "norm2": "layernorm_after", "attn.q": "attention.q_proj",
            "attn.kv": ("attention.k_proj", "attention.v_proj"), "attn.proj": "attention.o_proj",
            "attn.sr": "attention.sequence_reduction.sequence_reduction",
            "attn.norm": "attention.sequence_reduction.layer_norm",
            "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
        }  # fmt: skip
    else:
        prefix = f"encoder.block.{s}.{j}."
        table = {
            "norm1": "layer_norm_1", "norm2": "layer_norm_2", "attn.q": "attention.self.query",
            "attn.kv": ("attention.self.key", "attention.self.value"), "attn.proj": "attention.output.dense",
            "attn.sr": "attention.self.sr", "attn.norm": "attention.self.layer_norm",
            "mlp.fc1": "mlp.dense1", "mlp.fc2": "mlp.dense2", "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
        }  # fmt: skip
    hf = table[mod]
    if isinstance(hf, tuple):
        return (f"{prefix}{hf[0]}.{leaf}", f"{prefix}{hf[1]}.{leaf}")
    return f"{prefix}{hf}.{leaf}"


def _hf_segformer(variant: str):
    transformers = pytest.importorskip("transformers")
    cfg = MIT_CONFIGS[variant]
    hf_cfg = transformers.SegformerConfig(
        num_channels=3,
        hidden_sizes=list(cfg.embed_dims),
        depths=list(cfg.depths),
        num_attention_heads=list(cfg.num_heads),
        sr_ratios=list(cfg.sr_ratios),
        mlp_ratios=[cfg.mlp_ratio] * 4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )
    return transformers.SegformerModel(hf_cfg).eval()  # random init from the config: no hub download


@pytest.mark.parametrize("variant", ["mit_b0", "mit_b2"])
def test_hidden_states_match_transformers_segformer(variant):
    torch.manual_seed(0)
    hf = _hf_segformer(variant)
    ours = mit(variant, drop_path_rate=0.0).eval()
    hf_state = hf.state_dict()
    layout = "stages" if any(k.startswith("stages.") for k in hf_state) else "encoder"
    hf_modules = dict(hf.named_modules())

    mapped = {}
    for name in ours.state_dict():
        target = _hf_name(name, layout)
        if isinstance(target, tuple):
            mapped[name] = torch.cat([hf_state[target[0]], hf_state[target[1]]], dim=0)
        else:
            mapped[name] = hf_state[target]
    targets = [_hf_name(n, layout) for n in ours.state_dict()]
    used = {t for target in targets for t in ([target] if isinstance(target, str) else target)}
    assert used == set(hf_state), "every HF encoder tensor must map onto exactly one of ours"
    ours.load_state_dict(mapped, strict=True)

    # HF builds every LayerNorm with eps 1e-5; ours follow SegFormer (1e-6 in blocks and stage norms).
    # Set THEIR eps to ours, so the comparison checks our modules as they are used for training.
    n_ln = 0
    for name, mod in ours.named_modules():
        if isinstance(mod, nn.LayerNorm):
            hf_mod = hf_modules[_hf_name(f"{name}.weight", layout).rsplit(".", 1)[0]]
            assert isinstance(hf_mod, nn.LayerNorm)
            hf_mod.eps = mod.eps
            n_ln += 1
    assert n_ln > 0

    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = ours(x)
        hidden = hf(pixel_values=x, output_hidden_states=True).hidden_states
    hidden = list(hidden)[-4:]
    assert len(feats) == 4
    for f, h in zip(feats, hidden, strict=True):
        assert f.shape == h.shape
        torch.testing.assert_close(f, h, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- structure


def test_key_layout_matches_original_segformer_names():
    keys = set(mit("mit_b0").state_dict())
    for k in [
        "patch_embed1.proj.weight", "patch_embed1.norm.weight", "patch_embed4.proj.bias",
        "block1.0.attn.q.weight", "block1.0.attn.kv.weight", "block1.0.attn.sr.weight", "block1.0.attn.norm.bias",
        "block1.1.attn.proj.weight", "block1.0.mlp.fc1.weight", "block1.0.mlp.dwconv.dwconv.weight",
        "block1.0.mlp.fc2.bias", "block1.0.norm1.weight", "block1.0.norm2.bias", "norm1.weight", "norm4.bias",
    ]:  # fmt: skip
        assert k in keys, k
    assert "block4.0.attn.sr.weight" not in keys  # sr ratio 1 in stage 4: no reduction conv
    assert mit("mit_b0").state_dict()["block1.0.attn.kv.weight"].shape == (64, 32)


def test_layernorm_eps_follow_the_original():
    m = mit("mit_b0")
    assert m.patch_embed1.norm.eps == DEFAULT_NORM_EPS == 1e-5
    assert m.block1[0].attn.norm.eps == 1e-5
    assert m.block1[0].norm1.eps == m.block1[0].norm2.eps == m.norm3.eps == BLOCK_NORM_EPS == 1e-6


def test_drop_path_grows_linearly_over_all_blocks():
    m = mit("mit_b2", drop_path_rate=0.1)
    rates = [b.drop_path.p for s in range(1, 5) for b in getattr(m, f"block{s}")]
    assert len(rates) == sum(MIT_CONFIGS["mit_b2"].depths) == 16
    assert rates[0] == 0.0
    assert rates[-1] == pytest.approx(0.1)
    assert all(b > a for a, b in itertools.pairwise(rates))


@pytest.mark.parametrize("name", ["mit_b0", "mit_b1", "mit_b2", "mit_b3"])
def test_small_variants_build_with_their_sizes(name):
    cfg = MIT_CONFIGS[name]
    m = mit(name)
    assert [len(getattr(m, f"block{s}")) for s in range(1, 5)] == list(cfg.depths)
    assert [getattr(m, f"norm{s}").normalized_shape[0] for s in range(1, 5)] == list(cfg.embed_dims)


def test_mit_b5_parameter_count_matches_segformer():
    m = mit("mit_b5")
    assert [len(getattr(m, f"block{s}")) for s in range(1, 5)] == [3, 6, 40, 3]
    n = sum(p.numel() for p in m.parameters())
    assert 81_000_000 < n < 82_000_000  # SegFormer reports ~82M for MiT-B5 (incl. its 0.5M classifier)


def test_output_shapes_and_strides():
    m = mit("mit_b0").eval()
    with torch.no_grad():
        feats = m(torch.randn(1, 3, 64, 128))
    assert [tuple(f.shape) for f in feats] == [(1, 32, 16, 32), (1, 64, 8, 16), (1, 160, 4, 8), (1, 256, 2, 4)]


def test_channels_last_input_gives_same_features():
    torch.manual_seed(0)
    m = mit("mit_b0").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = m(x)
        b = m(x.contiguous(memory_format=torch.channels_last))
    for fa, fb in zip(a, b, strict=True):
        torch.testing.assert_close(fa, fb, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_forward_and_backward():
    m = mit("mit_b0").train()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = m(x)
        loss = sum(f.float().square().mean() for f in feats)
    assert all(torch.isfinite(f.float()).all() for f in feats)
    loss.backward()
    assert m.patch_embed1.proj.weight.grad is not None
    assert torch.isfinite(m.patch_embed1.proj.weight.grad).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = mit("mit_b0", drop_path_rate=0.0).train()
    ckpt = mit("mit_b0", drop_path_rate=0.0, checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for m in (plain, ckpt):
        loss = sum(f.sum() for f in m(x))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)


def test_drop_path_is_active_in_train_and_off_in_eval():
    torch.manual_seed(0)
    m = mit("mit_b0", drop_path_rate=0.9)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        m.eval()
        e1, e2 = m(x)[-1], m(x)[-1]
        m.train()
        t1, t2 = m(x)[-1], m(x)[-1]
    torch.testing.assert_close(e1, e2)
    assert not torch.allclose(t1, t2)


# ---------------------------------------------------------------- strict loading of official files


def _official_like(model: nn.Module, classifier: int = 1000) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    width = model.config.embed_dims[-1]
    state["head.weight"] = torch.randn(classifier, width)
    state["head.bias"] = torch.randn(classifier)
    return state


def test_official_file_with_classifier_loads(tmp_path):
    src = mit("mit_b0")
    path = tmp_path / "mit_b0.pth"
    torch.save(_official_like(src), path)
    dst = mit("mit_b0")
    load_mit_pretrained(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_wrapped_state_dict_loads(tmp_path):
    src = mit("mit_b0")
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": _official_like(src), "meta": {"epoch": 3}}, path)
    dst = mit("mit_b0")
    load_mit_pretrained(dst, path)
    assert torch.equal(dst.norm4.weight, src.norm4.weight)


def test_missing_key_is_named(tmp_path):
    state = _official_like(mit("mit_b0"))
    del state["block2.1.attn.kv.weight"]
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    with pytest.raises(InputError, match=r"1 missing keys \[block2\.1\.attn\.kv\.weight\]") as err:
        load_mit_pretrained(mit("mit_b0"), path)
    assert err.value.path == path


def test_unknown_key_is_named(tmp_path):
    state = _official_like(mit("mit_b0"))
    state["pos_embed1"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(InputError, match=r"1 unexpected keys \[pos_embed1\]"):
        load_mit_pretrained(mit("mit_b0"), path)


def test_file_of_another_backbone_lists_shape_mismatches_and_names_it(tmp_path):
    path = tmp_path / "mit_b1.pth"
    torch.save(_official_like(mit("mit_b1")), path)
    with pytest.raises(InputError) as err:
        load_mit_pretrained(mit("mit_b0"), path)
    msg = str(err.value)
    assert "looks like mit_b1" in msg
    assert "patch_embed1.proj.weight: file (64, 3, 7, 7) vs model (32, 3, 7, 7)" in msg
    assert "more)" in msg  # long lists are cut after 10 and counted


def test_deeper_file_into_shallower_model_lists_unexpected_blocks(tmp_path):
    path = tmp_path / "mit_b2.pth"
    torch.save(_official_like(mit("mit_b2")), path)
    with pytest.raises(InputError, match=r"unexpected keys \[block1\.2\.") as err:
        load_mit_pretrained(mit("mit_b1"), path)
    assert "looks like mit_b2" in str(err.value)


def test_missing_or_unreadable_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_mit_pretrained(mit("mit_b0"), tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(InputError, match="cannot read"):
        load_mit_pretrained(mit("mit_b0"), bad)


def test_guess_variant():
    assert guess_mit_variant(mit("mit_b2").state_dict()) == "mit_b2"
    assert guess_mit_variant({"x": torch.zeros(1)}) is None
