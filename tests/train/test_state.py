"""Tests for segjax/train/state.py: the learning-rate schedules."""

import ml_collections
import numpy as np
import pytest

from segjax.train.state import learning_rate_schedule


def _config(**overrides):
  config = dict(
    schedule="piecewise",
    learning_rate=0.02,
    warmup_steps=1000,
    num_train_steps=90_000,
    lr_boundaries=(60_000, 80_000),
  )
  return ml_collections.ConfigDict({**config, **overrides})


def test_piecewise_is_detectron2_multistep_with_warmup():
  schedule = learning_rate_schedule(_config())
  steps = [0, 500, 1000, 59_999, 60_000, 79_999, 80_000, 89_999]
  np.testing.assert_allclose(
    [float(schedule(s)) for s in steps],
    [0.0, 0.01, 0.02, 0.02, 0.002, 0.002, 0.0002, 0.0002],
    rtol=1e-5,
  )


def test_piecewise_boundaries_must_follow_warmup():
  with pytest.raises(ValueError, match="lr_boundaries"):
    learning_rate_schedule(_config(lr_boundaries=(500, 80_000)))
