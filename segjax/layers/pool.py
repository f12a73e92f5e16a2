"""2x2 max pooling as a reshape and a max, with the gradient of XLA's max pooling.

`nn.max_pool(x, (2, 2), strides=(2, 2))` lowers to `reduce_window`, whose gradient JAX builds
from a variadic `reduce_window` carrying int32 index iotas the size of the input: on XLA's CPU
backend the U-Net's four poolings took 15 % of its train step (batch 8, 128x128), more than
all its BatchNorms. `max_pool_2x2` computes the same values as a reshape and a max, and passes
the gradient to each window's first maximum in row-major order, as XLA's select-and-scatter
does, so gradients match the `reduce_window` version exactly, ties included.
"""

import jax
import jax.numpy as jnp


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, H // 2, W // 2, C), `nn.max_pool(x, (2, 2), strides=(2, 2))`: an odd
  last row or column is dropped, as 'VALID' pooling does."""
  b, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _max_pool_2x2_fwd(x: jax.Array):
  y = max_pool_2x2(x)
  return y, (x, y)


def _max_pool_2x2_bwd(residuals, g: jax.Array):
  x, y = residuals
  b, h, w, c = x.shape
  hh, ww = h // 2, w // 2
  windows = x[:, : 2 * hh, : 2 * ww].reshape(b, hh, 2, ww, 2, c)
  taken = jnp.zeros(y.shape, bool)  # Whether a window's maximum has been found yet.
  rows = []
  for i in range(2):
    row = []
    for j in range(2):
      hit = (windows[:, :, i, :, j] == y) & ~taken
      taken = taken | hit
      row.append(jnp.where(hit, g, jnp.zeros_like(g)))
    rows.append(jnp.stack(row, axis=3))  # (B, h, w, 2, C)
  dx = jnp.stack(rows, axis=2).reshape(b, 2 * hh, 2 * ww, c)
  return (jnp.pad(dx, ((0, 0), (0, h - 2 * hh), (0, w - 2 * ww), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)
