"""U-Net semantic segmentation (Ronneberger, Fischer and Brox, 2015, arXiv:1505.04597).

An encoder of `depth` levels (two 3x3 convs, then 2x2 max pooling; width doubling per level),
a bottleneck, and a mirrored decoder that upsamples, concatenates the encoder features of the
same level (skip connection) and applies two 3x3 convs. Unlike the paper, convolutions use
'SAME' padding, so for any H, W divisible by 2**depth the logits have the input's size.

Decoder upsampling, chosen by `upsampling`:
  * "transpose": 2x2 transposed convolution, stride 2 (the paper's "up-convolution").
  * "max_unpool": a 1x1 conv to the skip's width, then max unpooling with the indices
    remembered by the encoder's pooling at that level (SegNet, Badrinarayanan et al., 2015).
  * "nearest" / "bilinear": a 1x1 conv to the skip's width, then a fixed resize. The 1x1 conv
    runs before the resize because both are linear per pixel / per channel and so commute;
    it is 4x cheaper at the low resolution.

Shapes: B batch, H, W image size, K classes.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.layers import norms, pool, unpool
from segjax.layers.conv import PlainConv
from segjax.layers.conv_blocks import ConvBlock
from segjax.layers.upsample import upsample2x

UPSAMPLINGS = ("transpose", "max_unpool", "nearest", "bilinear")


class UpBlock(nn.Module):
  """Upsamples by 2, concatenates the skip features, then a `ConvBlock`.

  Attributes:
    features: output channels; also the channels the upsampled input is brought to.
    upsampling: one of `UPSAMPLINGS`.
    norm: one of `segjax.layers.norms.NORMS`.
    bn_momentum: BatchNorm running-average momentum.
    dtype: computation dtype.
  """

  features: int
  upsampling: str = "transpose"
  norm: str = "bn"
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, skip: jax.Array, *, train: bool, pool_indices: jax.Array | None = None
  ) -> jax.Array:
    """x: (B, h, w, C_in); skip: (B, 2h, 2w, features); pool_indices: (B, h, w, features)."""
    if self.upsampling == "max_unpool":
      if pool_indices is None:
        raise ValueError("upsampling='max_unpool' needs the encoder's pool_indices.")
      x = PlainConv(
        self.features, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, name="upsample"
      )(x)
      x = unpool.max_unpool(x, pool_indices, skip.shape)
    else:  # segjax.layers.upsample: "transpose", "nearest" or "bilinear".
      x = upsample2x(x, self.features, self.upsampling, name="upsample", dtype=self.dtype)
    # Kept only when "intermediates" is mutable: lets tests and debugging see the upsampling.
    self.sow("intermediates", "upsampled", x)
    return ConvBlock(
      self.features,
      norm=self.norm,
      bn_momentum=self.bn_momentum,
      dtype=self.dtype,
      name="conv_block",
    )((x, skip.astype(x.dtype)), train=train)


class UNet(nn.Module):
  """U-Net returning per-pixel class logits and named intermediate features.

  Attributes:
    num_classes: K, the number of output classes.
    depth: number of pooling steps; H and W must be divisible by 2**depth.
    base_width: channels of the first level; level i has base_width * 2**i, the bottleneck
      base_width * 2**depth.
    norm: "bn" (BatchNorm, running statistics in the "batch_stats" collection), "gn"
      (GroupNorm with min(32, C) groups, or the largest divisor of C below that), "none" or
      "frozen_bn" (`segjax.layers.norms`).
    dropout_rate: dropout after the bottleneck (paper: "at the end of the contracting path");
      needs a "dropout" rng when training with a rate > 0.
    upsampling: "transpose", "max_unpool", "nearest" or "bilinear" (see module docstring).
    bn_momentum: BatchNorm running-average momentum.
    dtype: computation dtype (e.g. jnp.bfloat16); parameters are always float32 and the
      logits are returned as float32.
  """

  task: ClassVar[str] = "semantic"

  num_classes: int
  depth: int = 4
  base_width: int = 64
  norm: str = "bn"
  dropout_rate: float = 0.0
  upsampling: str = "transpose"
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @property
  def stride(self) -> int:
    """What the input's height and width must be multiples of: 2**depth."""
    return 2**self.depth

  def _check(self, x: jax.Array) -> None:
    norms.check_norm(self.norm)
    if self.upsampling not in UPSAMPLINGS:
      raise ValueError(f"Unknown upsampling {self.upsampling!r}; expected one of {UPSAMPLINGS}.")
    if self.depth < 0:
      raise ValueError(f"depth must be >= 0, got {self.depth}.")
    if x.ndim != 4:
      raise ValueError(f"UNet expects images of shape (B, H, W, C), got {x.shape}.")
    h, w = x.shape[1:3]
    factor = 2**self.depth
    if h % factor or w % factor:
      raise ValueError(
        f"UNet with depth={self.depth} needs H and W divisible by 2**depth={factor}; "
        f"got an input of size H={h}, W={w}."
      )

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Maps images (B, H, W, C) to logits (B, H, W, K) float32 and a dict of features.

    The aux dict holds "encoder_{i}" (B, H/2**i, W/2**i, base_width*2**i) before pooling,
    "bottleneck" (B, H/2**depth, W/2**depth, base_width*2**depth) after dropout, and
    "decoder_{i}" with the same shape as "encoder_{i}".
    """
    self._check(x)
    block_kw = dict(norm=self.norm, bn_momentum=self.bn_momentum, dtype=self.dtype)
    aux = {}
    skips, all_indices = [], []
    for i in range(self.depth):
      x = ConvBlock(self.base_width * 2**i, name=f"down_{i}", **block_kw)(x, train=train)
      aux[f"encoder_{i}"] = x
      skips.append(x)
      if self.upsampling == "max_unpool":
        x, indices = unpool.max_pool_with_argmax(x, 2)
        all_indices.append(indices)
      else:
        x = pool.max_pool_2x2(x)
        all_indices.append(None)

    x = ConvBlock(self.base_width * 2**self.depth, name="bottleneck", **block_kw)(x, train=train)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    aux["bottleneck"] = x

    for i in reversed(range(self.depth)):
      x = UpBlock(self.base_width * 2**i, upsampling=self.upsampling, name=f"up_{i}", **block_kw)(
        x, skips[i], train=train, pool_indices=all_indices[i]
      )
      aux[f"decoder_{i}"] = x

    logits = PlainConv(
      self.num_classes, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, name="head"
    )(x)
    return logits.astype(jnp.float32), aux
