"""pipeline.synthetic scene + render: labelled 3-D street polygons, projection, drawing order, shading."""

from __future__ import annotations

import numpy as np
import pytest
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.preparation.json2labelImg import createLabelImage

from pipeline.synthetic.render import (
    DAY,
    NIGHT,
    CompiledScene,
    View,
    clip_near,
    clip_rect,
    label_image,
    polygon_objects,
    project,
    rasterize,
    render_radiance,
)
from pipeline.synthetic.sample import CITYSCAPES_K
from pipeline.synthetic.scene import CITYSCAPES_RIG, DSEC_RIG, Scene, Trajectory, _Builder, rect, street_scene, train_id

EVENT_VIEW = View(np.array([[580.0, 0, 330], [0, 580.0, 225], [0, 0, 1]]), (640, 480))


def test_class_coverage_and_no_truck_at_night():
    day, night = set(), set()
    for seed in range(25):
        day |= street_scene(np.random.default_rng(seed), 60, night=False, rig=CITYSCAPES_RIG).labels()
        night |= street_scene(np.random.default_rng(100 + seed), 60, night=True, rig=DSEC_RIG).labels()
    common = {"road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
              "vegetation", "terrain", "sky", "person", "car", "rider", "bicycle", "motorcycle", "bus"} - {"sky"}
    assert common <= day and common <= night
    assert "truck" in day and "truck" not in night
    assert {"ego vehicle", "static"} <= day
    with pytest.raises(ValueError, match="truck"):
        _Builder(np.random.default_rng(0), night=True).frontal("truck", rect(0, 1, 0, 1), 0, 5, (1, 1, 1))


def test_train_ids():
    assert train_id("road") == 0 and train_id("bicycle") == 18 and train_id("sky") == 10
    assert train_id("ego vehicle") == 255 and train_id("out of roi") == 255 and train_id("static") == 255


def test_clipping():
    tri = np.array([[0.0, 0, -1], [1, 0, 2], [-1, 0, 2]])
    c = clip_near(tri, 0.5)
    assert c[:, 2].min() >= 0.5 - 1e-12 and len(c) == 4
    sq = clip_rect(np.array([[-5.0, -5], [5, -5], [5, 5], [-5, 5]]), 0, 0, 3, 3)
    assert sq.min() >= 0 and sq.max() <= 3 and len(sq) == 4


def _two_boxes(near_first: bool) -> Scene:
    """A red box at 10 m partly in front of a blue box at 20 m (listed in either order)."""
    b = _Builder(np.random.default_rng(0), night=False)
    parts = [("car", 10.0), ("bus", 20.0)]
    for label, z in parts if near_first else parts[::-1]:
        b.frontal(label, rect(-1, 1, 0.5, 2.5), 1.2 if label == "car" else 0.0, z, (0.5, 0.5, 0.5))
    return Scene(b.surfaces, [], Trajectory(speed=0.0, x=0.0, height=1.5, yaw_amp=0.0, sway_amp=0.0))


@pytest.mark.parametrize("near_first", [True, False])
def test_painter_order_is_by_depth(near_first):
    cs = CompiledScene(_two_boxes(near_first))
    proj = project(cs, 0.0, EVENT_VIEW)
    lab = label_image(cs, proj, rasterize(proj, EVENT_VIEW.size))
    # The car (x 0.2..2.2 m at 10 m) overlaps the bus (x -1..1 m at 20 m) at u ~ 342..359: car wins.
    v = 225  # camera height: Y = -1.5 m is on the horizon row
    assert lab[v, 350] == train_id("car")
    assert lab[v, 400] == train_id("car")
    assert lab[v, 310] == train_id("bus")
    assert lab[5, 5] == train_id("sky")


def test_projection_matches_pinhole():
    cs = CompiledScene(_two_boxes(True))
    proj = project(cs, 0.0, EVENT_VIEW)
    car = proj.polygons[list(cs.labels[i] for i in proj.index).index("car")]
    # Corner (x=0.2, height 2.5 m => Y = -2.5) at Z = 10, camera at height 1.5.
    expected = [330 + 580 * 0.2 / 10, 225 + 580 * (-2.5 + 1.5) / 10]
    assert np.min(np.linalg.norm(car - expected, axis=1)) < 1e-6


def test_polygons_json_matches_raster():
    """The Cityscapes JSON (drawn with cityscapesscripts) and our rasteriser agree on nearly every pixel."""
    scene = street_scene(np.random.default_rng(4), 60, night=False, rig=CITYSCAPES_RIG)
    cs = CompiledScene(scene)
    view = View(CITYSCAPES_K, (2048, 1024))
    proj = project(cs, 1.0, view)
    ours = label_image(cs, proj, rasterize(proj, view.size))
    ann = Annotation()
    ann.fromJsonText(__import__("json").dumps({"imgWidth": 2048, "imgHeight": 1024,
                                                 "objects": polygon_objects(cs, proj, view.size)}))
    theirs = np.array(createLabelImage(ann, "trainIds"))
    assert (ours == theirs).mean() > 0.97


def test_shading_day_and_night():
    scene = street_scene(np.random.default_rng(6), 60, night=True, rig=DSEC_RIG)
    cs = CompiledScene(scene)
    day, _, ids = render_radiance(cs, 0.5, EVENT_VIEW, DAY)
    night, _, _ = render_radiance(cs, 0.5, EVENT_VIEW, NIGHT)
    mono, _, _ = render_radiance(cs, 0.5, EVENT_VIEW, NIGHT, mono=True)
    assert day.shape == (480, 640, 3) and mono.shape == (480, 640, 1)
    assert np.isfinite(day).all() and np.isfinite(night).all() and (night >= 0).all()
    assert night.mean() < 0.3 * day.mean()
    lum = 0.3 * night[..., 0] + 0.59 * night[..., 1] + 0.11 * night[..., 2]
    assert np.allclose(mono[..., 0], lum, rtol=1e-4, atol=1e-6)
    # Texture: a surface is not flat-shaded (the per-class textures move with it and make events).
    road = ids == ids[400, 320]
    assert day[..., 1][road].std() > 0.01
