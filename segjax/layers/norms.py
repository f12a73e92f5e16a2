"""Normalization layers of every segjax model, named by one vocabulary (`NORMS`).

  * "bn": BatchNorm (Ioffe and Szegedy, 2015, arXiv:1502.03167): batch statistics when
    training, running averages (momentum 0.9) in the "batch_stats" collection otherwise;
    `segjax.layers.batch_norm.BatchNorm`, flax's with its sums as matrix-vector products.
  * "frozen_bn": `FrozenBatchNorm` (detectron2 `FrozenBatchNorm2d`): fixed scale, bias, mean
    and variance, all four in "batch_stats", never updated nor trained.
  * "gn": GroupNorm (Wu and He, 2018, arXiv:1803.08494) with 32 groups, or the largest divisor
    of the channels below that.
  * "none": no normalization (a conv before it keeps its bias).

Epsilon is 1e-5 for all, as in PyTorch.

Under data parallelism by `jax.pmap`, BatchNorm's batch statistics are means over the devices
of one mapped axis, as one device would compute them over the global batch. Models do not
name that axis: `segjax.train.parallel` traces its per-device step inside
`cross_device_axis(name)`, and every BatchNorm built while it is active averages over `name`
(`current_axis`). Under jit the batch is one global array and the statistics are global
already, so no axis is set.
"""

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.layers.batch_norm import BatchNorm

Array = jax.Array

NORMS = ("bn", "frozen_bn", "gn", "none")
# Names of earlier versions (U-Net "batch"/"group", FPN and ROI heads "" for none).
_RENAMED = {"batch": "bn", "group": "gn", "": "none"}
EPSILON = 1e-5
BN_MOMENTUM = 0.9

# detectron2 weight fills: `c2_xavier_fill` (kaiming_uniform with a=1: uniform, variance
# 1 / fan_in) and `c2_msra_fill` / torchvision's ResNet init (He normal over fan-out).
xavier_fill = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
msra_fill = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_axes = threading.local()


@contextlib.contextmanager
def cross_device_axis(name: str) -> Iterator[None]:
  """While active (e.g. while `jax.pmap` traces a step), BatchNorm averages its batch
  statistics over the mapped axis `name`."""
  stack = _axes.__dict__.setdefault("stack", [])
  stack.append(name)
  try:
    yield
  finally:
    stack.pop()


def current_axis() -> str | None:
  """The innermost `cross_device_axis`, or None outside one."""
  stack = getattr(_axes, "stack", None)
  return stack[-1] if stack else None


def check_norm(kind: str, field: str = "norm") -> str:
  """`kind` if it is one of `NORMS`; a ConfigError naming `field`, the value and the
  vocabulary otherwise (and the new name of an old one)."""
  if kind in NORMS:
    return kind
  hint = f" (now {_RENAMED[kind]!r})" if kind in _RENAMED else ""
  raise ConfigError(f"Unknown {field} {kind!r}{hint}; expected one of {NORMS}.")


def num_groups(channels: int, max_groups: int = 32) -> int:
  """The largest divisor of `channels` that is at most `max_groups`."""
  return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics and affine transform (detectron2 `FrozenBatchNorm2d`).

  `y = (x - mean) * scale / sqrt(var + epsilon) + bias`, all four `(C,)` vectors stored in the
  "batch_stats" collection (initialized to the identity: 1, 0, 0, 1) and only ever read, so
  they are not counted as parameters, as torchvision counts its `FrozenBatchNorm2d` buffers.

  Attributes:
    epsilon: added to the variance, 1e-5 as in torchvision and detectron2.
    dtype: computation dtype.
  """

  epsilon: float = EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.variable("batch_stats", "scale", lambda: jnp.ones((c,), jnp.float32))
    bias = self.variable("batch_stats", "bias", lambda: jnp.zeros((c,), jnp.float32))
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    mul = scale.value * jax.lax.rsqrt(var.value + self.epsilon)
    add = bias.value - mean.value * mul
    return (x * mul.astype(self.dtype) + add.astype(self.dtype)).astype(self.dtype)


def norm_layer(
  kind: str, *, train: bool, dtype: Any, name: str, momentum: float = BN_MOMENTUM
) -> Any:
  """The norm of `kind` (one of `NORMS`) as `layer(x)`, or `layer(x, mask=...)` for "bn"
  (batch statistics over the rows `mask` marks); None for "none". Call it inside a compact
  method: the module, named `name`, belongs to the caller. Parameters are float32.

  Args:
    kind: "bn", "frozen_bn", "gn" or "none".
    train: "bn" uses batch statistics (and updates its running averages) when True.
    dtype: computation dtype.
    name: the module's name in the parameter tree.
    momentum: "bn"'s running-average momentum.
  """
  check_norm(kind)
  if kind == "none":
    return None
  if kind == "frozen_bn":
    return FrozenBatchNorm(dtype=dtype, name=name)
  if kind == "bn":
    return BatchNorm(
      use_running_average=not train,
      momentum=momentum,
      epsilon=EPSILON,
      dtype=dtype,
      param_dtype=jnp.float32,
      axis_name=current_axis(),
      name=name,
    )
  return lambda x: nn.GroupNorm(
    num_groups=num_groups(x.shape[-1]),
    epsilon=EPSILON,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )(x)
