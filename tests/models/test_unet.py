"""Tests for segjax/models/unet.py and segjax/models/__init__.py on tiny configurations."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from segjax.layers import max_pool_with_argmax, max_unpool, norms
from segjax.models import create_model, unet

H = W = 16
IMAGES = jnp.asarray(np.random.default_rng(0).uniform(size=(2, H, W, 3)), jnp.float32)


def tiny(**kwargs):
  return unet.UNet(**{"num_classes": 3, "depth": 2, "base_width": 4, **kwargs})


def num_params(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


# Threefry compiles slowly on CPU (seconds per parameter shape); RngBitGenerator keys do not.
KEY = jax.random.key(1, impl="rbg")


@functools.cache
def init_variables(norm, transposed):
  """Variables shared by the upsampling modes with the same parameter tree (1x1 or 2x2 up)."""
  model = tiny(norm=norm, upsampling="transpose" if transposed else "nearest")
  # One jit compile is cheaper on CPU than compiling every eager op.
  return jax.jit(functools.partial(model.init, train=False))(KEY, IMAGES)


AUX_SHAPES = {
  "encoder_0": (2, 16, 16, 4),
  "encoder_1": (2, 8, 8, 8),
  "bottleneck": (2, 4, 4, 16),
  "decoder_1": (2, 8, 8, 8),
  "decoder_0": (2, 16, 16, 4),
}


@pytest.mark.parametrize("norm", ["bn", "gn", "none"])
@pytest.mark.parametrize("upsampling", unet.UPSAMPLINGS)
def test_output_shapes(upsampling, norm):
  model = tiny(upsampling=upsampling, norm=norm)

  def init_and_apply():
    variables = model.init(KEY, IMAGES, train=False)
    return variables, model.apply(variables, IMAGES, train=False)

  # Shapes only: tracing runs the same code as execution without compiling anything.
  variables, (logits, aux) = jax.eval_shape(init_and_apply)
  assert ("batch_stats" in variables) == (norm == "bn")
  assert logits.shape == (2, H, W, 3)
  assert logits.dtype == jnp.float32
  assert {k: v.shape for k, v in aux.items()} == AUX_SHAPES


@pytest.mark.parametrize("upsampling", unet.UPSAMPLINGS)
def test_forward_runs_and_is_finite(upsampling):
  model = tiny(upsampling=upsampling, norm="none")
  logits, aux = jax.jit(functools.partial(model.apply, train=False))(
    init_variables("none", upsampling == "transpose"), IMAGES
  )
  assert logits.shape == (2, H, W, 3)
  assert {k: v.shape for k, v in aux.items()} == AUX_SHAPES
  assert np.all(np.isfinite(logits))
  assert np.std(logits) > 0


def test_non_square_input():
  model = tiny(norm="none", depth=3)
  x = jnp.zeros((1, 8, 24, 3))
  logits, _ = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=False)[0])
  assert logits.shape == (1, 8, 24, 3)


@pytest.mark.parametrize("size", [(18, 16), (16, 18)])
def test_indivisible_size_is_a_clear_error(size):
  with pytest.raises(ValueError, match=rf"depth=2.*2\*\*depth=4.*H={size[0]}, W={size[1]}"):
    tiny().init(jax.random.key(0), jnp.zeros((1, *size, 3)), train=False)


def test_bad_options_are_errors():
  with pytest.raises(ValueError, match="norm"):
    tiny(norm="layer").init(jax.random.key(0), IMAGES, train=False)
  with pytest.raises(ValueError, match="upsampling"):
    tiny(upsampling="pixel_shuffle").init(jax.random.key(0), IMAGES, train=False)


def conv(k, cin, cout, bias):
  return k * k * cin * cout + (cout if bias else 0)


def block(cin, cout, norm):
  # Two 3x3 convs; bias only without norm; scale + offset per norm layer.
  with_norm = norm != "none"
  return (
    conv(3, cin, cout, not with_norm)
    + conv(3, cout, cout, not with_norm)
    + (4 * cout if with_norm else 0)
  )


@pytest.mark.parametrize(
  "norm,upsampling", [("bn", "transpose"), ("none", "nearest"), ("gn", "max_unpool")]
)
def test_param_count(norm, upsampling):
  # depth 2, widths 4 / 8 / bottleneck 16, 3 input channels, 3 classes.
  up_k = 2 if upsampling == "transpose" else 1  # 2x2 transposed conv or 1x1 conv
  expected = (
    block(3, 4, norm)
    + block(4, 8, norm)
    + block(8, 16, norm)
    + conv(up_k, 16, 8, True)
    + block(16, 8, norm)
    + conv(up_k, 8, 4, True)
    + block(8, 4, norm)
    + conv(1, 4, 3, True)
  )
  model = tiny(norm=norm, upsampling=upsampling)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), IMAGES, train=False))
  assert num_params(variables["params"]) == expected
  assert sorted(variables["params"]) == ["bottleneck", "down_0", "down_1", "head", "up_0", "up_1"]
  if norm == "bn":  # mean and var per BatchNorm, as many as scale + offset
    assert num_params(variables["batch_stats"]) == 4 * (4 + 8 + 16 + 8 + 4)


def test_train_updates_batch_stats_and_uses_dropout():
  model = tiny(dropout_rate=0.5)
  variables = init_variables("bn", True)

  @jax.jit
  def train_apply(variables, rng):
    return model.apply(
      variables, IMAGES, train=True, mutable=["batch_stats"], rngs={"dropout": rng}
    )

  (logits_a, _), updates = train_apply(variables, jax.random.key(2, impl="rbg"))
  (logits_b, _), _ = train_apply(variables, jax.random.key(3, impl="rbg"))
  assert logits_a.shape == (2, H, W, 3)
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
  old = variables["batch_stats"]["down_0"]["norm_0"]["mean"]
  new = updates["batch_stats"]["down_0"]["norm_0"]["mean"]
  assert not np.allclose(old, new)
  assert not np.allclose(logits_a, logits_b)  # different dropout masks
  # Evaluation is deterministic and needs no rng.
  np.testing.assert_array_equal(
    model.apply(variables, IMAGES, train=False)[0], model.apply(variables, IMAGES, train=False)[0]
  )


def test_batch_norm_averages_statistics_across_devices():
  variables = init_variables("bn", True)

  def batch_stats(model, images):
    return model.apply(variables, images, train=True, mutable=["batch_stats"])[1]

  def device_stats(x):
    with norms.cross_device_axis("i"):  # As segjax.train.parallel traces a pmapped step.
      return batch_stats(tiny(), x[None])

  whole = jax.jit(functools.partial(batch_stats, tiny()))(IMAGES)
  # One image per simulated device; the axis makes the moments cross-device means.
  per_device = jax.jit(jax.vmap(device_stats, axis_name="i"))(IMAGES)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b[0], rtol=1e-4, atol=1e-5), whole, per_device
  )
  jax.tree.map(lambda b: np.testing.assert_array_equal(b[0], b[1]), per_device)


def test_gradients_reach_every_parameter():
  model = tiny(norm="gn", upsampling="max_unpool")
  params = init_variables("gn", False)["params"]
  grads = jax.jit(
    jax.grad(lambda p: jnp.sum(model.apply({"params": p}, IMAGES, train=True)[0] ** 2))
  )(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)) and np.any(g != 0), jax.tree_util.keystr(path)


@pytest.mark.parametrize("upsampling", ["max_unpool", "nearest"])
def test_max_unpool_uses_encoder_indices(upsampling):
  model = tiny(norm="none", upsampling=upsampling)
  variables = init_variables("none", False)
  (_, aux), state = model.apply(variables, IMAGES, train=False, mutable=["intermediates"])
  upsampled = state["intermediates"]["up_0"]["upsampled"][0]  # (B, 16, 16, 4)
  nonzero = np.asarray(upsampled != 0)
  _, indices = max_pool_with_argmax(aux["encoder_0"])
  at_argmax = np.asarray(max_unpool(jnp.ones(indices.shape), indices, upsampled.shape) != 0)
  if upsampling == "max_unpool":
    # Values only at the encoder's argmax, one per window; a few of those may be zero too
    # where every ReLU input of the 1x1 conv is.
    assert not np.any(nonzero & ~at_argmax)
    assert nonzero.sum() > 0.9 * at_argmax.sum()
  else:
    assert nonzero.mean() > 0.9  # nearest fills every position


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = tiny(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda: model.init(KEY, IMAGES, train=False))
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  logits, aux = jax.jit(functools.partial(model.apply, train=False))(
    init_variables("bn", True), IMAGES
  )
  assert logits.dtype == jnp.float32
  assert aux["bottleneck"].dtype == jnp.bfloat16


def test_create_model_from_config():
  config = ml_collections.ConfigDict(
    dict(
      name="unet",
      num_classes=5,
      depth=2,
      base_width=4,
      norm="gn",
      dropout_rate=0.1,
      upsampling="bilinear",
    )
  )
  model = create_model(config)
  assert isinstance(model, unet.UNet)
  assert (
    model.num_classes,
    model.depth,
    model.base_width,
    model.norm,
    model.dropout_rate,
    model.upsampling,
  ) == (5, 2, 4, "gn", 0.1, "bilinear")
  config.dtype = "bfloat16"
  assert create_model(config).dtype == jnp.bfloat16


def test_create_model_errors_name_the_choices():
  with pytest.raises(ValueError, match=r"'segnet'.*\['mask_rcnn', 'unet', 'unet_resnet'\]"):
    create_model(ml_collections.ConfigDict(dict(name="segnet", num_classes=2)))
  with pytest.raises(ValueError, match="widht"):
    create_model(ml_collections.ConfigDict(dict(name="unet", num_classes=2, widht=3)))


@pytest.mark.parametrize("old, new", [("batch", "bn"), ("group", "gn"), ("", "none")])
def test_old_norm_names_are_refused_with_the_new_ones(old, new):
  from segjax.errors import ConfigError
  from segjax.models.fpn import FPN

  message = rf"Unknown {{}} '{old}' \(now '{new}'\); expected one of \('bn', 'frozen_bn', 'gn'"
  with pytest.raises(ConfigError, match=message.format("norm")):
    jax.eval_shape(lambda: tiny(norm=old).init(KEY, IMAGES, train=False))
  features = {"c2": jnp.zeros((1, 8, 8, 4)), "c3": jnp.zeros((1, 4, 4, 8))}
  with pytest.raises(ConfigError, match=message.format("fpn.norm")):
    jax.eval_shape(lambda: FPN(out_channels=4, norm=old).init(KEY, features))
