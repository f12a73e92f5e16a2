"""Small reusable layers: norms (one vocabulary, `norms.py`), conv blocks, 2x2 max pooling,
pooling with argmax, unpooling, and the 2x up-convolution."""

from segjax.layers.pool import max_pool_2x2
from segjax.layers.unpool import max_pool_with_argmax, max_unpool, nearest_unpool
from segjax.layers.upconv import UpConv2x, upconv2x

__all__ = [
  "UpConv2x",
  "max_pool_2x2",
  "max_pool_with_argmax",
  "max_unpool",
  "nearest_unpool",
  "upconv2x",
]
