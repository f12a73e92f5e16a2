"""Reading image files into uint8 RGB arrays, with errors that name the file.

Used inside tf.data (through `tf.numpy_function`) by the folder and COCO sources, and by
prediction on users' images, so that all three see the same pixels. Unlike
`tf.io.decode_image`, Pillow's errors say which file is truncated or not an image. PNGs decode
to the same pixels as with TensorFlow; JPEGs as TensorFlow's `dct_method="INTEGER_ACCURATE"`
(libjpeg's accurate IDCT, as torchvision's PIL-based pipelines), a few levels away from
`tf.io.decode_image`'s fast default (tests/data/test_images.py).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def read_image(path: str) -> np.ndarray:
  """uint8 (H, W, 3): grey expanded, alpha dropped, 16-bit scaled to 8 bits; EXIF orientation
  is ignored, as by TensorFlow (masks are not rotated either)."""
  try:
    with Image.open(path) as image:
      image.load()
      if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = (np.asarray(image, np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
      return np.asarray(image.convert("RGB"))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"Cannot read image {path}: {e}") from None
