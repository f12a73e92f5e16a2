"""Conv + norm (+ ReLU) blocks shared by the U-Nets, the FPN and the ROI heads.

Norms are `segjax.layers.norms`' ("bn", "frozen_bn", "gn", "none"); a conv followed by a norm
has no bias (the norm's shift makes it redundant), one without keeps it.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.layers import norms
from segjax.layers.batch_norm import BatchNorm
from segjax.layers.concat_conv import ConcatConv
from segjax.layers.conv import Conv, PlainConv

Array = jax.Array


class ConvBlock(nn.Module):
  """Two 3x3 'SAME' convolutions ("conv_0", "conv_1"), each followed by a norm ("norm_0",
  "norm_1") and ReLU: a U-Net level. The input is an array or a tuple or list of arrays (e.g.
  the upsampled features and the skip) that "conv_0" takes as their channel concatenation
  (`segjax.layers.concat_conv`: the same variables; with XLA's kernels, without concatenating).

  Attributes:
    features: output channels of both convolutions.
    norm: one of `norms.NORMS`.
    bn_momentum: BatchNorm running-average momentum.
    dtype: computation dtype; parameters stay float32.
  """

  features: int
  norm: str = "bn"
  bn_momentum: float = norms.BN_MOMENTUM
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array | Sequence[Array], *, train: bool) -> Array:
    for i in range(2):
      conv = ConcatConv if i == 0 and isinstance(x, tuple | list) else PlainConv
      x = conv(
        self.features,
        (3, 3),
        use_bias=self.norm == "none",
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name=f"conv_{i}",
      )(x)
      layer = norms.norm_layer(
        self.norm, train=train, dtype=self.dtype, name=f"norm_{i}", momentum=self.bn_momentum
      )
      if isinstance(layer, BatchNorm):
        x = layer(x, relu=True)  # Fused with the norm where it can be.
      else:
        x = nn.relu(x if layer is None else layer(x))
    return x


def conv_norm(
  x: Array,
  features: int,
  kernel: int,
  *,
  norm: str,
  train: bool,
  name: str,
  kernel_init: Any,
  dtype: Any,
  mask: Array | None = None,
) -> Array:
  """A `kernel` x `kernel` stride-1 'SAME' conv `name`, then, unless `norm` is "none", a norm
  `name_norm` (torchvision `Conv2dNormActivation(..., activation_layer=None)`).

  `mask`, broadcastable to `x`'s leading axes as `(N, 1, 1, 1)`, restricts BatchNorm's batch
  statistics to the rows it marks (padded ROIs must not count); with no row marked, all count
  (a mean over nothing would be NaN and poison the running averages); under pmap, each
  device's masked statistics are averaged. Call it inside a compact method: the modules belong
  to the caller. The conv is `segjax.layers.conv.Conv` (on CPU, the faster kernel gradient).
  """
  x = Conv(
    features,
    (kernel, kernel),
    padding="SAME",
    use_bias=norms.check_norm(norm) == "none",
    kernel_init=kernel_init,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )(x)
  layer = norms.norm_layer(norm, train=train, dtype=dtype, name=f"{name}_norm")
  if layer is None:
    return x
  if norm == "bn" and train and mask is not None:
    mask = jnp.asarray(mask, bool)
    return layer(x, mask=mask | ~jnp.any(mask))
  return layer(x)


def conv_stack(
  x: Array,
  dims: tuple[int, ...],
  *,
  prefix: str,
  norm: str,
  train: bool,
  dtype: Any,
  kernel_init: Any = norms.msra_fill,
  mask: Array | None = None,
) -> Array:
  """3x3 `conv_norm`s of widths `dims`, each followed by ReLU, named "{prefix}1", ... (the
  convs of detectron2's `FastRCNNConvFCHead` and `MaskRCNNConvUpsampleHead`)."""
  for i, d in enumerate(dims):
    x = nn.relu(
      conv_norm(
        x,
        d,
        3,
        norm=norm,
        train=train,
        name=f"{prefix}{i + 1}",
        kernel_init=kernel_init,
        dtype=dtype,
        mask=mask,
      )
    )
  return x
