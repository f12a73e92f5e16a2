"""Tests for segjax/layers/upsample.py: each method against its definition written out with the
layer's own parameters, the conv-before-resize order against resize-before-conv, and the
transposed method against flax's ConvTranspose."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.layers.upsample import METHODS, upsample2x


class Up(nn.Module):
  features: int
  method: str

  @nn.compact
  def __call__(self, x):
    return upsample2x(x, self.features, self.method, name="up", dtype=jnp.float32)


def _run(method, x, features=5):
  model = Up(features, method)
  variables = model.init(jax.random.key(0), x)
  return variables["params"]["up"], np.asarray(model.apply(variables, x))


@pytest.mark.parametrize("method", ["nearest", "bilinear"])
def test_fixed_resize_commutes_with_the_1x1_conv(method):
  x = jax.random.normal(jax.random.key(1), (2, 3, 5, 4))
  params, y = _run(method, x)
  assert params["kernel"].shape == (1, 1, 4, 5)
  resized = jax.image.resize(x, (2, 6, 10, 4), method=method)
  expected = np.einsum("bhwc,co->bhwo", resized, params["kernel"][0, 0]) + params["bias"]
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  if method == "nearest":  # Each input pixel fills a 2x2 block.
    np.testing.assert_array_equal(y[:, 0::2, 0::2], y[:, 1::2, 1::2])


def test_transpose_equals_flax_conv_transpose_with_the_same_parameters():
  x = jax.random.normal(jax.random.key(2), (1, 4, 3, 6))
  params, y = _run("transpose", x, features=7)
  reference = nn.ConvTranspose(7, (2, 2), strides=(2, 2)).apply({"params": params}, x)
  np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5)
  assert y.shape == (1, 8, 6, 7)


def test_unknown_method_names_the_choices():
  with pytest.raises(ValueError, match="Unknown upsampling 'cubic'") as error:
    _run("cubic", jnp.zeros((1, 2, 2, 1)))
  assert str(METHODS) in str(error.value)
