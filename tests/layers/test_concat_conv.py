"""Tests for segjax/layers/concat_conv.py: the sum of per-input convolutions (XLA's) and the
convolution of the concatenation (oneDNN's) are flax's Conv on the concatenation (variables,
outputs and gradients), and ConvBlock takes either form."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.kernels import onednn_conv
from segjax.layers.concat_conv import ConcatConv
from segjax.layers.conv import cpu_convolutions
from segjax.layers.conv_blocks import ConvBlock


def _parts(channels, seed=0, size=(2, 8, 6)):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(*size, c)), jnp.float32) for c in channels]


@pytest.mark.parametrize(
  ("channels", "kernel_size", "use_bias"),
  [
    ((3, 5), (3, 3), False),
    ((4, 4), (3, 3), True),
    ((1, 2, 7), (1, 1), True),
    ((6,), (3, 3), True),
  ],
)
@pytest.mark.parametrize("convolutions", ["xla", "onednn"])
def test_matches_flax_conv_on_the_concatenation(channels, kernel_size, use_bias, convolutions):
  if convolutions == "onednn" and not onednn_conv.available():
    pytest.skip("oneDNN unavailable")
  parts = _parts(channels)
  concat = jnp.concatenate(parts, -1)
  split = ConcatConv(5, kernel_size, use_bias=use_bias)
  plain = nn.Conv(5, kernel_size, padding="SAME", use_bias=use_bias)
  key = jax.random.key(3)
  variables = split.init(key, parts)
  reference = plain.init(key, concat)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, reference)
  jax.tree.map(np.testing.assert_array_equal, variables, reference)  # Same initializers.
  if use_bias:  # A nonzero bias, so that it is checked too.
    variables = {"params": {**variables["params"], "bias": 0.1 * jnp.arange(5.0)}}
  with cpu_convolutions(convolutions):
    out = split.apply(variables, parts)
    calls = jax.jit(split.apply).lower(variables, parts).as_text().count("segjax_onednn_conv")
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=out.shape), jnp.float32)
    grads = jax.grad(lambda v, xs: jnp.sum(split.apply(v, xs) * cotangent), (0, 1))(
      variables, parts
    )
  assert calls == (1 if convolutions == "onednn" else 0)  # oneDNN: one call on the concatenation.
  np.testing.assert_allclose(out, plain.apply(variables, concat), rtol=1e-5, atol=1e-5)
  ref = jax.grad(
    lambda v, xs: jnp.sum(plain.apply(v, jnp.concatenate(xs, -1)) * cotangent), (0, 1)
  )(variables, parts)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, ref)


@pytest.mark.parametrize("size", [(8, 6), (2, 3, 8, 6)])
def test_leading_axes_as_flax_conv(size):
  parts = _parts((2, 3), size=size)
  split, plain = ConcatConv(4), nn.Conv(4, (3, 3), padding="SAME")
  variables = split.init(jax.random.key(0), parts)
  out = split.apply(variables, parts)
  assert out.shape == (*size, 4)
  np.testing.assert_allclose(
    out, plain.apply(variables, jnp.concatenate(parts, -1)), rtol=1e-5, atol=1e-5
  )


def test_bfloat16_computes_in_bfloat16_like_flax_conv():
  parts = _parts((3, 4))
  split = ConcatConv(6, dtype=jnp.bfloat16)
  plain = nn.Conv(6, (3, 3), padding="SAME", dtype=jnp.bfloat16)
  variables = split.init(jax.random.key(0), parts)
  out = split.apply(variables, parts)
  ref = plain.apply(variables, jnp.concatenate(parts, -1))
  assert out.dtype == ref.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(variables["params"]["bias"]))) == 0.0
  np.testing.assert_allclose(
    np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=0.05, atol=0.05
  )


def test_conv_block_takes_a_numpy_array_as_one_input():
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  block = ConvBlock(4, norm="none")
  variables = block.init(jax.random.key(0), x, train=False)
  assert variables["params"]["conv_0"]["kernel"].shape == (3, 3, 3, 4)
  np.testing.assert_allclose(
    block.apply(variables, x, train=False),
    block.apply(variables, jnp.asarray(x), train=False),
    rtol=1e-6,
  )


def test_conv_block_takes_parts_as_their_concatenation():
  parts = _parts((4, 4), seed=1, size=(3, 8, 8))
  block = ConvBlock(6, norm="bn")
  key = jax.random.key(1)
  variables = block.init(key, parts, train=False)
  reference = block.init(key, jnp.concatenate(parts, -1), train=False)
  jax.tree.map(np.testing.assert_array_equal, variables, reference)
  out, updates = block.apply(variables, parts, train=True, mutable=["batch_stats"])
  ref, ref_updates = block.apply(
    variables, jnp.concatenate(parts, -1), train=True, mutable=["batch_stats"]
  )
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), updates, ref_updates
  )
