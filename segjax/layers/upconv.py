"""2x up-convolution (transposed convolution, kernel 2, stride 2) as a matmul and a reshape.

With kernel size equal to stride the output windows do not overlap: output pixel
`(2i + a, 2j + b)` is `x[i, j] @ kernel[1 - a, 1 - b] + bias`. Written as one einsum and a
depth-to-space reshape, it computes exactly what `flax.linen.ConvTranspose(features, (2, 2),
strides=(2, 2))` computes with the same parameters (same names, shapes and flipped-kernel
convention, so checkpoints are interchangeable), but XLA lowers it to a plain matrix product:
on CPU the transposed convolution's gradient is a dilated convolution that ran ~30x slower than
the forward pass (`benchmarks/upconv.py`). Where oneDNN's convolutions are selected
(`segjax.layers.conv.cpu_convolutions`), the product is oneDNN's 1x1 convolution to `4 O`
channels instead: NHWC in and out, where XLA's matrix product transposed its operands and result.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from segjax.layers import conv

Array = jax.Array
_conv = conv.selected(lax.conv_general_dilated)


def upconv2x(x: Array, kernel: Array, bias: Array | None = None) -> Array:
  """`(..., H, W, C)` to `(..., 2H, 2W, O)` with a `(2, 2, C, O)` transposed-conv kernel."""
  *lead, h, w, c = x.shape
  o = kernel.shape[-1]
  if conv.onednn_selected() and x.dtype == kernel.dtype == jnp.float32:
    taps = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(1, 1, c, 4 * o)  # (a, b, o) last.
    flat = x.reshape(-1, h, w, c)
    y = _conv(flat, taps, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y.reshape(-1, h, w, 2, 2, o).transpose(0, 1, 3, 2, 4, 5).reshape(*lead, h, 2, w, 2, o)
  else:
    y = jnp.einsum("...hwc,abco->...hawbo", x, kernel[::-1, ::-1])
  y = y.reshape(*lead, 2 * h, 2 * w, o)
  return y if bias is None else y + bias


class UpConv2x(nn.Module):
  """Drop-in `nn.ConvTranspose(features, (2, 2), strides=(2, 2))` (padding "SAME" or "VALID",
  identical for this kernel), with parameters "kernel" `(2, 2, C, features)` and "bias".

  Attributes:
    features: output channels.
    use_bias: whether to add a bias.
    kernel_init, bias_init: as in `nn.ConvTranspose`.
    dtype: computation dtype; parameters are `param_dtype`.
  """

  features: int
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param(
      "kernel", self.kernel_init, (2, 2, x.shape[-1], self.features), self.param_dtype
    )
    bias = (
      self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      if self.use_bias
      else None
    )
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return upconv2x(x, kernel, bias)
