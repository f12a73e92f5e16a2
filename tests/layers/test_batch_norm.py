"""segjax.layers.batch_norm.BatchNorm against flax.linen.BatchNorm: the same variables, outputs,
running averages and gradients, with and without a mask, in float32 and bfloat16, and with
moments averaged over a mapped axis."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.layers.batch_norm import BatchNorm


def _pair(**kw):
  return BatchNorm(momentum=0.9, epsilon=1e-5, **kw), nn.BatchNorm(momentum=0.9, epsilon=1e-5, **kw)


def _run(module, variables, x, g, train, mask=None):
  """(output, new batch stats, gradients of <output, g> for x and the parameters)."""

  def loss(params, x):
    y, updates = module.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      use_running_average=not train,
      mutable=["batch_stats"],
      **({} if mask is None else {"mask": mask}),
    )
    return jnp.sum(y.astype(jnp.float32) * g), (y, updates["batch_stats"])

  (_, (y, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(variables["params"], x)
  return y, stats, grads


def _random_variables(shape, rng):
  c = shape[-1]
  return {
    "params": {
      "scale": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=c), jnp.float32),
    },
    "batch_stats": {
      "mean": jnp.asarray(rng.normal(size=c), jnp.float32),
      "var": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
    },
  }


def _assert_close(a, b, rtol, atol):
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol, atol=atol
    ),
    a,
    b,
  )


def test_same_variables_as_flax():
  ours, flax_bn = _pair()
  x = jnp.ones((2, 4, 4, 3))
  shapes = lambda m: jax.tree.map(
    lambda v: (v.shape, v.dtype), m.init(jax.random.key(0), x, use_running_average=False)
  )
  assert shapes(ours) == shapes(flax_bn)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
  "shape, offset",
  [((4, 6, 5, 8), 0.0), ((3, 7, 16), 5.0), ((1, 1, 1, 4), 0.0), ((64, 3), -2.0)],
)
def test_outputs_statistics_and_gradients_match_flax(shape, offset, train):
  rng = np.random.default_rng(sum(shape))
  x = jnp.asarray(offset + rng.normal(size=shape) * rng.uniform(0.1, 3, shape[-1]), jnp.float32)
  g = jnp.asarray(rng.normal(size=shape), jnp.float32)
  variables = _random_variables(shape, rng)
  ours, flax_bn = _pair()
  _assert_close(
    _run(ours, variables, x, g, train), _run(flax_bn, variables, x, g, train), 2e-4, 2e-4
  )


def test_a_constant_channel_gives_its_bias_and_finite_gradients():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(4, 5, 5, 3)), jnp.float32).at[..., 1].set(1.5)
  g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  variables = _random_variables(x.shape, rng)
  y, stats, (d_params, dx) = _run(_pair()[0], variables, x, g, True)
  np.testing.assert_array_equal(y[..., 1], variables["params"]["bias"][1])
  assert float(stats["var"][1]) == pytest.approx(0.9 * float(variables["batch_stats"]["var"][1]))
  assert float(d_params["scale"][1]) == 0.0 and np.isfinite(dx).all()


def test_mask_restricts_the_statistics_to_marked_rows():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(6, 5, 5, 8)) + 3, jnp.float32)
  g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  mask = jnp.asarray([True, False, True, True, False, False])[:, None, None, None]
  variables = _random_variables(x.shape, rng)
  ours, flax_bn = _pair()
  got = _run(ours, variables, x, g, True, mask)
  _assert_close(got, _run(flax_bn, variables, x, g, True, mask), 2e-4, 2e-4)
  # Unmarked rows change the output of no other row.
  moved = x.at[1].add(100.0)
  y, *_ = _run(ours, variables, moved, g, True, mask)
  np.testing.assert_allclose(y[0], got[0][0], rtol=1e-5, atol=1e-5)


def test_bfloat16_computes_statistics_in_float32_like_flax():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4, 8, 8, 16)) * 4 + 10, jnp.bfloat16)
  g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  variables = _random_variables(x.shape, rng)
  ours, flax_bn = _pair(dtype=jnp.bfloat16)
  got, want = _run(ours, variables, x, g, True), _run(flax_bn, variables, x, g, True)
  assert got[0].dtype == want[0].dtype == jnp.bfloat16
  _assert_close(got, want, 2e-2, 2e-2)


def test_moments_are_averaged_over_the_mapped_axis():
  rng = np.random.default_rng(3)
  x = jnp.asarray(
    rng.normal(size=(4, 2, 5, 5, 8)) * rng.uniform(1, 3, 4)[:, None, None, None, None], jnp.float32
  )
  g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  variables = _random_variables(x.shape, rng)
  ours, flax_bn = _pair(axis_name="devices")

  def mapped(module):
    run = lambda x, g: _run(module, variables, x, g, True)
    return jax.vmap(run, axis_name="devices")(x, g)

  got, want = mapped(ours), mapped(flax_bn)
  _assert_close(got, want, 2e-4, 2e-4)
  # One device's statistics are those of the whole batch (equal per-device counts).
  whole = x.reshape(-1, 8)
  np.testing.assert_allclose(
    got[1]["mean"][0], 0.9 * variables["batch_stats"]["mean"] + 0.1 * whole.mean(0), rtol=1e-5
  )
