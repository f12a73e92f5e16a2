"""Small reusable layers: pooling with argmax and unpooling."""

from segjax.layers.unpool import max_pool_with_argmax, max_unpool, nearest_unpool

__all__ = ["max_pool_with_argmax", "max_unpool", "nearest_unpool"]
