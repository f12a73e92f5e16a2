"""U-Net with a ResNet encoder (Ronneberger et al. 2015, arXiv:1505.04597; He et al. 2016,
arXiv:1512.03385), as segmentation_models_pytorch's `Unet` builds it.

The encoder is segjax's ResNet (`resnet.py`, torchvision's layout, so ImageNet weights import
with `python -m segjax.weights.torchvision --arch resnet34 ...` and load by `--config.init_from`
into the submodule `backbone`). Its features at strides 2 (the stem's activation, before the
max pool), 4, 8 and 16 are the skip connections; the stride-32 output C5 is the decoder's
input, with no extra center block. Five decoder blocks follow smp `UnetDecoder`/`DecoderBlock`:
nearest-neighbour upsampling by 2, concatenation of the skip of that stride (none for the last
block, which reaches full resolution), then two 3x3 conv + norm + ReLU. A 3x3 conv maps the last
block's `decoder_channels[-1]` channels to the class logits at the input's resolution.

Normalization: the encoder defaults to trainable BatchNorm (`norm="bn"`, `freeze_at=0`, as smp
fine-tunes everything), the imported running statistics its starting averages; an imported
checkpoint's FrozenBatchNorm vectors load into it (`segjax.train.init_from`). Keep it when the
encoder trains: `backbone.norm="frozen_bn"` leaves a trained encoder with no normalization at
all, and Adam's first steps blow its features up (on shapes, from a random-weight ResNet-18,
C5's standard deviation grew from 2.8 to 6.5e5 in 5 steps at learning rate 3e-3), drowning the
skips and stalling training (configs/unet_resnet_shapes.py). "frozen_bn" suits a frozen encoder
(`freeze_at=5`) or a small SGD step on truly pretrained weights.
The decoder's norm is `decoder_norm` (`segjax.layers.norms`: "bn", "gn", "none", "frozen_bn").

Shapes: B batch, H, W image size (multiples of 32), K classes.
"""

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.layers import norms, unpool
from segjax.layers.conv import PlainConv
from segjax.layers.conv_blocks import ConvBlock
from segjax.models.resnet import ResNet

Array = jax.Array

# Encoder features used as skips, from the deepest (stride 16) to the shallowest (stride 2).
SKIPS = ("c4", "c3", "c2", "c1")


class ResNetUNet(nn.Module):
  """U-Net decoder over a ResNet encoder, returning per-pixel class logits.

  Attributes:
    num_classes: K, the number of output classes.
    backbone: the ResNet encoder (default ResNet-34, trainable BatchNorm, nothing frozen).
    decoder_channels: output channels of the five decoder blocks, from stride 16 to stride 1
      (smp's default (256, 128, 64, 32, 16)).
    decoder_norm: "bn", "gn" or "none" (`segjax.layers.norms`) in the decoder's conv blocks.
    bn_momentum: the decoder's BatchNorm running-average momentum.
    dtype: computation dtype of the decoder, and of the backbone unless that sets a dtype
      other than float32 itself; parameters stay float32 and the logits are returned as
      float32.
  """

  task: ClassVar[str] = "semantic"
  stride: ClassVar[int] = 32  # H and W must be multiples of the encoder's total stride.

  num_classes: int
  backbone: ResNet = dataclasses.field(
    default_factory=lambda: ResNet(depth=34, norm="bn", freeze_at=0)
  )
  decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
  decoder_norm: str = "bn"
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  def __post_init__(self):
    # An encoder left at float32 computes in the model's dtype (fields are set before flax
    # freezes them, in super().__post_init__).
    if self.backbone.dtype == jnp.float32 and self.dtype != jnp.float32:
      self.backbone = self.backbone.clone(dtype=self.dtype)
    super().__post_init__()

  def _check(self, x: Array) -> None:
    norms.check_norm(self.decoder_norm, "decoder_norm")
    if len(self.decoder_channels) != len(SKIPS) + 1:
      raise ValueError(
        f"decoder_channels needs {len(SKIPS) + 1} entries (strides 16 to 1), "
        f"got {self.decoder_channels}."
      )
    if x.ndim != 4:
      raise ValueError(f"ResNetUNet expects images of shape (B, H, W, C), got {x.shape}.")
    h, w = x.shape[1:3]
    if h % self.stride or w % self.stride:
      raise ValueError(
        f"ResNetUNet needs H and W divisible by {self.stride}; got an input of size H={h}, W={w}."
      )

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> tuple[Array, dict[str, Array]]:
    """Maps images (B, H, W, 3) to logits (B, H, W, K) float32 and a dict of features.

    The aux dict holds the encoder's "c1".."c5" and "stem" (`ResNet`) and "decoder_{i}", the
    output of decoder block i, (B, H / 2**(4 - i), W / 2**(4 - i), decoder_channels[i]).
    """
    self._check(x)
    stages, aux = self.backbone(x, train=train)
    features = {**stages, "c1": aux["c1"]}
    aux = {**aux, **stages}
    x = stages["c5"]
    for i, features_out in enumerate(self.decoder_channels):
      x = unpool.nearest_unpool(x, 2)
      # With a skip, the block's first conv takes the pair as their concatenation, unbuilt.
      inputs = (x, features[SKIPS[i]].astype(x.dtype)) if i < len(SKIPS) else x
      x = ConvBlock(
        features_out,
        norm=self.decoder_norm,
        bn_momentum=self.bn_momentum,
        dtype=self.dtype,
        name=f"decoder_{i}",
      )(inputs, train=train)
      aux[f"decoder_{i}"] = x
    logits = PlainConv(
      self.num_classes,
      (3, 3),
      padding="SAME",
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="head",
    )(x)
    return logits.astype(jnp.float32), aux
