"""Tests for segjax/layers/upconv.py against flax's ConvTranspose and a numpy loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.layers import UpConv2x, upconv2x


def np_upconv2x(x, kernel, bias):
  """Reference: each input pixel paints its own 2x2 output window (flax's flipped kernel)."""
  b, h, w, _ = x.shape
  out = np.zeros((b, 2 * h, 2 * w, kernel.shape[-1]), np.float64)
  for i in range(h):
    for j in range(w):
      for a in range(2):
        for c in range(2):
          out[:, 2 * i + a, 2 * j + c] = x[:, i, j] @ kernel[1 - a, 1 - c]
  return out + bias


def test_upconv2x_matches_numpy_loop():
  rng = np.random.default_rng(0)
  x, kernel, bias = rng.normal(size=(2, 3, 5, 4)), rng.normal(size=(2, 2, 4, 6)), rng.normal(size=6)
  out = upconv2x(
    jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32), jnp.asarray(bias, jnp.float32)
  )
  np.testing.assert_allclose(out, np_upconv2x(x, kernel, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_module_is_a_drop_in_for_flax_conv_transpose(padding):
  x = jax.random.normal(jax.random.key(1), (2, 4, 6, 3))
  reference = nn.ConvTranspose(5, (2, 2), strides=(2, 2), padding=padding)
  variables = reference.init(jax.random.key(2), x)
  ours = UpConv2x(5)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(2), x)) == jax.tree.map(
    jnp.shape, variables
  )

  def loss(module, variables, x):
    return jnp.sum(jnp.sin(module.apply(variables, x)))

  np.testing.assert_allclose(
    ours.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-5
  )
  ours_grads = jax.grad(loss, argnums=(1, 2))(ours, variables, x)
  reference_grads = jax.grad(loss, argnums=(1, 2))(reference, variables, x)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ours_grads, reference_grads
  )


def test_dtype_and_no_bias():
  x = jnp.ones((1, 2, 2, 3), jnp.bfloat16)
  module = UpConv2x(4, use_bias=False, dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(0), x)
  assert set(variables["params"]) == {"kernel"}
  assert variables["params"]["kernel"].dtype == jnp.float32
  assert module.apply(variables, x).dtype == jnp.bfloat16


@pytest.mark.parametrize("lead", [(), (2,), (2, 3)])
def test_onednn_path_matches_numpy_loop_and_flax(lead):
  """Under oneDNN's convolutions the product is a 1x1 conv to 4 O channels: same values and
  gradients as flax's ConvTranspose, any leading axes; bfloat16 keeps the matrix product."""
  from segjax.kernels import onednn_conv
  from segjax.layers import conv

  if not onednn_conv.available():
    pytest.skip("oneDNN unavailable")
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(*lead, 3, 5, 4)), jnp.float32)
  kernel, bias = rng.normal(size=(2, 2, 4, 6)), rng.normal(size=6)
  variables = {
    "params": {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
  }
  reference = nn.ConvTranspose(6, (2, 2), strides=(2, 2))

  def loss(module, variables, x):
    return jnp.sum(jnp.sin(module.apply(variables, x)))

  with conv.cpu_convolutions("onednn"):
    text = jax.jit(lambda x: UpConv2x(6).apply(variables, x)).lower(x).as_text()
    ours = jax.jit(lambda v, x: UpConv2x(6).apply(v, x))(variables, x)
    ours_grads = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)(
      UpConv2x(6), variables, x
    )
    bf16 = jax.jit(lambda x: upconv2x(x, jnp.ones((2, 2, 4, 6), jnp.bfloat16)))
    bf16_text = bf16.lower(x.astype(jnp.bfloat16)).as_text()
  assert "segjax_onednn_conv_forward" in text and "segjax_onednn" not in bf16_text
  flat = np.asarray(x).reshape(-1, 3, 5, 4)
  np.testing.assert_allclose(
    np.asarray(ours).reshape(-1, 6, 10, 6), np_upconv2x(flat, kernel, bias), rtol=1e-5, atol=1e-5
  )
  reference_grads = jax.grad(loss, argnums=(1, 2))(reference, variables, x)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ours_grads, reference_grads
  )
