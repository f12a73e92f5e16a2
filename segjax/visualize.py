"""Segmentation visualizations: image | ground truth | prediction side by side, as PNG."""

from __future__ import annotations

import numpy as np
from PIL import Image

from segjax.data.ops import IMAGENET_MEAN, IMAGENET_STD


def palette(num_classes: int, seed: int = 0) -> np.ndarray:
  """(num_classes + 1, 3) uint8 colours: black for class 0, distinct random colours after,
  and grey as the last row for the ignore label."""
  rng = np.random.default_rng(seed)
  colours = rng.integers(64, 256, size=(num_classes + 1, 3)).astype(np.uint8)
  colours[0] = 0
  colours[-1] = 128
  return colours


def colorize(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """(H, W) class ids -> (H, W, 3) uint8; ids outside [0, num_classes) show as grey."""
  mask = np.where((mask >= 0) & (mask < num_classes), mask, num_classes)
  return palette(num_classes)[mask]


def denormalize(image: np.ndarray) -> np.ndarray:
  return np.clip(image * np.asarray(IMAGENET_STD) + IMAGENET_MEAN, 0, 255).astype(np.uint8)


def side_by_side(image: np.ndarray, label: np.ndarray, prediction: np.ndarray,
                 num_classes: int) -> np.ndarray:
  """(H, 3W, 3) uint8 panel from a normalized image and two (H, W) class maps."""
  return np.concatenate([denormalize(image), colorize(label, num_classes),
                         colorize(prediction, num_classes)], axis=1)


def save_png(panel: np.ndarray, path: str) -> None:
  Image.fromarray(panel).save(path)
