"""BatchNorm whose per-channel sums, forward and backward, are matrix-vector products.

`flax.linen.BatchNorm` reduces over every axis but the channels, and so does the gradient
JAX derives for it; XLA's CPU backend rewrites each such reduction into a tree of
`reduce_window`s (for accuracy) that it runs as a scalar loop. Here the input is seen as an
`(N, C)` matrix and every sum over N is `w @ x`, a product with the `(N,)` row weights (ones,
or the mask): the batch moments `w @ x` and `w @ x**2` in the forward pass, and the normalized
output's `1 @ g` and `1 @ (g * (x - mean))` in its custom VJP. The rest (means over devices, the
variance, the running averages) is on `(C,)` vectors and left to autodiff.

`BatchNorm` is `nn.BatchNorm(axis=-1)` with the same variables ("scale", "bias" parameters;
"mean", "var" batch statistics), arguments and values: the fast variance `E[x^2] - E[x]^2`
clipped at 0, statistics in float32 whatever the computation dtype; with a `mask`, statistics
of the marked rows and every row normalized; under `axis_name`, each device's moments averaged
over that axis. `relu=True` applies ReLU after; training on float32 without a mask or
`axis_name` under `cpu_convolutions("onednn")`, norm and ReLU then run fused on the CPU
(`segjax.kernels.batch_norm_relu`; the U-Net's ConvBlocks ask for it).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from segjax.kernels import batch_norm_relu
from segjax.layers.conv import onednn_selected

Array = jax.Array


@jax.custom_vjp
def weighted_sums(x: Array, w: Array) -> tuple[Array, Array]:
  """`(w @ x, w @ x**2)` of `x` `(N, C)` and weights `w` `(N,)`, in float32."""
  x = x.astype(jnp.float32)
  return w @ x, w @ (x * x)


def _weighted_sums_fwd(x, w):
  return weighted_sums(x, w), (x, w)


def _weighted_sums_bwd(residuals, grads):
  x, w = residuals
  g1, g2 = grads
  dx = w[:, None] * (g1 + 2 * x.astype(jnp.float32) * g2)
  return dx.astype(x.dtype), None


weighted_sums.defvjp(_weighted_sums_fwd, _weighted_sums_bwd)


@jax.custom_vjp
def affine(x: Array, shift: Array, mul: Array, bias: Array) -> Array:
  """`(x - shift) * mul + bias` in float32, for `x` `(N, C)` and `(C,)` vectors."""
  return (x.astype(jnp.float32) - shift) * mul + bias


def _affine_fwd(x, shift, mul, bias):
  return affine(x, shift, mul, bias), (x, shift, mul)


def _affine_bwd(residuals, g):
  x, shift, mul = residuals
  ones = jnp.ones((g.shape[0],), jnp.float32)
  g_sum = ones @ g
  g_centered_sum = ones @ (g * (x.astype(jnp.float32) - shift))
  dx = (g * mul).astype(x.dtype)
  return dx, -mul * g_sum, g_centered_sum, g_sum


affine.defvjp(_affine_fwd, _affine_bwd)


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` over the last axis, with its sums as matrix-vector products.

  Attributes:
    use_running_average: normalize with the running averages instead of batch statistics.
    momentum: running-average momentum.
    epsilon: added to the variance.
    dtype: computation dtype of the output (None: the input's, promoted with the params').
    param_dtype: parameters' dtype.
    axis_name: the mapped axis (pmap) over which each device's moments are averaged.
  """

  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(
    self,
    x: Array,
    use_running_average: bool | None = None,
    *,
    mask: Array | None = None,
    relu: bool = False,
  ) -> Array:
    """x: `(..., C)`; mask: boolean, broadcastable to `x.shape[:-1] + (1,)`; relu: ReLU after
    (fused with the norm on the CPU, `segjax.kernels.batch_norm_relu`, when training on float32
    without a mask or cross-device axis under `cpu_convolutions("onednn")`)."""
    use_running_average = nn.merge_param(
      "use_running_average", self.use_running_average, use_running_average
    )
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    rows = x.reshape(-1, c)
    fused = (
      relu
      and not use_running_average
      and mask is None
      and self.axis_name is None
      and onednn_selected()
      and x.dtype == scale.dtype == bias.dtype == jnp.float32
      and self.dtype in (None, jnp.float32)
    )
    z = None
    if fused:
      z, mean, var = batch_norm_relu.batch_norm_relu(rows, scale, bias, self.epsilon)
    elif use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      if mask is None:
        w = jnp.ones((rows.shape[0],), jnp.float32)
      else:
        w = jnp.broadcast_to(jnp.asarray(mask, bool), (*x.shape[:-1], 1)).reshape(-1)
        w = w.astype(jnp.float32)
      s1, s2 = weighted_sums(rows, w)
      count = jnp.sum(w)
      mean, mean2 = s1 / count, s2 / count
      if self.axis_name is not None and not self.is_initializing():
        mean, mean2 = lax.pmean(jnp.stack([mean, mean2]), self.axis_name)
      var = jnp.maximum(0.0, mean2 - mean * mean)
    if not use_running_average and not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    if z is not None:
      return z.reshape(x.shape)
    mul = lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    y = affine(rows, mean, mul, bias.astype(jnp.float32)).reshape(x.shape)
    y = y.astype(nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype))
    return nn.relu(y) if relu else y
