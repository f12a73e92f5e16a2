"""A convolution over the channel concatenation of several inputs, computed with XLA's
convolutions without the concatenation: conv(concat(a, b), k) = conv(a, k_a) + conv(b, k_b),
k split along its input channels.

The U-Net decoder's first convolution takes the upsampled features and the skip. On XLA:CPU
the split form made the U-Net's forward pass 1.19x and its train step 1.11x faster (Eigen's
kernels: the wider convolution runs at a lower rate, and the concatenation is one more pass
over the largest maps; `benchmarks/unet_step.py --only previous_concat`). oneDNN's kernels
(`cpu_convolutions("onednn")`) run the one wide convolution at the rate of the narrow ones, so
there it concatenates: one call instead of two (three instead of six in a gradient); the
U-Net's forward pass ran 1.06x and its train step 1.02x faster in separate processes run in
turn, 1.04x and 0.99x interleaved in one (`--only previous_concat`, 9 rounds).

The variables are `flax.linen.Conv`'s on the concatenation ("kernel" (KH, KW, sum of the
inputs' channels, features), "bias"), with its initializers, so checkpoints and weights of
either form load into the other.
"""

import functools
import operator
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax import lax

from segjax.layers.conv import onednn_selected, selected

_NHWC = ("NHWC", "HWIO", "NHWC")
_conv = selected(lax.conv_general_dilated)


class ConcatConv(nn.Module):
  """'SAME', stride-1 `flax.linen.Conv` applied to `jnp.concatenate(parts, -1)`; parts of
  shape (..., H, W, C_i) with the same leading axes (any number, none included).

  Attributes:
    features: output channels.
    kernel_size: (KH, KW).
    use_bias: add a bias per output channel.
    dtype: computation dtype (None: the inputs' and parameters' promoted type).
    param_dtype: parameter dtype.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, parts: Sequence[jax.Array]) -> jax.Array:
    channels = [p.shape[-1] for p in parts]
    kernel = self.param(
      "kernel",
      nn.linear.default_kernel_init,
      (*self.kernel_size, sum(channels), self.features),
      self.param_dtype,
    )
    bias = (
      self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
      if self.use_bias
      else None
    )
    *parts, kernel, bias = promote_dtype(*parts, kernel, bias, dtype=self.dtype)
    # As flax's Conv: any leading batch axes, none included (H, W, C), flattened to one.
    lead = parts[0].shape[:-3]
    parts = [part.reshape(-1, *part.shape[-3:]) for part in parts]
    conv = lambda x, k: _conv(x, k, (1, 1), "SAME", dimension_numbers=_NHWC)
    if onednn_selected():
      out = conv(jnp.concatenate(parts, -1), kernel)
    else:
      bounds = np.cumsum([0, *channels])
      out = functools.reduce(
        operator.add, (conv(p, kernel[:, :, a:b]) for p, a, b in zip(parts, bounds, bounds[1:]))
      )
    out = out.reshape(*lead, *out.shape[1:])
    return out if bias is None else out + bias
