"""train.eval.visualize: palette from cityscapesscripts, overlay, event colours, panels, confusion and loss plots."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as cs_labels

from pipeline.errors import InputError
from train.common import CLASSES
from train.data.loaders import normalize_image
from train.eval.visualize import (
    PALETTE,
    TITLE_HEIGHT,
    colorize,
    confusion_png,
    denormalize,
    events_to_rgb,
    loss_curve_png,
    loss_series,
    metric_series,
    overlay,
    panel,
    read_metrics_jsonl,
    row_normalize,
    run_title,
    smooth,
    stack,
)


def test_palette_is_cityscapes_trainid_table():
    by_train_id = {lab.trainId: lab.color for lab in cs_labels if 0 <= lab.trainId < 19}
    assert PALETTE.shape == (19, 3) and PALETTE.dtype == np.uint8
    for t in range(19):
        assert tuple(int(v) for v in PALETTE[t]) == by_train_id[t]
    assert tuple(PALETTE[0]) == (128, 64, 128)  # road, the colour everyone recognises


def test_colorize_maps_every_trainid_and_ignore_to_black():
    lab = np.array([[*range(19), 255, 19, 254]], dtype=np.uint8)
    rgb = colorize(lab)
    assert rgb.shape == (1, 22, 3) and rgb.dtype == np.uint8
    for t in range(19):
        assert (rgb[0, t] == PALETTE[t]).all()
    assert (rgb[0, 19:] == 0).all()  # 255 and other non-classes are black
    # int64 torch labels (what the datasets return) work as well, and -1 is black
    t = torch.tensor([[13, -1]])
    assert (colorize(t)[0, 0] == PALETTE[13]).all() and (colorize(t)[0, 1] == 0).all()
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2, 2), np.uint8))


def test_overlay_blends_labelled_pixels_and_keeps_ignored_ones():
    rgb = np.full((2, 3, 3), 100, np.uint8)
    lab = np.array([[0, 10, 255], [13, 255, 2]], np.uint8)
    out = overlay(rgb, lab, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    expected = np.rint(0.5 * 100 + 0.5 * PALETTE[0].astype(float))
    assert (out[0, 0] == expected).all()
    assert (out[0, 2] == 100).all() and (out[1, 1] == 100).all()
    assert (overlay(rgb, lab, alpha=1.0)[1, 0] == PALETTE[13]).all()
    assert (overlay(rgb, lab, alpha=0.0) == rgb).all()


def test_events_sign_convention_white_and_black_background():
    ev = np.array([[1.0, -1.0, 0.0, 0.5, -0.5, 3.0]], np.float32)
    w = events_to_rgb(ev)
    assert w.shape == (1, 6, 3) and w.dtype == np.uint8
    assert tuple(w[0, 0]) == (255, 0, 0)  # positive: red
    assert tuple(w[0, 1]) == (0, 0, 255)  # negative: blue
    assert tuple(w[0, 2]) == (255, 255, 255)  # no event: white
    assert tuple(w[0, 3]) == (255, 128, 128)  # half strength: halfway to red (rounded)
    assert tuple(w[0, 4]) == (128, 128, 255)
    assert tuple(w[0, 5]) == (255, 0, 0)  # clipped to +1
    b = events_to_rgb(ev, background="black")
    assert tuple(b[0, 0]) == (255, 0, 0) and tuple(b[0, 1]) == (0, 0, 255) and tuple(b[0, 2]) == (0, 0, 0)
    assert tuple(b[0, 3]) == (128, 0, 0)
    # [C, H, W]: the 3 repeated channels of the network input give the same picture as one channel
    assert (events_to_rgb(np.repeat(ev[None], 3, axis=0)) == w).all()
    assert (events_to_rgb(torch.from_numpy(ev)) == w).all()


def test_denormalize_inverts_normalize_image():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    back = denormalize(normalize_image(rgb))
    assert back.dtype == np.uint8 and back.shape == rgb.shape
    assert (back == rgb).all()
    assert (denormalize(torch.from_numpy(normalize_image(rgb))) == rgb).all()


def test_panel_width_is_sum_of_tiles_and_tiles_are_placed_unchanged():
    a = np.full((40, 30, 3), 10, np.uint8)
    b = np.full((50, 20, 3), 200, np.uint8)
    g = np.full((40, 25), 77, np.uint8)  # grey tiles become RGB
    p = panel([("a", a), ("bee", b), ("grey", g)])
    assert p.shape == (50 + TITLE_HEIGHT, 30 + 20 + 25, 3)
    assert (p[TITLE_HEIGHT:TITLE_HEIGHT + 40, :30] == 10).all()
    assert (p[TITLE_HEIGHT + 40:, :30] == 0).all()  # shorter tile padded with black below
    assert (p[TITLE_HEIGHT:, 30:50] == 200).all()
    assert (p[TITLE_HEIGHT:TITLE_HEIGHT + 40, 50:] == 77).all()
    strip = p[:TITLE_HEIGHT, :30]
    assert strip.max() > 200  # the title text is drawn (white on dark)
    # a title far longer than its tile is shrunk / cut, never spills into the next tile's strip
    long = panel([("a very very long title for a narrow tile", a), ("", b)])
    assert (long[:TITLE_HEIGHT, 30:] == 32).all()
    with pytest.raises(ValueError):
        panel([])


def test_stack_pads_narrow_rows_with_white():
    s = stack([np.zeros((3, 5, 3), np.uint8), np.zeros((2, 3, 3), np.uint8)], gap=1)
    assert s.shape == (3 + 1 + 2, 5, 3)
    assert (s[3] == 255).all() and (s[4:, 3:] == 255).all() and (s[4:, :3] == 0).all()


def test_row_normalize_and_nan_for_missing_ground_truth():
    conf = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    n = row_normalize(conf)
    assert np.allclose(n[0], [0.75, 0.25, 0.0]) and np.isnan(n[1]).all() and np.allclose(n[2], [0.25, 0.25, 0.5])


def test_confusion_png_writes_a_readable_png(tmp_path):
    rng = np.random.default_rng(0)
    conf = rng.integers(0, 1000, (19, 19)) + np.diag(rng.integers(5000, 9000, 19))
    conf[14] = 0  # truck never annotated in DSEC night
    path = confusion_png(conf, CLASSES, tmp_path / "sub" / "confusion.png", title="test")
    img = cv2.imread(str(path))
    assert img is not None
    h, w = img.shape[:2]
    assert 600 <= h <= 2000 and 600 <= w <= 2000
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name != "confusion.png"]  # no temp file left
    with pytest.raises(ValueError):
        confusion_png(conf, CLASSES[:5], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def _write_log(path, n=30, broken_tail=True):
    lines = []
    for i in range(0, n * 10, 10):
        lines.append(json.dumps({"iter": i, "loss/fusion": 2.0 / (1 + i), "loss/image": 3.0 / (1 + i),
                                 "loss/fusion_st": 0.0, "lr": 6e-5 * min(1, i / 100)}))
        if i % 100 == 0:
            lines.append(json.dumps({"iter": i, "eval/mIoU": 0.2 + i / 1000, "eval/mIoU19": 0.19}))
    text = "\n".join(lines) + "\n"
    if broken_tail:
        text += '{"iter": 300, "loss/fus'  # the trainer is writing this line right now
    path.write_text(text)


def test_loss_curve_png_from_synthetic_log(tmp_path):
    log = tmp_path / "metrics.jsonl"
    _write_log(log)
    path = loss_curve_png(log, tmp_path / "loss.png")
    img = cv2.imread(str(path))
    assert img is not None and img.shape[1] >= 800 and img.shape[0] >= 500
    # an empty log (training just started) still gives a picture
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cv2.imread(str(loss_curve_png(empty, tmp_path / "empty.png"))) is not None


def test_metrics_log_parsing_rules(tmp_path):
    log = tmp_path / "m.jsonl"
    _write_log(log, n=3)
    recs = read_metrics_jsonl(log)
    assert len(recs) == 3 + 1  # broken last line dropped
    its, vals = metric_series(recs, "loss/fusion")
    assert its.tolist() == [0, 10, 20] and np.allclose(vals, [2.0, 2.0 / 11, 2.0 / 21])
    its, vals = metric_series(recs, "eval/mIoU")
    assert its.tolist() == [0] and np.allclose(vals, [0.2])
    # a resumed run logs an iteration again: the later line wins, output sorted by iteration
    resumed = [*recs, {"iter": 10, "loss/fusion": 9.0}, {"iter": 5, "loss/fusion": float("nan")}]
    its, vals = metric_series(resumed, "loss/fusion")
    assert its.tolist() == [0, 10, 20] and vals[1] == 9.0
    series = loss_series(read_metrics_jsonl(log))
    assert list(series) == ["fusion", "image"]  # fusion_st is identically 0: left out of the plot
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"iter": 0}\nnot json\n{"iter": 1}\n')
    with pytest.raises(InputError, match="line 2"):
        read_metrics_jsonl(bad)
    with pytest.raises(InputError, match="not found"):
        read_metrics_jsonl(tmp_path / "missing.jsonl")


def test_smooth_is_bias_corrected_ema():
    assert np.allclose(smooth([5.0, 5.0, 5.0]), 5.0)  # a constant stays constant from the first point
    s = smooth([0.0, 10.0], weight=0.5)
    assert np.isclose(s[0], 0.0) and np.isclose(s[1], (0.5 * 0.5 * 0 + 0.5 * 10) / 0.75)


def test_loss_curve_is_titled_after_the_run_and_plots_the_pseudo_weight(tmp_path):
    run = tmp_path / "20261130-baseline"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"run": {"variant": "baseline", "source_only": False, "iters": 300,
                                                         "seed": 0}, "model": {"backbone": "mit_b0"}}))
    log = run / "metrics.jsonl"
    _write_log(log, broken_tail=False)
    with_weights = [json.loads(ln) for ln in log.read_text().splitlines()]
    for rec in with_weights:
        if "loss/fusion" in rec:
            rec["pseudo/weight"] = min(1.0, rec["iter"] / 300)
    log.write_text("".join(json.dumps(r) + "\n" for r in with_weights))
    assert run_title(log) == "20261130-baseline: baseline, mit_b0, 300 iterations, seed 0"
    img = cv2.imread(str(loss_curve_png(log, run / "loss.png")))
    plain = tmp_path / "plain" / "metrics.jsonl"
    plain.parent.mkdir()
    _write_log(plain, broken_tail=False)
    assert run_title(plain) == "plain"  # no config.json: the folder name
    img_plain = cv2.imread(str(loss_curve_png(plain, tmp_path / "plain.png")))
    assert img.shape[0] > img_plain.shape[0]  # the pseudo-weight panel adds height
    # the pseudo-weight curve is drawn in C2 green (#2ca02c) in the middle panel
    green = np.all(np.abs(img.astype(int) - [44, 160, 44]) < 30, axis=2)  # BGR of #2ca02c
    rows = np.nonzero(green.any(1))[0]
    assert len(rows) and img.shape[0] * 0.35 < np.median(rows) < img.shape[0] * 0.75
