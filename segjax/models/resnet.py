"""ResNet backbone for detection (He et al. 2016, "Deep Residual Learning", arXiv:1512.03385).

torchvision layout (`torchvision.models.resnet`, the "v1.5" ResNet): a 7x7 stride-2 stem conv
and a 3x3 stride-2 max pool, then stages res2..res5 of basic blocks (ResNet-18/34: two 3x3
convs) or bottleneck blocks (ResNet-50/101: 1x1, 3x3, 1x1 with 4x expansion, the stride in the
3x3 conv), a projection shortcut (1x1 conv + norm) where the shape changes. Padding is
symmetric as in torchvision, so an odd-sized input gives `ceil(size / stride)` features like
'SAME' padding but with torchvision's sampling positions (pretrained weights port as they are).

Normalization, chosen by `norm` (detectron2 `MODEL.RESNETS.NORM`):
  * "frozen_bn": `segjax.layers.norms.FrozenBatchNorm`, fixed scale, bias, mean and variance
    (the detection default: batches of 2 images per device are too small for batch
    statistics). The four
    vectors live in the "batch_stats" collection and are never updated nor trained, so they
    are not counted as parameters, as torchvision counts its `FrozenBatchNorm2d` buffers.
  * "bn": BatchNorm (scale/bias in "params", running statistics in "batch_stats"); under pmap
    the batch statistics are means over all devices, as under jit (`segjax.layers.norms`).
  * "gn": GroupNorm with 32 groups (or the largest divisor of the channels below that).
  * "none": no normalization (the convs stay bias-free).

`freeze_at` (detectron2 `MODEL.BACKBONE.FREEZE_AT`): 0 trains everything, 1 freezes the stem,
k >= 2 also freezes res2..res_k: `stop_gradient` on their output, and their BatchNorm (if any)
uses running statistics. Frozen weights get zero gradients; exclude them from weight decay in
the optimizer if they must not move at all.

Shapes: B batch, H, W image size; outputs C2..C5 have strides 4, 8, 16, 32.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.layers import norms
from segjax.layers.conv import Conv

Array = jax.Array

# depth -> (block kind, blocks per stage res2..res5)
DEPTHS = {
  18: ("basic", (2, 2, 2, 2)),
  34: ("basic", (3, 4, 6, 3)),
  50: ("bottleneck", (3, 4, 6, 3)),
  101: ("bottleneck", (3, 4, 23, 3)),
}
BOTTLENECK_EXPANSION = 4


def _norm(kind: str, **kwargs):
  """`norms.norm_layer`, the identity for "none"."""
  return norms.norm_layer(kind, **kwargs) or (lambda x: x)


def conv(features: int, kernel: int, stride: int = 1, *, dtype: Any, name: str) -> nn.Conv:
  """Bias-free conv with torchvision's symmetric padding `kernel // 2` (and, on CPU, the
  faster kernel gradient of `segjax.layers.conv`)."""
  pad = kernel // 2
  return Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=norms.msra_fill,  # torchvision ResNet init, detectron2 c2_msra_fill
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual connection (ResNet-18/34).

  Attributes:
    features: output channels.
    stride: stride of the first conv (and of the projection shortcut).
    norm: one of `segjax.layers.norms.NORMS`.
    dtype: computation dtype.
  """

  features: int
  stride: int = 1
  norm: str = "frozen_bn"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    nl = lambda name: _norm(self.norm, train=train, dtype=self.dtype, name=name)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.stride, dtype=self.dtype, name="shortcut")(x)
      shortcut = nl("shortcut_norm")(shortcut)
    y = conv(self.features, 3, self.stride, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(nl("norm1")(y))
    y = conv(self.features, 3, dtype=self.dtype, name="conv2")(y)
    y = nl("norm2")(y)
    return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection (ResNet-50/101).

  Attributes:
    width: channels of the 1x1 and 3x3 convs; the output has `4 * width`.
    stride: stride of the 3x3 conv (torchvision; detectron2's MSRA weights put it in the 1x1).
    norm: one of `segjax.layers.norms.NORMS`.
    dtype: computation dtype.
  """

  width: int
  stride: int = 1
  norm: str = "frozen_bn"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    nl = lambda name: _norm(self.norm, train=train, dtype=self.dtype, name=name)
    out = self.width * BOTTLENECK_EXPANSION
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out:
      shortcut = conv(out, 1, self.stride, dtype=self.dtype, name="shortcut")(x)
      shortcut = nl("shortcut_norm")(shortcut)
    y = conv(self.width, 1, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(nl("norm1")(y))
    y = conv(self.width, 3, self.stride, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(nl("norm2")(y))
    y = conv(out, 1, dtype=self.dtype, name="conv3")(y)
    y = nl("norm3")(y)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet feature extractor returning the stage outputs C2..C5.

  Attributes:
    depth: 18, 34 (basic blocks), 50 or 101 (bottleneck blocks).
    norm: "frozen_bn" (default, as detectron2 and torchvision detection), "bn", "gn" or
      "none" (`segjax.layers.norms`).
    freeze_at: 0 trains all; 1 freezes the stem; k in 2..5 also res2..res_k (detectron2: 2).
    base_width: stem channels and the width of res2's convs; stage i doubles it. 64 is the
      real network; a toy uses e.g. 8.
    dtype: computation dtype; parameters stay float32.
  """

  depth: int = 50
  norm: str = "frozen_bn"
  freeze_at: int = 2
  base_width: int = 64
  dtype: Any = jnp.float32

  def _check(self, x: Array) -> None:
    if self.depth not in DEPTHS:
      raise ValueError(f"Unknown ResNet depth {self.depth}; expected one of {sorted(DEPTHS)}.")
    norms.check_norm(self.norm, "backbone.norm")
    if not 0 <= self.freeze_at <= 5:
      raise ValueError(f"freeze_at must be in [0, 5], got {self.freeze_at}.")
    if x.ndim != 4:
      raise ValueError(f"ResNet expects images of shape (B, H, W, C), got {x.shape}.")

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> tuple[dict[str, Array], dict[str, Array]]:
    """Images `(B, H, W, 3)` to `({"c2": (B, H/4, W/4, C2), ..., "c5": ...}, aux)`.

    Sizes round up (`ceil(H / stride)`); C2..C5 are `base_width * (1, 2, 4, 8)` channels,
    times 4 for bottleneck ResNets (256..2048 for ResNet-50). aux: "c1" `(B, H/2, W/2,
    base_width)`, the stem's activation before the max pool (a U-Net's stride-2 skip), and
    "stem" `(B, H/4, W/4, base_width)` after it.
    """
    self._check(x)
    kind, blocks = DEPTHS[self.depth]
    x = x.astype(self.dtype)
    x = conv(self.base_width, 7, 2, dtype=self.dtype, name="stem_conv")(x)
    x = _norm(self.norm, train=train and self.freeze_at < 1, dtype=self.dtype, name="stem_norm")(x)
    x = nn.relu(x)
    if self.freeze_at >= 1:
      x = jax.lax.stop_gradient(x)
    c1 = x
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    aux = {"c1": c1, "stem": x}
    outputs = {}
    for i, num_blocks in enumerate(blocks):
      stage = i + 2
      frozen = self.freeze_at >= stage
      width = self.base_width * 2**i
      for b in range(num_blocks):
        stride = 2 if b == 0 and stage > 2 else 1
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        block = block_cls(width, stride, self.norm, self.dtype, name=f"res{stage}_{b}")
        x = block(x, train=train and not frozen)
      if frozen:
        x = jax.lax.stop_gradient(x)
      outputs[f"c{stage}"] = x
    return outputs, aux
