"""Tests for segjax/models/unet_resnet.py: shapes, the parameter tree, the skip connections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from segjax.models import build_model, create_model, resnet, unet_resnet
from segjax.train import loop
from tests.markers import long_test

KEY = jax.random.key(0, impl="rbg")  # rbg keys compile much faster on CPU than threefry
H, W = 64, 96  # Non-square, multiples of 32.
IMAGES = jnp.asarray(np.random.default_rng(0).normal(size=(2, H, W, 3)), jnp.float32)
TINY = dict(
  backbone=resnet.ResNet(depth=18, base_width=8, norm="bn", freeze_at=0),
  decoder_channels=(32, 16, 16, 8, 8),
)


def tiny(**kwargs):
  return unet_resnet.ResNetUNet(**{"num_classes": 3, **TINY, **kwargs})


def init_shapes(model, x=IMAGES):
  def init_and_apply():
    variables = model.init(KEY, x, train=False)
    return variables, model.apply(variables, x, train=False)

  # Shapes only: tracing runs the same code as execution without compiling anything.
  return jax.eval_shape(init_and_apply)


def shapes(tree):
  return {k: v.shape for k, v in traverse_util.flatten_dict(tree).items()}


def num_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_output_and_feature_shapes():
  _, (logits, aux) = init_shapes(tiny())
  assert logits.shape == (2, H, W, 3) and logits.dtype == jnp.float32
  channels = {"c1": 8, "stem": 8, "c2": 8, "c3": 16, "c4": 32, "c5": 64}
  strides = {"c1": 2, "stem": 4, "c2": 4, "c3": 8, "c4": 16, "c5": 32}
  expected = {k: (2, H // strides[k], W // strides[k], c) for k, c in channels.items()}
  expected |= {
    f"decoder_{i}": (2, H * 2**i // 16, W * 2**i // 16, c)
    for i, c in enumerate(TINY["decoder_channels"])
  }
  assert {k: v.shape for k, v in aux.items()} == expected


def test_backbone_is_a_resnet_and_the_count_is_smp_unet_resnet34():
  variables, _ = init_shapes(unet_resnet.ResNetUNet(num_classes=1), IMAGES[:1])
  alone = jax.eval_shape(
    lambda: resnet.ResNet(depth=34, norm="bn", freeze_at=0).init(KEY, IMAGES[:1], train=False)
  )
  for collection in ("params", "batch_stats"):
    assert shapes(variables[collection]["backbone"]) == shapes(alone[collection])
  assert sorted(variables["params"]) == ["backbone", *(f"decoder_{i}" for i in range(5)), "head"]
  # segmentation_models_pytorch `Unet("resnet34", classes=1)`: 21,284,672 encoder parameters
  # (torchvision's ResNet-34 without fc), 3,151,552 in the decoder, 145 in the 3x3 head.
  assert num_params(variables["params"]) == 24_436_369


def test_every_skip_reaches_the_logits():
  """A perturbation of each encoder feature, added after the ResNet returns it, moves the
  logits: c1..c4 through their skip connections, c5 as the decoder's input."""
  model = tiny()
  variables = jax.jit(lambda: model.init(KEY, IMAGES, train=False))()

  def logits_with(deltas):
    def add(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, resnet.ResNet) and context.method_name == "__call__":
        stages, aux = out
        stages = {k: v + deltas.get(k, 0.0) for k, v in stages.items()}
        out = stages, {**aux, "c1": aux["c1"] + deltas["c1"]}
      return out

    with nn.intercept_methods(add):
      return model.apply(variables, IMAGES, train=False)[0]

  _, (_, aux) = init_shapes(model)
  zeros = {k: jnp.zeros(aux[k].shape) for k in ("c1", "c2", "c3", "c4", "c5")}
  grads = jax.jit(jax.grad(lambda d: jnp.sum(logits_with(d) ** 2)))(zeros)
  for name, g in grads.items():
    assert float(jnp.max(jnp.abs(g))) > 0, name


def test_config_sections_and_dtype():
  import ml_collections

  config = ml_collections.ConfigDict(
    dict(
      model=dict(
        name="unet_resnet",
        num_classes=4,
        backbone=dict(depth=50, norm="frozen_bn"),
        dtype="bfloat16",
      ),
    )
  )
  model = build_model(config)
  assert isinstance(model, unet_resnet.ResNetUNet) and model.stride == 32
  assert (model.backbone.depth, model.backbone.norm, model.backbone.freeze_at) == (
    50,
    "frozen_bn",
    0,
  )
  assert model.backbone.dtype == jnp.bfloat16
  variables, (logits, aux) = init_shapes(tiny(dtype=jnp.bfloat16))
  assert logits.dtype == jnp.float32 and aux["c5"].dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("size", [(48, 64), (64, 80)])
def test_sizes_not_multiples_of_32_are_refused(size):
  with pytest.raises(ValueError, match="divisible by 32"):
    init_shapes(tiny(), jnp.zeros((1, *size, 3)))


def test_unknown_decoder_norm_is_refused():
  with pytest.raises(ValueError, match="Unknown decoder_norm"):
    init_shapes(tiny(decoder_norm="batchnorm"))
  with pytest.raises(ValueError, match="5 entries"):
    init_shapes(tiny(decoder_channels=(16, 8)))
  with pytest.raises(Exception, match="no attribute"):
    create_model(dict(name="unet_resnet", num_classes=2, backbone=dict(width=3)))


@long_test  # In CI, training: the U-Net's, tests/train/test_loop.py.
def test_tiny_config_trains_and_evaluates(tmp_path):
  from configs import unet_resnet_shapes

  config = unet_resnet_shapes.get_config("tiny")
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")  # Compiles much faster on CPU.
  try:
    metrics = loop.train_and_evaluate(config, str(tmp_path))
  finally:
    jax.config.update("jax_default_prng_impl", previous)
  assert 0 <= metrics["mean_iou"] <= 1
  assert len(metrics["per_class_iou"]) == config.model.num_classes
