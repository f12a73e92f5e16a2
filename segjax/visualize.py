"""Segmentation visualizations: image | ground truth | prediction side by side, as PNG.

Panels are upscaled (nearest neighbour, an integer factor) until their longer side is at least
256 pixels, and titled. Semantic: class maps coloured by `palette`, with a legend of the classes
shown. Instances: masks blended in their class's colour, box outlines, and "name score" labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segjax.data.ops import IMAGENET_MEAN, IMAGENET_STD

# Matplotlib's "tab10" colours, for the first ten classes.
DISTINCT_COLOURS = (
  (31, 119, 180),
  (255, 127, 14),
  (44, 160, 44),
  (214, 39, 40),
  (148, 103, 189),
  (140, 86, 75),
  (227, 119, 194),
  (188, 189, 34),
  (23, 190, 207),
  (255, 187, 120),
)


BACKGROUND_NAMES = ("background", "_background_", "bg", "backgroud")


def has_background(class_names: Sequence[str] | None) -> bool:
  """Whether class 0 is a background (named so), drawn black; otherwise it gets a colour."""
  return bool(class_names) and str(class_names[0]).lower() in BACKGROUND_NAMES


def palette(num_classes: int, seed: int = 0, *, background: bool = True) -> np.ndarray:
  """(num_classes + 1, 3) uint8 colours, and grey as the last row for the ignore label:
  with `background`, black for class 0 and `DISTINCT_COLOURS` from class 1; without, the
  distinct colours from class 0; random colours after them."""
  rng = np.random.default_rng(seed)
  colours = rng.integers(64, 256, size=(num_classes + 1, 3)).astype(np.uint8)
  first = 1 if background else 0
  distinct = max(min(len(DISTINCT_COLOURS), num_classes - first), 0)
  colours[first : first + distinct] = DISTINCT_COLOURS[:distinct]
  if background:
    colours[0] = 0
  colours[-1] = 128
  return colours


def colorize(mask: np.ndarray, num_classes: int, *, background: bool = True) -> np.ndarray:
  """(H, W) class ids -> (H, W, 3) uint8; ids outside [0, num_classes) show as grey."""
  mask = np.where((mask >= 0) & (mask < num_classes), mask, num_classes)
  return palette(num_classes, background=background)[mask]


def upscale(image: np.ndarray, scale: int) -> np.ndarray:
  return np.repeat(np.repeat(image, scale, 0), scale, 1)


def scale_for(shape: Sequence[int], min_side: int = 256) -> int:
  """The integer factor that brings the longer side of `shape` (h, w) to at least `min_side`."""
  return max(1, -(-min_side // max(shape[:2])))


TITLE_HEIGHT = 16


def titled(panels: Sequence[np.ndarray], titles: Sequence[str]) -> np.ndarray:
  """Panels (H, W_i, 3) side by side, 2 px apart, each under a strip with its title."""
  font = ImageFont.load_default()
  columns = []
  for panel, title in zip(panels, titles):
    strip = Image.new("RGB", (panel.shape[1], TITLE_HEIGHT), (32, 32, 32))
    ImageDraw.Draw(strip).text((4, 2), title, fill=(255, 255, 255), font=font)
    columns.append(np.concatenate([np.asarray(strip), panel], axis=0))
    columns.append(np.full((columns[-1].shape[0], 2, 3), 255, np.uint8))
  return np.concatenate(columns[:-1], axis=1)


def legend(
  classes: Sequence[int], colours: np.ndarray, class_names: Sequence[str] | None, width: int
) -> np.ndarray:
  """(h, >= width, 3) uint8: one line per class, a colour swatch and the class's name."""
  font = ImageFont.load_default()
  texts = [class_name(class_names, c) for c in classes]
  line = 14
  widths = [
    ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), t, font=font)[2] for t in texts
  ]
  width = max([width] + [w + line + 6 for w in widths])
  image = Image.new("RGB", (width, line * len(classes) + 4))
  draw = ImageDraw.Draw(image)
  for i, (c, text) in enumerate(zip(classes, texts)):
    y = 2 + i * line
    draw.rectangle(
      (2, y, line - 1, y + line - 3),
      fill=tuple(int(v) for v in colours[c]),
      outline=(255, 255, 255),
    )
    draw.text((line + 3, y), text, fill=(255, 255, 255), font=font)
  return np.asarray(image)


def stack(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
  """`top` above `bottom`, the narrower padded on the right with black."""
  width = max(top.shape[1], bottom.shape[1])
  pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)))  # noqa: E731
  return np.concatenate([pad(top), pad(bottom)], axis=0)


def denormalize(image: np.ndarray) -> np.ndarray:
  return np.clip(np.round(image * np.asarray(IMAGENET_STD) + IMAGENET_MEAN), 0, 255).astype(
    np.uint8
  )


def side_by_side(
  image: np.ndarray,
  label: np.ndarray,
  prediction: np.ndarray,
  num_classes: int,
  *,
  class_names: Sequence[str] | None = None,
  min_side: int = 256,
) -> np.ndarray:
  """A uint8 panel from a normalized image (H, W, 3) and two (H, W) class maps: image |
  ground truth | prediction, upscaled (`scale_for`), titled, above a legend of the classes in
  either map (ignored pixels grey)."""
  background = has_background(class_names)
  scale = scale_for(image.shape, min_side)
  maps = [colorize(m, num_classes, background=background) for m in (label, prediction)]
  top = titled(
    [upscale(p, scale) for p in (denormalize(image), *maps)],
    ("image", "ground truth", "prediction"),
  )
  shown = np.union1d(np.unique(label), np.unique(prediction))
  classes = [int(c) for c in shown if 0 <= c < num_classes]
  return stack(
    top, legend(classes, palette(num_classes, background=background), class_names, top.shape[1])
  )


def save_png(panel: np.ndarray, path: str) -> None:
  Image.fromarray(panel).save(path)


def class_name(class_names: Sequence[str] | None, label: int) -> str:
  if class_names is not None and 0 <= label < len(class_names):
    return str(class_names[label])
  return f"class {label}"


def draw_instances(
  image: np.ndarray,
  boxes: np.ndarray,
  classes: np.ndarray,
  masks: np.ndarray,
  *,
  num_classes: int,
  class_names: Sequence[str] | None = None,
  scores: np.ndarray | None = None,
  alpha: float = 0.5,
  scale: int = 1,
) -> np.ndarray:
  """Instances drawn on `image` (H, W, 3) uint8, returned as (scale H, scale W, 3) uint8.

  Args:
    boxes: (N, 4) `[x1, y1, x2, y2]` pixels of `image`; classes: (N,) labels in 1..K;
    masks: (N, H, W) bool; scores: (N,) or None (ground truth: names without scores).
    num_classes: K + 1 (background included), the size of the colour palette.
    class_names: names indexed by label (index 0 the background), or None for "class l".
    alpha: mask opacity.
    scale: integer upscaling (nearest neighbour) before drawing outlines and text.

  Masks are blended in ascending score order, so the best detection is on top.
  """
  colours = palette(num_classes)
  out = np.repeat(np.repeat(image, scale, 0), scale, 1).astype(np.float32)
  order = np.argsort(scores, kind="stable") if scores is not None else np.arange(len(boxes))
  for i in order:
    mask = np.repeat(np.repeat(masks[i].astype(bool), scale, 0), scale, 1)
    out[mask] = (1 - alpha) * out[mask] + alpha * colours[classes[i] % len(colours)]
  panel = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(panel)
  font = ImageFont.load_default()
  for i in order:
    colour = tuple(int(c) for c in colours[classes[i] % len(colours)])
    x1, y1, x2, y2 = (float(v) * scale for v in boxes[i])
    draw.rectangle((x1, y1, x2, y2), outline=colour, width=max(1, scale // 2))
    text = class_name(class_names, int(classes[i]))
    if scores is not None:
      text += f" {float(scores[i]):.2f}"
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    ty = y1 - (bottom - top) - 2 if y1 >= bottom - top + 2 else y1
    draw.rectangle((x1, ty, x1 + right - left + 2, ty + bottom - top + 2), fill=colour)
    draw.text((x1 + 1 - left, ty + 1 - top), text, fill=(0, 0, 0), font=font)
  return np.asarray(panel)


def instance_panel(
  image: np.ndarray,
  truth: dict,
  detections: dict,
  *,
  num_classes: int,
  class_names: Sequence[str] | None = None,
  score_threshold: float = 0.5,
  min_side: int = 256,
) -> np.ndarray:
  """image | ground truth | detections above `score_threshold`, as one uint8 panel.

  `image` is normalized (H, W, 3); `truth` holds `boxes`, `classes`, `instance_masks` and
  `valid` of that image, `detections` also `scores`; both in the image's pixels. The panel is
  upscaled by the integer factor that brings the longer side to at least `min_side`.
  """
  image = denormalize(image)
  scale = scale_for(image.shape, min_side)

  def draw(instances, keep, scores=None):
    keep = np.asarray(keep, bool)
    return draw_instances(
      image,
      np.asarray(instances["boxes"])[keep],
      np.asarray(instances["classes"])[keep],
      np.asarray(instances["instance_masks"])[keep],
      num_classes=num_classes,
      class_names=class_names,
      scores=None if scores is None else np.asarray(scores)[keep],
      scale=scale,
    )

  keep = np.asarray(detections["valid"]) & (np.asarray(detections["scores"]) >= score_threshold)
  return titled(
    [
      upscale(image, scale),
      draw(truth, truth["valid"]),
      draw(detections, keep, detections["scores"]),
    ],
    ("image", "ground truth", f"detections (score >= {score_threshold:g})"),
  )


def semantic_overlay(
  image: np.ndarray,
  labels: np.ndarray,
  *,
  num_classes: int,
  class_names: Sequence[str] | None = None,
  alpha: float = 0.5,
) -> np.ndarray:
  """`image` (H, W, 3) uint8 with the class map `labels` (H, W) blended in its `palette`
  colours (background, class 0, left unblended), above a legend of the classes present:
  a colour swatch and the class name per line. The panel is widened if a name needs it."""
  background = class_names is None or has_background(class_names)
  colours = palette(num_classes, background=background)
  blended = image.astype(np.float32)
  painted = labels > 0 if background else np.ones(labels.shape, bool)
  blended[painted] = (1 - alpha) * blended[painted] + alpha * colours[
    np.where((labels >= 0) & (labels < num_classes), labels, num_classes)
  ][painted]
  top = np.clip(np.round(blended), 0, 255).astype(np.uint8)
  present = [int(c) for c in np.unique(labels) if 0 <= c < num_classes]
  return stack(top, legend(present, colours, class_names, top.shape[1]))
