"""Tests for segjax/kernels/batch_norm_relu.py: the fused BatchNorm + ReLU against the formula in
numpy (float64) and its gradient against JAX's of the XLA ops (segjax.layers.batch_norm's), on
random cases (rows that do not split evenly over threads, one row, a constant channel, a large
mean); and BatchNorm(relu=True) in a model against BatchNorm then ReLU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.kernels import batch_norm_relu
from segjax.layers.batch_norm import BatchNorm
from segjax.layers.conv import cpu_convolutions

EPS = 1e-5


def _case(rows, c, seed, offset=0.0, constant_channel=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rows, c)) * 2.0 + offset
  if constant_channel:
    x[:, 0] = 3.0
  scale, bias = rng.normal(size=c), rng.normal(size=c)
  return [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]


CASES = [
  dict(rows=2 * 64 * 64, c=16, seed=0),
  dict(rows=7, c=3, seed=1),
  dict(rows=1, c=5, seed=2),
  dict(rows=333, c=1, seed=3),
  dict(rows=130, c=8, seed=4, constant_channel=True),
  dict(rows=512, c=32, seed=5, offset=1000.0),
]


@pytest.mark.parametrize("case", CASES)
def test_values_match_the_formula(case):
  x, scale, bias = _case(**case)
  z, mean, var = jax.jit(lambda *a: batch_norm_relu.batch_norm_relu(*a, EPS))(x, scale, bias)
  x64 = np.asarray(x, np.float64)
  mean64 = x64.mean(0)
  var64 = np.maximum(0.0, (x64**2).mean(0) - mean64**2)
  want = np.maximum(
    0.0, (x64 - mean64) / np.sqrt(var64 + EPS) * np.asarray(scale) + np.asarray(bias)
  )
  np.testing.assert_allclose(mean, mean64, rtol=1e-6, atol=1e-6 * (1 + abs(case.get("offset", 0))))
  np.testing.assert_allclose(var, var64, rtol=1e-5, atol=1e-3 if case.get("offset") else 1e-6)
  if not case.get("offset"):  # Far from 0 the float32 input itself limits the variance.
    np.testing.assert_allclose(z, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", [c for c in CASES if not c.get("offset")])
def test_gradients_match_xla(case):
  x, scale, bias = _case(**case)
  cotangent = jnp.asarray(np.random.default_rng(9).normal(size=x.shape), jnp.float32)

  def grads(fn):
    loss = lambda x, s, b: jnp.sum(fn(x, s, b, EPS)[0] * cotangent)
    return jax.jit(jax.grad(loss, (0, 1, 2)))(x, scale, bias)

  got, want = grads(batch_norm_relu.batch_norm_relu), grads(batch_norm_relu.reference)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-4 * (float(jnp.abs(w).max()) + 1e-3))


def test_a_nan_row_makes_everything_nan_as_in_xla():
  x, scale, bias = _case(rows=9, c=4, seed=7)
  x = x.at[3, 1].set(jnp.nan)
  got = jax.jit(lambda *a: batch_norm_relu.batch_norm_relu(*a, EPS))(x, scale, bias)
  want = jax.jit(lambda *a: batch_norm_relu.reference(*a, EPS))(x, scale, bias)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
  assert np.isnan(got[0][:, 1]).all() and not np.isnan(got[0][:, 0]).any()


class _Block(nn.Module):
  fused: bool

  @nn.compact
  def __call__(self, x):
    norm = BatchNorm(use_running_average=False, momentum=0.9)
    return norm(x, relu=True) if self.fused else nn.relu(norm(x))


def test_batch_norm_with_relu_in_a_model_matches_batch_norm_then_relu():
  (x, *_) = _case(rows=4 * 6 * 6, c=8, seed=6)
  x = x.reshape(4, 6, 6, 8)
  variables = _Block(False).init(jax.random.key(0), x)
  variables = {
    **variables,
    "params": {"BatchNorm_0": {"scale": jnp.linspace(0.5, 2, 8), "bias": jnp.linspace(-1, 1, 8)}},
  }

  def run(fused):
    def loss(params):
      y, updates = _Block(fused).apply({**variables, "params": params}, x, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y)), (y, updates)

    with cpu_convolutions("onednn"):
      fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
      text = fn.lower(variables["params"]).as_text()
      (_, (y, updates)), grads = fn(variables["params"])
    return text.count("segjax_batch_norm_relu"), y, updates, grads

  calls, *fused = run(True)
  no_calls, *unfused = run(False)
  assert (calls, no_calls) == (2, 0)  # Forward and backward.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), fused, unfused)
