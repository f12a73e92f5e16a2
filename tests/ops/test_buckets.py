"""Tests for segjax/ops/buckets.py: the sizes, the used-slot count, and that the bucketed loss
and its gradient equal the plain loss on all slots for every count, under jit, vmap and grad."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import ops


@pytest.mark.parametrize(
  "slots, buckets, want",
  [(128, 3, (8, 32, 128)), (100, 3, (7, 25, 100)), (8, 3, (1, 2, 8)), (3, 4, (1, 3)), (5, 1, (5,))],
)
def test_bucket_sizes_are_ceil_divisions_ending_with_all_slots(slots, buckets, want):
  sizes = ops.bucket_sizes(slots, buckets)
  assert sizes == want
  assert sizes == tuple(sorted({int(np.ceil(slots / 4**i)) for i in range(buckets)}))


@pytest.mark.parametrize("args", [(0, 3), (8, 0), (8, 2, 1)])
def test_bucket_sizes_reject_bad_arguments(args):
  with pytest.raises(ValueError, match="bucket_sizes needs"):
    ops.bucket_sizes(*args)


def test_used_slots_and_bucket_index_match_numpy():
  rng = np.random.default_rng(0)
  sizes = (2, 5, 9)
  for _ in range(50):
    valid = rng.random((3, 9)) < rng.choice([0.0, 0.1, 0.5])
    rows = [np.flatnonzero(v) for v in valid]
    want = max((r[-1] + 1 for r in rows if len(r)), default=0)
    used = ops.used_slots(jnp.asarray(valid))
    assert used.dtype == jnp.int32 and int(used) == want
    assert int(ops.bucket_index(sizes, used)) == next(i for i, s in enumerate(sizes) if s >= want)
  assert int(ops.bucket_index(sizes, jnp.int32(20))) == 2  # past the last: the last


def _head_loss(start, size, params, consts):
  """A head on slots `[start, start + size)` of N with a masked mean loss over all N: additive
  over windows; slots past the valid ones do not count, so any window covering them gives the
  same loss."""
  w, x = params
  valid, target = consts
  window = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, 1)
  h = jnp.tanh(window(x) @ w)
  per_slot = jnp.sum((h - window(target)) ** 2, -1)
  mask = window(valid)
  loss = jnp.sum(jnp.where(mask, per_slot, 0)) / jnp.maximum(jnp.sum(valid), 1)
  return loss, {"fg": jnp.sum(mask).astype(jnp.float32)}


def _case(rng, count, slots=16, dtype=jnp.float32):
  valid = np.zeros((2, slots), bool)
  if count:
    valid[:, : count - 1] = rng.random((2, count - 1)) < 0.7
    valid[rng.integers(0, 2), count - 1] = True
  w = jnp.asarray(rng.normal(size=(3, 4)), dtype)
  x = jnp.asarray(rng.normal(size=(2, slots, 3)), dtype)
  target = jnp.asarray(rng.normal(size=(2, slots, 4)), dtype)
  return (w, x), (jnp.asarray(valid), target)


@pytest.mark.parametrize("dtype, chunk", [(jnp.float32, None), (jnp.float32, 4), (jnp.bfloat16, 4)])
def test_bucketed_loss_and_gradient_equal_the_loss_on_all_slots(dtype, chunk):
  """Also with the largest size (16) in windows of 4 slots."""
  sizes = ops.bucket_sizes(16, 3)
  assert sizes == (1, 4, 16)

  @jax.jit
  def bucketed(params, consts, scale):
    def loss(params):
      value, aux = ops.bucketed_loss(
        _head_loss, sizes, ops.used_slots(consts[0]), params, consts, chunk=chunk
      )
      return scale * value, aux

    return jax.value_and_grad(loss, has_aux=True)(params)

  @jax.jit
  def full(params, consts, scale):
    loss = lambda p: (lambda v, a: (scale * v, a))(*_head_loss(0, 16, p, consts))
    return jax.value_and_grad(loss, has_aux=True)(params)

  rng = np.random.default_rng(1)
  tol = dict(rtol=2e-2, atol=1e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-6)
  # Counts at and either side of each bucket boundary, none, all.
  for count in (0, 1, 2, 4, 5, 15, 16):
    params, consts = _case(rng, count, dtype=dtype)
    scale = jnp.float32(rng.uniform(0.5, 2))
    (got, got_aux), got_grad = bucketed(params, consts, scale)
    (want, want_aux), want_grad = full(params, consts, scale)
    assert got.dtype == want.dtype and float(got_aux["fg"]) == float(want_aux["fg"])
    np.testing.assert_allclose(np.float32(got), np.float32(want), **tol)
    for g, w in zip(got_grad, want_grad, strict=True):
      assert g.dtype == w.dtype
      np.testing.assert_allclose(np.float32(g), np.float32(w), **tol)
    if count == 0:
      assert float(got) == 0.0 and not np.any(np.float32(got_grad[0]))


def test_bucketed_loss_under_vmap_and_in_a_larger_graph():
  """Per-example counts under vmap (the switch becomes a select of every branch) and the
  cotangent from later uses of the loss and of the inputs outside it."""
  sizes = (2, 8, 16)
  rng = np.random.default_rng(2)
  cases = [_case(rng, c) for c in (1, 9, 16)]
  params = jax.tree.map(lambda *x: jnp.stack(x), *[c[0] for c in cases])
  consts = jax.tree.map(lambda *x: jnp.stack(x), *[c[1] for c in cases])

  def total(loss_fn, params, consts):
    per_example = jax.vmap(loss_fn)(params, consts)
    return jnp.sum(jnp.sin(per_example)) + 0.1 * jnp.sum(params[1] ** 2)

  bucketed = lambda p, c: ops.bucketed_loss(_head_loss, sizes, ops.used_slots(c[0]), p, c, chunk=8)[
    0
  ]
  full = lambda p, c: _head_loss(0, 16, p, c)[0]
  got = jax.jit(jax.value_and_grad(functools.partial(total, bucketed)))(params, consts)
  want = jax.jit(jax.value_and_grad(functools.partial(total, full)))(params, consts)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def test_bucketed_loss_needs_sizes_that_its_chunk_divides():
  with pytest.raises(ValueError, match="size 10 is not a multiple of chunk 4"):
    ops.bucketed_loss(_head_loss, (1, 4, 10), jnp.int32(1), None, None, chunk=4)


def test_bucketed_apply_runs_the_smallest_branch_that_fits():
  sizes = (2, 8, 16)
  calls = []

  def fn(n, x):
    calls.append(n)
    return jnp.pad(x[:n] * n, (0, 16 - n))

  run = jax.jit(lambda count, x: ops.bucketed_apply(fn, sizes, count, x))
  x = jnp.arange(16.0)
  for count, n in ((0, 2), (2, 2), (3, 8), (9, 16), (16, 16)):
    want = np.where(np.arange(16) < n, np.arange(16.0) * n, 0)
    np.testing.assert_array_equal(run(jnp.int32(count), x), want)
  assert sorted(set(calls)) == [2, 8, 16]  # each branch traced, once
