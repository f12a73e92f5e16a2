"""Tests for segjax/train/xla_options.py: a config's compiler options reach the compiled steps
on their platform only, and the U-Net's CPU options leave its step's numbers unchanged."""

import functools

import jax
import ml_collections
import numpy as np
import pytest

from configs import unet_shapes
from segjax.errors import ConfigError
from segjax.models import build_model
from segjax.train import parallel, semantic, tasks, xla_options
from segjax.train.state import initial_state
from segjax.train.steps import train_step
from tests.markers import long_test, rbg_prng

YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _config(**options):
  config = ml_collections.ConfigDict({"parallelism": "jit"})
  if options:
    config.compiler_options = options
  return config


def test_options_of_the_named_platform_only():
  config = _config(cpu=YNN_OFF, gpu={"xla_gpu_autotune_level": 0})
  assert xla_options.compiler_options(config, "cpu") == YNN_OFF
  assert xla_options.compiler_options(config, "gpu") == {"xla_gpu_autotune_level": 0}
  assert xla_options.compiler_options(config, "tpu") is None
  assert xla_options.compiler_options(_config(), "cpu") is None
  assert xla_options.compiler_options(config) == (
    YNN_OFF if jax.default_backend() == "cpu" else {"xla_gpu_autotune_level": 0}
  )


def test_bad_options_name_the_field():
  with pytest.raises(ConfigError, match=r"unknown platform\(s\) \['cuda'\]"):
    xla_options.compiler_options(_config(cuda=YNN_OFF), "cpu")
  with pytest.raises(ConfigError, match="xla_cpu_x=\\[1\\] is a list"):
    xla_options.compiler_options(_config(cpu={"xla_cpu_x": [1]}), "cpu")


def _unet_setup(config):
  config.batch_size, config.image_size = 2, (32, 32)
  config.model.depth, config.model.base_width = 2, 8
  mesh = parallel.make_mesh(1)
  model = build_model(config)
  init, _ = initial_state(config, model, mesh)
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.normal(size=(2, 32, 32, 3)).astype(np.float32),
    "mask": rng.integers(0, config.model.num_classes, (2, 32, 32)).astype(np.int32),
  }
  runner = parallel.runner(config, mesh)
  step = runner.train_step(
    functools.partial(train_step, loss_fn=functools.partial(semantic.loss_fn, model=model))
  )
  return step, runner.to_run_state(init()), runner.batch(batch)


@long_test  # In CI, options: test_options_of_the_named_platform_only.
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's options")
def test_unet_step_compiles_with_the_config_options_and_computes_the_same():
  with_options = unet_shapes.get_config()
  assert xla_options.compiler_options(with_options) == YNN_OFF
  without = unet_shapes.get_config()
  del without["compiler_options"]
  results, texts = [], []
  for config in (with_options, without):
    step, state, batch = _unet_setup(config)
    key = jax.random.key(0)
    texts.append(step.lower(state, batch, key).compile().as_text())
    for _ in range(2):
      state, metrics = step(state, batch, key)
    results.append((jax.device_get(metrics), jax.device_get(state.params)))
  if "__ynn_fusion" not in texts[1]:
    pytest.skip("this jaxlib's XLA:CPU does not fuse into YNNPACK by default")
  assert "__ynn_fusion" not in texts[0]
  (metrics_a, params_a), (metrics_b, params_b) = results
  np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-5)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), params_a, params_b
  )


@long_test  # In CI, options: the U-Net step test.
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's options")
def test_predictor_compiles_with_the_config_options():
  from segjax.predict import Predictor

  config = unet_shapes.get_config("tiny")
  model = build_model(config)
  images = np.zeros((1, 32, 32, 3), np.uint8)
  variables = model.init(jax.random.key(0), images.astype(np.float32), train=False)
  texts = []
  for options in (config.compiler_options, None):
    config.compiler_options = options
    infer = Predictor(config, variables, model=model).infer
    texts.append(infer.lower(variables, images, np.full((1, 2), 32, np.int32)).compile().as_text())
  if "__ynn_fusion" not in texts[1]:
    pytest.skip("this jaxlib's XLA:CPU does not fuse into YNNPACK by default")
  assert "__ynn_fusion" not in texts[0]


def _mask_rcnn_step(options):
  """(temporary bytes, metrics, parameters) of one train step of the golden test's tiny Mask
  R-CNN on its batch, compiled with XLA `options`."""
  from tests.train.test_golden import _batch, _config

  config = _config()
  config.compiler_options = options
  mesh = parallel.make_mesh(1)
  model = build_model(config)
  init, _ = initial_state(config, model, mesh)
  runner = parallel.runner(config, mesh)
  loss_fn = tasks.get_task(config).bind_loss(config, model)
  step = runner.train_step(functools.partial(train_step, loss_fn=loss_fn))
  state, batch, key = runner.to_run_state(init()), runner.batch(_batch()), jax.random.key(0)
  temp = step.lower(state, batch, key).compile().memory_analysis().temp_size_in_bytes
  state, metrics = step(state, batch, key)
  return temp, jax.device_get(metrics), jax.device_get(state.params)


@long_test  # In CI, options: the U-Net test.
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's options")
def test_mask_rcnn_memory_optimized_schedule_holds_less_and_computes_the_same():
  from configs import mask_rcnn_shapes

  options = mask_rcnn_shapes.get_config().compiler_options
  assert xla_options.compiler_options(mask_rcnn_shapes.get_config()) == {
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
  }
  with rbg_prng():  # Compiles faster; both steps draw the same bits.
    temp_a, metrics_a, params_a = _mask_rcnn_step(options)
    temp_b, metrics_b, params_b = _mask_rcnn_step(None)
  assert temp_a < temp_b, (temp_a, temp_b)
  for name in metrics_b:
    np.testing.assert_allclose(metrics_a[name], metrics_b[name], rtol=1e-5, err_msg=name)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7), params_a, params_b
  )


def _conv_config(name):
  return ml_collections.ConfigDict({"cpu_convolutions": name})


def _onednn_loads() -> bool:
  from segjax.kernels import onednn_conv

  return onednn_conv.available()


def test_cpu_convolutions_choice(monkeypatch):
  from segjax.kernels import onednn_conv

  on_cpu = jax.default_backend() == "cpu"
  assert xla_options.cpu_convolutions(_conv_config("xla")) == "xla"
  expected = "onednn" if on_cpu and _onednn_loads() else "xla"
  assert xla_options.cpu_convolutions(ml_collections.ConfigDict()) == expected  # "auto"
  with pytest.raises(ConfigError, match=r"cpu_convolutions: 'mkl' is not one of"):
    xla_options.cpu_convolutions(_conv_config("mkl"))

  def unavailable():
    raise onednn_conv.OnednnUnavailable("no C++ compiler found")

  monkeypatch.setattr(onednn_conv, "load", unavailable)
  assert xla_options.cpu_convolutions(_conv_config("auto")) == "xla"
  if on_cpu:
    with pytest.raises(ConfigError, match=r"cpu_convolutions='onednn': no C\+\+ compiler"):
      xla_options.cpu_convolutions(_conv_config("onednn"))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="oneDNN's convolutions: CPU only")
def test_unet_step_on_onednn_convolutions_computes_the_same():
  if not _onednn_loads():
    pytest.skip("oneDNN unavailable")
  results, calls = [], []
  for name in ("onednn", "xla"):
    config = unet_shapes.get_config()
    config.cpu_convolutions = name
    step, state, batch = _unet_setup(config)
    key = jax.random.key(0)
    text = step.lower(state, batch, key).as_text()
    calls.append(
      [text.count(f"segjax_onednn_conv_{k}") for k in ("forward", "input_grad", "kernel_grad")]
    )
    for _ in range(2):
      state, metrics = step(state, batch, key)
    results.append((jax.device_get(metrics), jax.device_get(state.params)))
  # Depth 2: 4 convs in the encoder, 2 in the bottleneck, 2 x 2 in the decoder (its first ones
  # on the concatenation of the upsampled features and the skip), 2 up-convolutions (1x1 to 4x
  # the channels), the 1x1 head: 13, each with its gradients but for the image's.
  assert calls == [[13, 12, 13], [0, 0, 0]]
  (metrics_a, params_a), (metrics_b, params_b) = results
  np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-5)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-3, atol=1e-5), params_a, params_b
  )
