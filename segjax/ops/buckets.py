"""Static-shape work on the used part of padded slots: the smallest of a few static sizes.

A head that runs on `N` padded slots per image (the mask head on its foreground slots, or on
the detections) costs `N` whatever the number of slots in use. `lax.switch` over a few static
prefix sizes (`bucket_sizes`) runs it on the smallest prefix holding every used slot
(`used_slots`): shapes stay static, each size is compiled once, only the chosen branch runs.
`bucketed_loss` also computes the branch's gradient inside that branch, during the forward
pass (a custom VJP): differentiating a `lax.switch` the usual way would keep residuals of
every branch for the backward pass, and keeps the head's activations alive until then. Its
largest sizes may run in windows of a smaller one (`chunk`), accumulating the loss and the
gradient, so that memory is that of the window whatever the size.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

BUCKET_FACTOR = 4


def bucket_sizes(slots: int, num_buckets: int, factor: int = BUCKET_FACTOR) -> tuple[int, ...]:
  """Increasing static sizes `ceil(slots / factor**i)`, i < `num_buckets`; the last is `slots`."""
  if slots < 1 or num_buckets < 1 or factor < 2:
    raise ValueError(
      f"bucket_sizes needs slots >= 1, num_buckets >= 1, factor >= 2; got {slots}, "
      f"{num_buckets}, {factor}"
    )
  return tuple(sorted({-(-slots // factor**i) for i in range(num_buckets)}))


def used_slots(valid: Array) -> Array:
  """Slots in use of `valid` `(..., N)` bool: one past the last True of any row, int32 scalar."""
  position = jnp.arange(1, valid.shape[-1] + 1, dtype=jnp.int32)
  return jnp.max(jnp.where(valid, position, 0), initial=0)


def bucket_index(sizes: Sequence[int], count: Array) -> Array:
  """Index of the smallest of increasing `sizes` that is >= `count` (the last if none is)."""
  index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), count, side="left")
  return jnp.minimum(index, len(sizes) - 1).astype(jnp.int32)


def bucketed_apply(fn: Callable[..., Any], sizes: Sequence[int], count: Array, *args) -> Any:
  """`fn(n, *args)` for the smallest `n` of `sizes` >= `count`; every branch must return the
  same shapes (pad to the largest size)."""
  branches = [functools.partial(fn, n) for n in sizes]
  return jax.lax.switch(bucket_index(sizes, count), branches, *args)


def bucketed_loss(
  loss_fn: Callable[[Array | int, int, Any, Any], tuple[Array, Any]],
  sizes: Sequence[int],
  count: Array,
  params: Any,
  consts: Any,
  *,
  chunk: int | None = None,
) -> tuple[Array, Any]:
  """The loss of the slots up to the smallest `n` of `sizes` >= `count`, differentiable with
  respect to `params` (any pytree of float arrays).

  `loss_fn(start, size, params, consts) -> (scalar loss, aux)` is the loss of the window of
  slots `[start, start + size)`, additive: over disjoint windows the losses and the `aux`
  (a pytree of float arrays) add up to those of their union; slots from `count` on add
  nothing. A size above `chunk` (a multiple of it) runs as a loop over windows of `chunk`
  slots, its memory that of `chunk` slots. The gradient is taken in the chosen branch during
  the forward pass and scaled by the loss's cotangent in the backward pass: exact for
  first-order differentiation (no higher order); `consts` get no gradient and `aux` no
  cotangent.
  """
  sizes = tuple(sizes)
  for n in sizes:
    if chunk is not None and n > chunk and n % chunk:
      raise ValueError(f"bucketed_loss: size {n} is not a multiple of chunk {chunk}")

  def windows_sum(window_fn, n):
    """`window_fn(start, size)` summed over windows of `chunk` covering `[0, n)`."""
    if chunk is None or n <= chunk:
      return window_fn(0, n)
    starts = jnp.arange(0, n, chunk, dtype=jnp.int32)
    first = window_fn(starts[0], chunk)
    add = lambda total, start: (jax.tree.map(jnp.add, total, window_fn(start, chunk)), None)
    return jax.lax.scan(add, first, starts[1:])[0]

  def value(n, params, consts):
    return windows_sum(lambda start, size: loss_fn(start, size, params, consts), n)

  def value_and_grad(n, params, consts):
    def window(start, size):
      fn = lambda p: loss_fn(start, size, p, consts)
      return jax.value_and_grad(fn, has_aux=True)(params)

    return windows_sum(window, n)

  @jax.custom_vjp
  def run(params, consts, count):
    return bucketed_apply(value, sizes, count, params, consts)

  def run_fwd(params, consts, count):
    (loss, aux), grads = bucketed_apply(value_and_grad, sizes, count, params, consts)
    return (loss, aux), grads

  def run_bwd(grads, cotangents):
    g = cotangents[0]
    scaled = jax.tree.map(lambda x: (g * x).astype(x.dtype), grads)
    return scaled, None, None

  run.defvjp(run_fwd, run_bwd)
  return run(params, consts, count)
