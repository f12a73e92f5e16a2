"""Tests for segjax/layers/conv.py: values and gradients equal `lax.conv_general_dilated`'s."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from segjax.layers import conv as conv_lib
from segjax.layers.conv import Conv, conv_general_dilated

DN = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(autouse=True)
def matmul_path_for_every_width(monkeypatch):
  """Small test shapes must take the matmul kernel gradient, not the narrow-conv fallback."""
  monkeypatch.setattr(conv_lib, "MIN_MATMUL_CHANNELS", 1)


def _normal(seed, *shapes):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape).astype(np.float32) for shape in shapes]


def _loss(conv_fn, strides, padding):
  def loss(x, kernel):
    y = conv_fn(x, kernel, strides, padding, dimension_numbers=DN)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))

  return loss


# (input shape, kernel shape, strides, padding): stride 2 on odd sizes, 1x1, the ResNet stem,
# non-square inputs and kernels, batch 1; at stride 1 (the input gradient as a convolution with
# the flipped kernel) "SAME", "VALID", asymmetric and one-sided padding, non-square kernels.
CASES = [
  ((2, 9, 7, 3), (3, 3, 3, 4), (2, 2), "SAME"),
  ((1, 11, 13, 5), (3, 3, 5, 6), (2, 2), ((1, 1), (1, 1))),
  ((3, 6, 5, 4), (1, 1, 4, 7), (1, 1), "VALID"),
  ((1, 17, 15, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3))),
  ((2, 10, 6, 3), (3, 2, 3, 5), (1, 2), ((1, 2), (0, 1))),
  ((2, 5, 5, 2), (3, 3, 2, 2), (1, 1), "VALID"),
  ((2, 8, 7, 6), (3, 3, 6, 5), (1, 1), "SAME"),
  ((1, 9, 6, 3), (3, 2, 3, 4), (1, 1), "SAME"),
  ((2, 7, 8, 4), (3, 3, 4, 4), (1, 1), ((0, 2), (2, 1))),
  ((1, 6, 6, 2), (5, 3, 2, 3), (1, 1), ((4, 0), (0, 0))),
]


@pytest.mark.parametrize("x_shape,k_shape,strides,padding", CASES)
def test_forward_and_gradients_equal_lax(x_shape, k_shape, strides, padding):
  x, kernel = _normal(sum(x_shape) + sum(k_shape), x_shape, k_shape)
  ours = jax.jit(jax.value_and_grad(_loss(conv_general_dilated, strides, padding), (0, 1)))
  reference = jax.jit(jax.value_and_grad(_loss(lax.conv_general_dilated, strides, padding), (0, 1)))
  (value, (dx, dk)), (ref_value, (ref_dx, ref_dk)) = ours(x, kernel), reference(x, kernel)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dk, ref_dk, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strides", [(2, 2), (1, 1)])
def test_bfloat16_gradients_close_to_float32_lax(strides):
  x, kernel = _normal(3, (2, 9, 9, 8), (3, 3, 8, 6))
  padding = "SAME"
  grad = jax.jit(jax.grad(_loss(conv_general_dilated, strides, padding), (0, 1)))
  dx, dk = grad(jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16))
  assert dx.dtype == dk.dtype == jnp.bfloat16
  ref_grad = jax.jit(jax.grad(_loss(lax.conv_general_dilated, strides, padding), (0, 1)))
  ref_dx, ref_dk = ref_grad(x, kernel)
  for ours, ref in ((dx, ref_dx), (dk, ref_dk)):
    err = np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max()
    assert err < 3e-2, err


def test_stride_one_input_gradient_keeps_a_fast_layout_inside_a_branch():
  """Inside `lax.switch`, `jax.vjp`'s input gradient (a convolution over the reversed kernel
  with its channel dimensions swapped) compiled to XLA:CPU's slow loop; segjax's gives HWIO
  kernels to every convolution of the branch, with the same gradients."""
  x, kernel = _normal(5, (2, 6, 6, 4), (3, 3, 4, 4))

  def branched(conv_fn):
    loss = _loss(conv_fn, (1, 1), "SAME")
    pick = lambda i, x, k: jax.lax.switch(i, [loss, lambda x, k: 2 * loss(x, k)], x, k)
    return jax.jit(jax.grad(pick, (1, 2)))

  hlo = branched(conv_general_dilated).lower(1, x, kernel).compile().as_text()
  labels = [
    line.split("dim_labels=")[1].split(",")[0]
    for line in hlo.splitlines()
    if "convolution(" in line
  ]
  assert labels and all("_01io->" in label for label in labels), labels
  for i in (0, 1):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
      branched(conv_general_dilated)(i, x, kernel),
      branched(lax.conv_general_dilated)(i, x, kernel),
    )


def test_under_vmap():
  x, kernel = _normal(4, (3, 2, 6, 6, 4), (3, 3, 3, 4, 5))
  grads = lambda fn: jax.jit(jax.vmap(jax.grad(_loss(fn, (2, 2), "SAME"), (0, 1))))(x, kernel)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
    grads(conv_general_dilated),
    grads(lax.conv_general_dilated),
  )


def test_conv_module_is_nn_conv_with_the_same_parameters_and_gradients():
  (x,) = _normal(5, (2, 7, 9, 3))
  kwargs = dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding="SAME")
  reference, ours = nn.Conv(**kwargs), Conv(**kwargs)
  variables = reference.init(jax.random.key(6), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(6), x)) == jax.tree.map(
    jnp.shape, variables
  )
  loss = lambda module: lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
    jax.jit(jax.grad(loss(ours), (0, 1)))(variables, x),
    jax.jit(jax.grad(loss(reference), (0, 1)))(variables, x),
  )


def test_unsupported_configurations_fall_back_to_lax():
  x, kernel = _normal(7, (1, 8, 8, 4), (3, 3, 2, 4))  # The kernel: two feature groups.
  for kwargs in (dict(feature_group_count=2), dict(rhs_dilation=(2, 2))):
    k = kernel if "feature_group_count" in kwargs else np.concatenate([kernel, kernel], 2)
    ours = conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN, **kwargs)
    ref = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN, **kwargs)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
