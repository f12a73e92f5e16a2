"""2x upsampling to a channel count, by a learned or a fixed method: one function that the
U-Net's decoder and the Mask R-CNN mask head share, so either can swap its upsampling by a
config key.

  * "transpose": a 2x2 transposed convolution, stride 2 (`UpConv2x`; U-Net's up-convolution,
    detectron2's mask-head `deconv`).
  * "nearest" / "bilinear": a 1x1 conv to `features`, then a fixed 2x resize. The conv runs
    first because both are linear per pixel / per channel and so commute; it is 4x cheaper at
    the low resolution.
"""

from typing import Any

import jax
import jax.numpy as jnp

from segjax.layers import unpool
from segjax.layers.conv import PlainConv
from segjax.layers.upconv import UpConv2x

METHODS = ("transpose", "nearest", "bilinear")


def check_method(method: str, field: str) -> None:
  if method not in METHODS:
    raise ValueError(f"Unknown {field} {method!r}; expected one of {METHODS}.")


def upsample2x(
  x: jax.Array, features: int, method: str, *, name: str, dtype: Any, kernel_init=None
) -> jax.Array:
  """`(B, h, w, C)` -> `(B, 2h, 2w, features)` by `method` (module docstring), its one
  parametrised layer named `name` in the calling module; call it inside a compact method.
  `kernel_init`: that layer's initializer (None: flax's default)."""
  check_method(method, "upsampling")
  init = {} if kernel_init is None else {"kernel_init": kernel_init}
  if method == "transpose":
    return UpConv2x(features, dtype=dtype, name=name, **init)(x)
  x = PlainConv(features, (1, 1), dtype=dtype, param_dtype=jnp.float32, name=name, **init)(x)
  if method == "nearest":
    return unpool.nearest_unpool(x, 2)
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), method="bilinear")
