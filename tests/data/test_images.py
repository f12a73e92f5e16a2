"""read_image (Pillow) against TensorFlow's decoders, which it replaced (segjax/data/images.py):
PNG exactly as tf.io.decode_image; JPEG exactly as libjpeg's accurate integer IDCT, which
tf.io.decode_image's default (the fast IDCT) differs from by a few levels."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from segjax.data.images import read_image


def _tf_decode(data: bytes, fmt: str) -> np.ndarray:
  if fmt == "JPEG":
    return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE").numpy()
  return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()


@pytest.mark.parametrize(
  "mode, fmt",
  [("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "JPEG"), ("L", "JPEG")],
)
@pytest.mark.parametrize("size", [(1, 1), (17, 33), (64, 48)])
def test_same_pixels_as_tensorflow(tmp_path, mode, fmt, size):
  rng = np.random.default_rng(hash((mode, fmt, size)) % 2**32)
  pixels = rng.integers(0, 256, (*size, 4), dtype=np.uint8)
  image = Image.fromarray(pixels, "RGBA").convert(mode)
  if mode == "P":
    image.putpalette(list(rng.integers(0, 256, 768, dtype=np.uint8)))
  path = tmp_path / f"x.{fmt.lower()}"
  image.save(path, format=fmt, quality=90)
  np.testing.assert_array_equal(read_image(str(path)), _tf_decode(path.read_bytes(), fmt))


def test_unreadable_files_are_named(tmp_path):
  text = tmp_path / "notes.png"
  text.write_text("not an image")
  with pytest.raises(ValueError, match=f"Cannot read image {text}"):
    read_image(str(text))
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buffer, format="PNG")
  truncated = tmp_path / "half.png"
  truncated.write_bytes(buffer.getvalue()[:40])
  with pytest.raises(ValueError, match=f"Cannot read image {truncated}"):
    read_image(str(truncated))


def test_jpeg_differs_from_tensorflows_default_by_a_few_levels(tmp_path):
  pixels = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / "x.jpg", quality=90)
  fast = tf.io.decode_image((tmp_path / "x.jpg").read_bytes(), channels=3).numpy()
  difference = np.abs(read_image(str(tmp_path / "x.jpg")).astype(int) - fast.astype(int))
  assert 0 < difference.max() <= 8
