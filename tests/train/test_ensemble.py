"""Ensembles (`config.ensemble_size`, segjax/models/ensemble.py): E members trained in one step
equal E models trained alone; the ensemble scores at least its mean member; E=1 is no
ensemble; checkpoints restore for prediction with the members' mean softmax; 8 devices
train like 1."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mask_rcnn_shapes, unet_ensemble_shapes, unet_shapes
from segjax.data.shapes import shapes
from segjax.errors import ConfigError
from segjax.models import Ensemble, UNet, build_model
from segjax.predict import Predictor, normalize_padded
from segjax.train import checkpoint, loop, parallel, semantic
from segjax.train.state import create_train_state, initial_state
from segjax.train.steps import train_step
from tests.markers import TEST_XLA_FLAGS, long_test, rbg_prng

# One worker builds the trained fixture once for the tests that share it.
pytestmark = pytest.mark.xdist_group("ensemble")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
E = 3


def _tiny_config(**changes):
  config = unet_ensemble_shapes.get_config("tiny")
  config.image_size = (16, 16)
  config.model.depth = 1
  config.model.base_width = 4
  config.update(changes)
  return config


def _train(model, config, key, batches, step):
  state = create_train_state(model, config, key, jnp.zeros((1, *config.image_size, 3)))
  for batch in batches:
    state, metrics = step(state, batch, jax.random.key(1, impl="threefry2x32"))
  return jax.device_get((state.params, state.batch_stats)), jax.device_get(metrics)


def _random_batches(count, size, seed):
  rng = np.random.default_rng(seed)
  return [
    {
      "image": jnp.asarray(rng.normal(size=(size, 16, 16, 3)), jnp.float32),
      "mask": jnp.asarray(rng.integers(0, 5, size=(size, 16, 16)), jnp.int32),
    }
    for _ in range(count)
  ]


def jitted_step(model, config):
  return jax.jit(functools.partial(train_step, loss_fn=semantic.bind_loss(config, model)))


def _assert_member_equals(i, stacked, leaf):
  np.testing.assert_allclose(stacked[i], leaf, rtol=1e-5, atol=1e-5 * np.abs(leaf).max())


@long_test  # In CI, ensembles: tests/train/test_evaluator.py's.
def test_ensemble_equals_members_trained_alone():
  # Adam with gradient clipping that bites: global-norm clipping would scale every member by
  # the ensemble's norm, not each by its own. Threefry keys: nn.vmap splits the init key with
  # jax.random.split, and threefry's bits under vmap equal its bits per key (rbg's do not).
  config = _tiny_config(optimizer="adamw", grad_clip_norm=0.3)
  single = config.copy_and_resolve_references()
  single.ensemble_size = 1
  ensemble, member = build_model(config), build_model(single)
  assert isinstance(ensemble, Ensemble) and ensemble.member == member
  batches = _random_batches(5, 4, seed=0)
  key = jax.random.key(0, impl="threefry2x32")
  # The members batched by nn.vmap, and one after the other (what CPUs run).
  runs = [
    _train(variant, config, key, batches, jitted_step(variant, config))
    for variant in (ensemble.clone(vectorized=True), ensemble.clone(vectorized=False))
  ]
  step = jitted_step(member, single)
  norms, losses = [], []
  for i, member_key in enumerate(jax.random.split(key, E)):  # As nn.vmap and nn.scan split it.
    alone, alone_metrics = _train(member, single, member_key, batches, step)
    norms.append(float(alone_metrics["grad_norm"]))
    losses.append(float(alone_metrics["loss"]))
    for trees, _ in runs:
      jax.tree.map(functools.partial(_assert_member_equals, i), trees, alone)
  assert min(norms) > config.grad_clip_norm and len(set(norms)) == E  # Each clipped its own.
  for _, metrics in runs:
    member_losses = [metrics[f"member_{i}/loss"] for i in range(E)]
    np.testing.assert_allclose(member_losses, losses, rtol=1e-5)
    assert metrics["loss"] == pytest.approx(sum(losses), rel=1e-5)


@long_test  # In CI, ensembles: test_ensemble_equals_members_trained_alone.
def test_split_batch_members_equal_models_trained_alone_on_their_slices():
  """`ensemble_split_batch`: member i trains on the i-th third of each batch (E independent
  batches), as a lone model trained on those examples only; evaluation shares the batch."""
  config = _tiny_config(optimizer="adamw", ensemble_split_batch=True)
  single = config.copy_and_resolve_references()
  single.ensemble_size = 1
  ensemble, member = build_model(config), build_model(single)
  assert ensemble.split_batch
  batches = _random_batches(5, 6, seed=1)
  key = jax.random.key(0, impl="threefry2x32")
  # Trained one member after the other (what CPUs run); the vmapped members' forward pass on
  # the slices is compared below.
  scan = ensemble.clone(vectorized=False)
  runs = [_train(scan, config, key, batches, jitted_step(scan, config))]
  step = jitted_step(member, single)
  losses = []
  for i, member_key in enumerate(jax.random.split(key, E)):
    own = [jax.tree.map(lambda x, i=i: x[2 * i : 2 * i + 2], b) for b in batches]
    alone, alone_metrics = _train(member, single, member_key, own, step)
    losses.append(float(alone_metrics["loss"]))
    for trees, _ in runs:
      jax.tree.map(functools.partial(_assert_member_equals, i), trees, alone)
  assert len(set(losses)) == E
  for _, metrics in runs:
    np.testing.assert_allclose([metrics[f"member_{i}/loss"] for i in range(E)], losses, rtol=1e-5)
  trees = runs[0][0]
  variables = {"params": trees[0], "batch_stats": trees[1]}
  train_logits = [
    variant.apply(variables, batches[0]["image"], train=True, mutable=["batch_stats"])[0][0]
    for variant in (scan, ensemble.clone(vectorized=True))
  ]
  assert train_logits[0].shape == (E, 2, 16, 16, 5)
  np.testing.assert_allclose(train_logits[1], train_logits[0], rtol=1e-5, atol=1e-5)
  # In evaluation every member sees the whole batch.
  logits, _ = ensemble.apply(variables, batches[0]["image"], train=False)
  assert logits.shape == (E, 6, 16, 16, 5)
  with pytest.raises(ConfigError, match="a batch of 4 examples .* does not divide among 3"):
    jax.eval_shape(
      functools.partial(ensemble.apply, train=True, mutable=["batch_stats"]),
      {"params": trees[0], "batch_stats": trees[1]},
      jnp.zeros((4, 16, 16, 3)),
    )


def test_ensemble_size_one_is_the_member_and_bad_sizes_fail():
  plain = unet_shapes.get_config("tiny")
  one = unet_ensemble_shapes.get_config("tiny")
  one.ensemble_size = 1
  assert isinstance(build_model(one), UNet) and build_model(one) == build_model(plain)
  for size in (0, 2.0, True):
    config = unet_shapes.get_config("tiny")
    config.ensemble_size = size
    with pytest.raises(ConfigError, match=f"ensemble_size={size!r} must be a positive integer"):
      build_model(config)
  instance = mask_rcnn_shapes.get_config("tiny")
  instance.ensemble_size = 2
  with pytest.raises(ConfigError, match="ensembles are of semantic models; MaskRCNN"):
    build_model(instance)


# Trained long enough that members segment shapes, not only the background (whose IoU alone
# gives a mean IoU near 0.16 on shapes).
LEARNING = dict(
  num_train_steps=300,
  batch_size=8,
  schedule="constant",
  log_every_steps=100,
  eval_every_steps=300,
  checkpoint_every_steps=300,
  eval_batch_size=20,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  config = unet_ensemble_shapes.get_config("tiny")
  config.update(LEARNING)
  config.model.depth = 3
  config.dataset.train_kwargs.num_examples = 800
  config.dataset.eval_kwargs.num_examples = 20
  workdir = str(tmp_path_factory.mktemp("ensemble"))
  with rbg_prng():
    metrics = loop.train_and_evaluate(config, workdir)
  return config, workdir, metrics


@long_test
def test_ensemble_scores_at_least_its_mean_member(trained):
  _, workdir, metrics = trained
  members = [metrics[f"member_{i}/mean_iou"] for i in range(E)]
  assert np.mean(members) > 0.2, members  # Past background-only.
  assert metrics["mean_iou"] >= np.mean(members), (metrics["mean_iou"], members)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if "loss" in r]
  # The loss trained is the sum of the members' losses.
  for r in train:
    assert r["loss"] == pytest.approx(sum(r[f"member_{i}/loss"] for i in range(E)), rel=1e-5)
  assert records[-1]["eval/member_2/mean_iou"] == pytest.approx(members[2])


@long_test
def test_predictor_restores_the_ensemble_and_predicts_its_mean_softmax(trained):
  config, workdir, _ = trained
  predictor = Predictor.from_workdir(workdir)
  image = next(shapes("validation", **config.dataset.eval_kwargs).as_numpy_iterator())["image"]
  probs = predictor(image)["probs"]
  # By hand: each member alone, its parameters sliced from the checkpoint's stacked tree.
  member = predictor.model.member
  manager = checkpoint.checkpoint_manager(workdir, save_every_steps=1)
  _, abstract = initial_state(config, predictor.model, parallel.make_mesh(1))
  with manager:
    state, _ = checkpoint.restore(manager, abstract)
  variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  x = normalize_padded(image[None], jnp.asarray([image.shape[:2]], jnp.int32))
  expected = np.mean(
    [
      jax.nn.softmax(
        member.apply(jax.tree.map(lambda a, i=i: a[i], variables), x, train=False)[0][0], -1
      )
      for i in range(E)
    ],
    axis=0,
  )
  np.testing.assert_allclose(probs, expected, atol=1e-5)


EIGHT_DEVICE_RUN = dict(
  num_train_steps=3,
  log_every_steps=1,
  eval_every_steps=3,
  checkpoint_every_steps=3,
  batch_size=8,
  eval_batch_size=8,
  optimizer="sgd",  # Keeps float reordering linear, as tests/train/test_parallel.py.
  learning_rate=0.01,
)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@long_test
def test_eight_devices_train_the_ensemble_like_one(tmp_path):
  env = {
    **os.environ,
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=8",
  }
  overrides = [f"--config.{k}={v}" for k, v in EIGHT_DEVICE_RUN.items()]
  eight = subprocess.Popen(  # Runs while this process trains on its one device.
    [sys.executable, "train.py", "--config", "configs/unet_ensemble_shapes.py:tiny"]
    + ["--workdir", str(tmp_path / "8"), *overrides],
    cwd=REPO,
    env=env,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
  )
  config = unet_ensemble_shapes.get_config("tiny")
  config.update(EIGHT_DEVICE_RUN)
  loop.train_and_evaluate(config, str(tmp_path / "1"))
  out, _ = eight.communicate(timeout=600)
  assert eight.returncode == 0, out
  one, eight = (_records(tmp_path / str(d)) for d in (1, 8))
  for key in ("loss", *(f"member_{i}/loss" for i in range(E))):
    np.testing.assert_allclose(
      [r[key] for r in one if key in r], [r[key] for r in eight if key in r], rtol=1e-5
    )
  evals = [[r for r in records if "eval/mean_iou" in r][-1] for records in (one, eight)]
  for key in ("eval/mean_iou", *(f"eval/member_{i}/mean_iou" for i in range(E))):
    assert evals[0][key] == pytest.approx(evals[1][key], abs=1e-3)
