"""Feature Pyramid Network (Lin et al. 2017, "Feature Pyramid Networks", arXiv:1612.03144).

As detectron2 `modeling/backbone/fpn.py` (and torchvision `FeaturePyramidNetwork`): each
backbone stage C_l gets a lateral 1x1 conv to `out_channels`; from the coarsest level down,
the running top-down map is upsampled 2x (nearest) and added to the next lateral; a 3x3 conv
on each sum gives P_l. P6 (the RPN's extra level, `LastLevelMaxPool`) is a max pool of P5
with kernel 1 and stride 2, i.e. every other pixel.

With a `norm` other than "none" (torchvision `maskrcnn_resnet50_fpn_v2`: "bn"; detectron2's GN
recipes: "gn"), every conv is bias-free and followed by that norm
(`segjax.layers.conv_blocks.conv_norm`), as torchvision's
`Conv2dNormActivation(..., activation_layer=None)` and detectron2's `FPN(norm=...)`.

Shapes: B batch; level l has stride 2**l and `ceil(H / 2**l) x ceil(W / 2**l)` pixels.
"""

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.layers import norms
from segjax.layers.conv_blocks import conv_norm

Array = jax.Array


def _upsample_to(x: Array, shape: tuple[int, int]) -> Array:
  """Nearest 2x upsampling `(B, h, w, C)`, cropped to `shape` when the finer map is odd."""
  x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x[:, : shape[0], : shape[1]]


def _level(key: str) -> int:
  return int(re.sub(r"^[a-zA-Z]+", "", key))


class FPN(nn.Module):
  """Top-down feature pyramid P2..P6 over ResNet stages C2..C5.

  Attributes:
    out_channels: channels of every pyramid level (256).
    norm: "none" (convs with biases, the default), "bn", "gn" or "frozen_bn" after every conv
      (`segjax.layers.norms`; torchvision v2: "bn").
    dtype: computation dtype; parameters stay float32.
  """

  out_channels: int = 256
  norm: str = "none"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, features: Mapping[str, Array], *, train: bool = False
  ) -> tuple[dict[str, Array], dict[str, Array]]:
    """`{"c2": (B, H/4, W/4, C2), ..., "c5": ...}` to `({"p2": ..., "p6": ...}, aux)`.

    Every `p_l` has `out_channels`; `aux` holds the top-down sums before the 3x3 convs
    (`"top_down_l"`). `train` only switches BatchNorm (norm="bn").
    """
    norms.check_norm(self.norm, "fpn.norm")
    levels = sorted(_level(k) for k in features)
    if levels != list(range(levels[0], levels[0] + len(levels))):
      raise ValueError(f"FPN needs consecutive levels, got {sorted(features)}")
    by_level = {_level(k): v for k, v in features.items()}
    dense = lambda x, kernel, name: conv_norm(
      x,
      self.out_channels,
      kernel,
      norm=self.norm,
      train=train,
      name=name,
      kernel_init=norms.xavier_fill,
      dtype=self.dtype,
    )
    outputs, aux = {}, {}
    top_down = None
    for level in reversed(levels):
      lateral = dense(by_level[level].astype(self.dtype), 1, f"lateral_{level}")
      if top_down is not None:
        lateral = lateral + _upsample_to(top_down, lateral.shape[1:3])
      top_down = lateral
      aux[f"top_down_{level}"] = top_down
      outputs[f"p{level}"] = dense(top_down, 3, f"output_{level}")
    last = levels[-1]
    outputs[f"p{last + 1}"] = outputs[f"p{last}"][:, ::2, ::2]
    return dict(sorted(outputs.items(), key=lambda kv: _level(kv[0]))), aux
