"""Tests for segjax/visualize.py: instance drawing against hand-computed pixels."""

import numpy as np

from segjax import visualize
from segjax.data.ops import IMAGENET_MEAN, IMAGENET_STD

NAMES = ("background", "circle", "square")


def _square_mask(size, y1, x1, y2, x2):
  mask = np.zeros((size, size), bool)
  mask[y1:y2, x1:x2] = True
  return mask


def test_mask_is_blended_in_class_colour_and_box_outlined():
  image = np.zeros((32, 32, 3), np.uint8)
  mask = _square_mask(32, 10, 10, 30, 30)
  out = visualize.draw_instances(
    image,
    np.array([[8.0, 8.0, 31.0, 31.0]]),
    np.array([2]),
    mask[None],
    num_classes=3,
    class_names=NAMES,
    scale=2,
  )
  colour = visualize.palette(3)[2].astype(np.float64)
  assert out.shape == (64, 64, 3)
  np.testing.assert_array_equal(out[40, 40], np.round(0.5 * colour))  # Inside the mask.
  np.testing.assert_array_equal(out[18, 62], colour)  # Right edge of the box (x2 = 31 * 2).
  assert not out[4:14, 58].any()  # Above the box, right of its label: untouched.
  label = out[:16, 16:40]  # "square" on a colour-filled label box above the box's corner.
  assert (label == colour).all(-1).any() and (label != colour).any(-1).any()


def test_best_detection_is_drawn_on_top():
  image = np.zeros((32, 32, 3), np.uint8)
  masks = np.stack([_square_mask(32, 0, 0, 32, 32)] * 2)
  boxes = np.zeros((2, 4), np.float32)  # Labels at the top-left corner, away from (28, 28).
  colours = visualize.palette(3)[[1, 2]].astype(np.float64)
  out = visualize.draw_instances(
    image, boxes, np.array([1, 2]), masks, num_classes=3, scores=np.array([0.9, 0.3])
  )
  lower_first = 0.5 * (0.5 * colours[1]) + 0.5 * colours[0]  # Score 0.3 blended, then 0.9.
  np.testing.assert_array_equal(out[28, 28], np.round(lower_first))


def test_instance_panel_skips_invalid_truth_and_low_scores():
  size = 16
  image = ((np.full((size, size, 3), 100.0) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
  masks = np.stack([_square_mask(size, 2, 2, 6, 6), _square_mask(size, 9, 9, 14, 14)])
  boxes = np.array([[2.0, 2.0, 6.0, 6.0], [9.0, 9.0, 14.0, 14.0]], np.float32)
  truth = {
    "boxes": boxes,
    "classes": np.array([1, 2]),
    "instance_masks": masks,
    "valid": np.array([True, False]),
  }
  detections = {**truth, "valid": np.array([True, True]), "scores": np.array([0.9, 0.2])}
  panel = visualize.instance_panel(
    image, truth, detections, num_classes=3, class_names=NAMES, score_threshold=0.5, min_side=64
  )
  scale, title, gap = 4, visualize.TITLE_HEIGHT, 2
  side = size * scale
  assert panel.shape == (title + side, 3 * side + 2 * gap, 3)
  panel = panel[title:]
  plain = np.full((side, side, 3), 100, np.uint8)
  np.testing.assert_array_equal(panel[:, :side], plain)
  for third in (1, 2):  # The second instance is padding in the truth and scores 0.2.
    drawn = panel[:, third * (side + gap) : third * (side + gap) + side]
    np.testing.assert_array_equal(drawn[11 * scale, 11 * scale], plain[0, 0])
    assert not np.array_equal(drawn[4 * scale, 4 * scale], plain[0, 0])


def test_semantic_panel_is_upscaled_titled_and_has_a_legend_of_the_classes_shown():
  image = np.zeros((32, 48, 3), np.float32)
  label = np.zeros((32, 48), np.int64)
  label[:, 24:] = 2
  label[0, 0] = 255  # Ignored: grey, not in the legend.
  prediction = np.ones((32, 48), np.int64)
  panel = visualize.side_by_side(image, label, prediction, 4, class_names=NAMES + ("cross",))
  scale, title = 6, visualize.TITLE_HEIGHT  # 48 * 6 = 288 >= 256.
  colours = visualize.palette(4)
  truth = panel[title : title + 32 * scale, 48 * scale + 2 : 2 * 48 * scale + 2]
  np.testing.assert_array_equal(truth[scale, 0], colours[0])  # Background, black.
  np.testing.assert_array_equal(truth[0, 0], colours[-1])  # Ignore, grey.
  np.testing.assert_array_equal(truth[-1, -1], colours[2])
  assert (panel[:title] != 32).any(-1).any()  # Titles written on the strip.
  legend = panel[title + 32 * scale :]
  assert legend.shape[0] == 14 * 3 + 4  # Classes 0, 1 (prediction) and 2 (truth).
  for line, c in enumerate((0, 1, 2)):  # Each line's swatch has the class's colour.
    np.testing.assert_array_equal(legend[2 + 14 * line + 5, 6], colours[c])


def test_class_0_is_coloured_when_it_is_not_a_background():
  assert visualize.palette(3)[0].tolist() == [0, 0, 0]
  coloured = visualize.palette(3, background=False)
  assert coloured[0].tolist() == list(visualize.DISTINCT_COLOURS[0])
  assert len({tuple(c) for c in coloured[:3]}) == 3 and coloured[-1].tolist() == [128] * 3
  assert not visualize.has_background(("road", "sidewalk"))
  assert visualize.has_background(("Background", "pet")) and not visualize.has_background(None)
