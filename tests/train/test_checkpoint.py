"""Checkpoints that cannot be trusted are never used: corrupt ones are set aside on resume,
diverged states are never saved (segjax/train/checkpoint.py, segjax/train/loop.py)."""

import os
import shutil

import jax
import numpy as np
import pytest

from configs import unet_shapes
from segjax.train import checkpoint, loop


def _config(**overrides):
  config = unet_shapes.get_config("tiny")
  config.num_train_steps = 8
  config.checkpoint_every_steps = 4
  config.eval_every_steps = 1000
  config.log_every_steps = 4
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def _restore_all(config, workdir):
  """{step: (params, batch_stats)} of every checkpoint kept in `workdir`."""
  _, abstract = loop.initial_state(config, loop.build_model(config),
                                   jax.make_mesh((1,), ("data",)))
  with checkpoint.checkpoint_manager(workdir, save_every_steps=1) as manager:
    return {step: jax.device_get((state.params, state.batch_stats)) for step in
            manager.all_steps() for state, _ in [checkpoint.restore(manager, abstract,
                                                                    step=step)]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with checkpoints at steps 4 and 8, and their contents."""
  config = _config()
  workdir = str(tmp_path_factory.mktemp("trained"))
  loop.train_and_evaluate(config, workdir)
  return config, workdir, _restore_all(config, workdir)


def _corrupt(workdir, step):
  os.remove(os.path.join(workdir, "checkpoints", str(step), "state", "manifest.ocdbt"))


def test_corrupt_latest_checkpoint_is_set_aside_and_resume_is_exact(trained, tmp_path, capsys):
  config, original, saved = trained
  assert sorted(saved) == [4, 8]
  workdir = str(tmp_path / "w")
  shutil.copytree(original, workdir)
  _corrupt(workdir, 8)
  loop.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert "Checkpoint 8 could not be restored" in out
  assert "Resuming from checkpoint at step 4" in out
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "corrupt_8"))
  resumed = _restore_all(config, workdir)
  assert sorted(resumed) == [4, 8]
  # Steps 5-8 retrained from checkpoint 4 give checkpoint 8 again.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               resumed[8], saved[8])


def test_no_restorable_checkpoint_moves_nothing(trained, tmp_path):
  config, original, _ = trained
  workdir = str(tmp_path / "w")
  shutil.copytree(original, workdir)
  _corrupt(workdir, 8)
  _corrupt(workdir, 4)
  with pytest.raises(RuntimeError, match=r"No checkpoint .* could be restored \(step 8: .*; "
                     r"step 4: .*\)"):
    loop.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]


def test_diverged_state_is_never_saved(tmp_path):
  # Log steps are rarer than checkpoints: only the check before each save sees the NaNs.
  # SGD at lr 100 on the tiny U-Net: finite at steps 3 and 6, NaN before step 9.
  config = _config(optimizer="sgd", learning_rate=100.0, warmup_steps=0, num_train_steps=30,
                   checkpoint_every_steps=3, log_every_steps=30)
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError, match=r"Non-finite parameters at step \d+: not saved"):
    loop.train_and_evaluate(config, workdir)
  kept = _restore_all(config, workdir)
  assert kept
  assert all(np.all(np.isfinite(x)) for step in kept for x in jax.tree.leaves(kept[step]))
