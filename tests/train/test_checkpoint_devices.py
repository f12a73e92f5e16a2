"""A checkpoint written on 8 devices resumes on 1, and one written on 1 resumes on 8: the run
continues as if uninterrupted (segjax/train/checkpoint.py restores onto the resuming run's
mesh). 8 simulated CPU devices need their own process (`XLA_FLAGS`, as test_parallel.py)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import unet_shapes
from segjax.models import build_model
from segjax.train import checkpoint, loop, parallel
from segjax.train.state import initial_state
from tests.markers import TEST_XLA_FLAGS, long_test

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A constant rate keeps the compiled step independent of the run length, so the two 8-device
# runs compile once (the session's persistent compilation cache).
OVERRIDES = dict(
  batch_size=8,
  eval_batch_size=8,
  optimizer="sgd",
  learning_rate=0.01,
  schedule="constant",
  warmup_steps=0,
  log_every_steps=1,
  checkpoint_every_steps=2,
  eval_every_steps=1000,
)
# As test_parallel.py: float32 sums over 8 shards differ from 1 device's by a few ulps a step.
PARAM_ATOL, LOSS_RTOL = 1e-5, 1e-5


def _config(num_train_steps):
  config = unet_shapes.get_config("tiny")
  config.update(OVERRIDES)
  config.num_train_steps = num_train_steps
  return config


def _train_on_8_devices(workdir, num_train_steps):
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  proc = subprocess.run(
    [
      sys.executable,
      "train.py",
      "--config",
      "configs/unet_shapes.py:tiny",
      "--workdir",
      str(workdir),
      f"--config.num_train_steps={num_train_steps}",
      *flags,
    ],
    cwd=REPO,
    env={
      **os.environ,
      "TF_CPP_MIN_LOG_LEVEL": "2",
      "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=8",
      "JAX_DEFAULT_PRNG_IMPL": "rbg",  # As below: faster to compile; no dropout, so no bits.
    },
    text=True,
    capture_output=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _params(workdir, step):
  """The checkpoint's parameters and statistics, restored on this process's 1 device."""
  config = _config(4)
  _, abstract = initial_state(config, build_model(config), parallel.make_mesh(1))
  with checkpoint.checkpoint_manager(str(workdir), save_every_steps=1) as manager:
    state, _ = checkpoint.restore(manager, abstract, step=step)
  return jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


def _assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=PARAM_ATOL, rtol=1e-4), a, b)


@long_test
def test_resume_from_8_devices_on_1_and_back(tmp_path, capsys):
  assert jax.device_count() == 1
  reference, mixed = tmp_path / "reference", tmp_path / "mixed"
  # Uninterrupted on 8 devices: checkpoints 2 and 4.
  _train_on_8_devices(reference, 4)
  expected = _losses(reference)
  assert sorted(expected) == [1, 2, 3, 4]

  # Checkpoint 2 (8 devices) resumed here on 1 device for step 3, saved as checkpoint 3.
  shutil.copytree(reference, mixed)
  shutil.rmtree(mixed / "checkpoints" / "4")
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")  # The initializer compiles much faster.
  try:
    loop.train_and_evaluate(_config(3), str(mixed))
  finally:
    jax.config.update("jax_default_prng_impl", previous)
  assert "Resuming from checkpoint at step 2" in capsys.readouterr().out
  assert _losses(mixed)[3] == pytest.approx(expected[3], rel=LOSS_RTOL)

  # Checkpoint 3 (1 device) resumed on 8 devices for step 4.
  out = _train_on_8_devices(mixed, 4)
  assert "Resuming from checkpoint at step 3" in out
  losses = _losses(mixed)
  assert sorted(losses) == [1, 2, 3, 4]
  assert losses[4] == pytest.approx(expected[4], rel=LOSS_RTOL)
  _assert_close(_params(mixed, 4), _params(reference, 4))
