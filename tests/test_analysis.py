"""segjax/analysis.py: saliency and integrated gradients against closed forms, per-example
gradients against a Python loop of `grad`, and the hardest-examples command finding the
deliberately corrupted masks of a generated folder data set."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import unet_shapes
from segjax import analysis, models
from segjax.train import loop
from tests.markers import long_test

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W, C, K = 8, 6, 3, 4


def _global_linear(weights):
  """Every pixel's logits are one linear function of the whole image: (H, W, C, K) weights."""

  def apply_fn(images):
    logits = jnp.einsum("bhwc,hwck->bk", images, weights)
    return jnp.broadcast_to(logits[:, None, None], (*images.shape[:3], weights.shape[-1]))

  return apply_fn


def _smooth_conv_net(seed=0):
  """A small nonlinear (tanh, softplus) convolutional classifier."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  w1 = jax.random.normal(k1, (3, 3, C, 5)) * 0.5
  w2 = jax.random.normal(k2, (3, 3, 5, K)) * 0.5
  conv = functools.partial(
    jax.lax.conv_general_dilated,
    window_strides=(1, 1),
    padding="SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )

  def apply_fn(images):
    return jax.nn.softplus(conv(jnp.tanh(conv(images, w1)), w2))

  return apply_fn


def _image(seed=1):
  return jax.random.normal(jax.random.key(seed), (H, W, C))


@pytest.mark.parametrize("region", [None, "corner"])
def test_saliency_of_a_linear_model_is_its_weights(region):
  weights = jax.random.normal(jax.random.key(0), (H, W, C, K))
  mask = None if region is None else jnp.zeros((H, W), bool).at[:3, :2].set(True)
  got = analysis.saliency(_global_linear(weights), _image(), 2, region=mask)
  np.testing.assert_allclose(got, weights[..., 2], rtol=1e-5, atol=1e-6)


def test_saliency_of_a_pixelwise_linear_model_is_its_weights_over_the_region():
  weights, bias = jax.random.normal(jax.random.key(0), (C, K)), jnp.arange(K, dtype=jnp.float32)
  region = jnp.zeros((H, W), bool).at[2:4, 1].set(True)
  got = analysis.saliency(lambda x: x @ weights + bias, _image(), 1, region=region)
  expected = region[..., None] * weights[:, 1] / 2  # The mean over the region's 2 pixels.
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_integrated_gradients_of_a_linear_model_are_saliency_times_input():
  weights = jax.random.normal(jax.random.key(0), (H, W, C, K))
  apply_fn, image = _global_linear(weights), _image()
  got = analysis.integrated_gradients(apply_fn, image, 3, steps=4)
  np.testing.assert_allclose(
    got, analysis.saliency(apply_fn, image, 3) * image, rtol=1e-5, atol=1e-6
  )


def test_integrated_gradients_are_complete_for_a_nonlinear_model():
  apply_fn, image = _smooth_conv_net(), _image()
  baseline = 0.3 * _image(seed=2)
  region = jnp.zeros((H, W), bool).at[1:5, 3:6].set(True)
  for class_index in (0, 3):
    attributions = analysis.integrated_gradients(
      apply_fn, image, class_index, region=region, baseline=baseline, steps=64, batch_size=16
    )
    difference = analysis.class_score(apply_fn, image, class_index, region) - analysis.class_score(
      apply_fn, baseline, class_index, region
    )
    assert float(attributions.sum()) == pytest.approx(float(difference), rel=2e-3, abs=1e-4)
    # Pixels outside the region's receptive field (3x3, twice) get nothing.
    np.testing.assert_array_equal(attributions[:, 0], 0.0)


@pytest.fixture
def rbg_keys():
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")  # Compiles much faster on CPU.
  yield
  jax.config.update("jax_default_prng_impl", previous)


def test_per_example_gradients_equal_a_loop_of_grad(rbg_keys):
  config = unet_shapes.get_config("tiny")
  model = models.create_model({**config.model.to_dict(), "num_classes": 3})
  images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  masks = jax.random.randint(jax.random.key(1), (3, 16, 16), 0, 3)
  masks = masks.at[1, :8].set(255)  # Ignored pixels count in neither loss nor accuracy.
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(2), images[:1])
  batch_stats = jax.tree.map(lambda x: x + 0.1, variables["batch_stats"])  # Not the init's.
  loss_of_example = functools.partial(analysis.semantic_example_loss, model=model)
  losses, norms, aux = analysis.per_example_losses_and_grad_norms(
    loss_of_example,
    variables["params"],
    {"image": images, "mask": masks},
    batch_stats,
    has_aux=True,
  )
  assert losses.shape == norms.shape == (3,) and aux["prediction"].shape == (3, 16, 16)
  grad = jax.jit(jax.value_and_grad(loss_of_example, has_aux=True))
  for i in range(3):
    (loss, extra), grads = grad(
      variables["params"], {"image": images[i], "mask": masks[i]}, batch_stats
    )
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(losses[i], loss, rtol=1e-5)
    np.testing.assert_allclose(norms[i], norm, rtol=1e-5)
    np.testing.assert_array_equal(aux["prediction"][i], extra["prediction"])
    labelled = np.asarray(masks[i]) != 255
    accuracy = (np.asarray(extra["prediction"]) == np.asarray(masks[i]))[labelled].mean()
    np.testing.assert_allclose(aux["pixel_accuracy"][i], accuracy, rtol=1e-6)


def test_per_example_gradients_of_least_squares():
  """Without aux: the loss (x.w - y)**2 / 2 has the gradient (x.w - y) x."""
  params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.25)}
  batch = {"x": jax.random.normal(jax.random.key(0), (5, 3)), "y": jnp.arange(5.0)}

  def loss_of_example(p, example, scale):
    return scale * (example["x"] @ p["w"] + p["b"] - example["y"]) ** 2 / 2

  losses, norms = analysis.per_example_losses_and_grad_norms(loss_of_example, params, batch, 2.0)
  residuals = batch["x"] @ params["w"] + params["b"] - batch["y"]
  np.testing.assert_allclose(losses, residuals**2, rtol=1e-5)
  expected = 2 * np.abs(residuals) * np.sqrt(1 + np.sum(np.square(batch["x"]), -1))
  np.testing.assert_allclose(norms, expected, rtol=1e-5)


def test_rank_examples_orders_by_the_signal_then_index():
  ranked = analysis.rank_examples([4, 7, 9], [0.5, 2.0, 0.5], [3.0, 1.0, 2.0], [1, 0, 1], by="loss")
  assert [r["index"] for r in ranked] == [7, 4, 9] and [r["rank"] for r in ranked] == [0, 1, 2]
  by_norm = analysis.rank_examples(
    [4, 7, 9], [0.5, 2.0, 0.5], [3.0, 1.0, 2.0], [1, 0, 1], by="grad_norm"
  )
  assert [r["index"] for r in by_norm] == [4, 9, 7]
  with pytest.raises(ValueError, match="by="):
    analysis.rank_examples([], [], [], [], by="accuracy")


# A folder data set of coloured rectangles on black, the class given by the colour; a few
# examples have their masks' classes permuted.
COLOURS = {1: (230, 40, 40), 2: (40, 200, 40), 3: (40, 60, 230)}
NUM_EXAMPLES, CORRUPTED, SIZE = 64, (5, 27, 50), 32


def write_shapes_folder(data_dir) -> None:
  rng = np.random.default_rng(0)
  for sub in ("images", "masks"):
    os.makedirs(os.path.join(data_dir, "train", sub))
  for i in range(NUM_EXAMPLES):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for class_id in rng.permutation(list(COLOURS))[:2]:
      h, w = rng.integers(10, 18, 2)
      y, x = rng.integers(0, SIZE - h), rng.integers(0, SIZE - w)
      mask[y : y + h, x : x + w] = class_id
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    for class_id, colour in COLOURS.items():
      image[mask == class_id] = colour
    image = np.clip(image + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
    if i in CORRUPTED:  # 1 -> 2 -> 3 -> 1: every shape pixel labelled wrong.
      mask = np.where(mask > 0, mask % 3 + 1, 0).astype(np.uint8)
    Image.fromarray(image).save(os.path.join(data_dir, "train", "images", f"{i:03d}.png"))
    Image.fromarray(mask).save(os.path.join(data_dir, "train", "masks", f"{i:03d}.png"))


def folder_config(data_dir):
  config = unet_shapes.get_config("tiny")
  config.batch_size = 8
  config.num_train_steps = 120
  config.learning_rate = 1e-2
  config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 120
  config.dataset.name = "folder"
  config.dataset.data_dir = str(data_dir)
  config.dataset.train_split = config.dataset.eval_split = "train"
  config.dataset.images_dir, config.dataset.masks_dir = "{split}/images", "{split}/masks"
  config.dataset.mask_pattern = "{stem}.png"
  config.dataset.class_names = ("background", "red", "green", "blue")
  config.dataset.train_kwargs = config.dataset.eval_kwargs = {}
  config.model.num_classes = 4
  return config


@pytest.fixture(scope="module")  # Its tests share an xdist group: trained once.
def corrupted_workdir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("corrupted_data")
  write_shapes_folder(data_dir)
  workdir = str(tmp_path_factory.mktemp("corrupted_run"))
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")  # Compiles much faster on CPU.
  try:
    loop.train_and_evaluate(folder_config(data_dir), workdir)
  finally:
    jax.config.update("jax_default_prng_impl", previous)
  return workdir


@long_test  # In CI, analysis: test_per_example_gradients_equal_a_loop_of_grad.
@pytest.mark.xdist_group("analysis_corrupted")
def test_hardest_ranks_corrupted_masks_first(corrupted_workdir):
  top_k = 5
  result = analysis.hardest(
    corrupted_workdir, split="train", top_k=top_k, batch_size=8, log=lambda _: None
  )
  ranked = result["examples"]
  assert sorted(r["index"] for r in ranked) == list(range(NUM_EXAMPLES))  # Padding dropped.
  assert set(CORRUPTED) <= {r["index"] for r in ranked[:top_k]}, ranked[:top_k]
  assert [r["loss"] for r in ranked] == sorted((r["loss"] for r in ranked), reverse=True)
  with open(os.path.join(corrupted_workdir, "analysis", "hardest_train.json")) as f:
    assert json.load(f) == result
  panels = sorted(os.listdir(os.path.join(corrupted_workdir, "analysis", "hardest_train")))
  assert panels == [f"{r['rank']:03d}_{r['index']}.png" for r in ranked[:top_k]]


@long_test  # In CI, analysis: test_per_example_gradients_equal_a_loop_of_grad.
@pytest.mark.xdist_group("analysis_corrupted")
def test_hardest_command_ranks_by_grad_norm(corrupted_workdir):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "segjax.analysis",
      "hardest",
      "--workdir",
      corrupted_workdir,
      "--split",
      "train",
      "--top_k",
      "3",
      "--by",
      "grad_norm",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == 0, out.stderr
  with open(os.path.join(corrupted_workdir, "analysis", "hardest_train.json")) as f:
    result = json.load(f)
  assert result["by"] == "grad_norm"
  assert {r["index"] for r in result["examples"][:3]} == set(CORRUPTED)
  printed = out.stdout.splitlines()
  assert "The 3 hardest of 64 examples of split 'train' by grad_norm" in printed[0]
  assert [int(line.split()[1]) for line in printed[2:5]] == [
    r["index"] for r in result["examples"][:3]
  ]
  panels = sorted(os.listdir(os.path.join(corrupted_workdir, "analysis", "hardest_train")))
  assert panels == [f"{r['rank']:03d}_{r['index']}.png" for r in result["examples"][:3]]
