"""Checkpoints that cannot be trusted are never used: corrupt ones are set aside on resume,
diverged states are never saved (segjax/train/checkpoint.py, segjax/train/loop.py)."""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import unet_shapes
from segjax.errors import ConfigError
from segjax.models import build_model
from segjax.train import checkpoint, loop, parallel
from segjax.train.state import initial_state
from tests.markers import long_test

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
  _, abstract = initial_state(config, build_model(config), parallel.make_mesh(1))
  with checkpoint.checkpoint_manager(workdir, save_every_steps=1) as manager:
    return {
      step: jax.device_get((state.params, state.batch_stats))
      for step in manager.all_steps()
      for state, _ in [checkpoint.restore(manager, abstract, step=step)]
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with checkpoints at steps 4 and 8, and their contents."""
  config = _config()
  workdir = str(tmp_path_factory.mktemp("trained"))
  loop.train_and_evaluate(config, workdir)
  return config, workdir, _restore_all(config, workdir)


def _remove_manifest(step_dir):
  os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def _truncate_largest_array_file(step_dir):
  files = [
    os.path.join(root, name)
    for root, _, names in os.walk(os.path.join(step_dir, "state"))
    for name in names
    if os.sep + "d" + os.sep in os.path.join(root, name) + os.sep
  ]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def _remove_data_iterator(step_dir):
  os.remove(os.path.join(step_dir, "data", "process_0-of-1", "tfdata.index"))


CORRUPTIONS = {
  "missing manifest": _remove_manifest,
  "truncated array file": _truncate_largest_array_file,
  "missing iterator file": _remove_data_iterator,
}


def _corrupt(workdir, step, how=_remove_manifest):
  how(os.path.join(workdir, "checkpoints", str(step)))


def _logged_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f if "loss" in json.loads(line)]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_latest_checkpoint_is_set_aside_and_resume_is_exact(trained, tmp_path, capsys, how):
  config, original, saved = trained
  assert sorted(saved) == [4, 8]
  workdir = str(tmp_path / "w")
  shutil.copytree(original, workdir)
  _corrupt(workdir, 8, CORRUPTIONS[how])
  loop.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert "Checkpoint 8 could not be restored" in out
  assert "Resuming from checkpoint at step 4" in out
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "8.corrupt"))
  assert _logged_steps(workdir) == [4, 8]  # Step 8's record replaced, not repeated.
  resumed = _restore_all(config, workdir)
  assert sorted(resumed) == [4, 8]
  # Steps 5-8 retrained from checkpoint 4 give checkpoint 8 again.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), resumed[8], saved[8]
  )


def test_no_restorable_checkpoint_moves_nothing(trained, tmp_path):
  config, original, _ = trained
  workdir = str(tmp_path / "w")
  shutil.copytree(original, workdir)
  _corrupt(workdir, 8)
  _corrupt(workdir, 4)
  with pytest.raises(
    RuntimeError,
    match=r"No checkpoint .* could be restored \(step 8: .*; "
    r"step 4: .*\)",
  ):
    loop.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]


def test_diverged_state_is_never_saved(tmp_path):
  # Log steps are rarer than checkpoints: only the check before each save sees the NaNs.
  # SGD at lr 100 on the tiny U-Net: finite at steps 3 and 6, NaN before step 9.
  config = _config(
    optimizer="sgd",
    learning_rate=100.0,
    warmup_steps=0,
    num_train_steps=30,
    checkpoint_every_steps=3,
    log_every_steps=30,
  )
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError, match=r"Non-finite parameters at step \d+: not saved"):
    loop.train_and_evaluate(config, workdir)
  kept = _restore_all(config, workdir)
  assert kept
  assert all(np.all(np.isfinite(x)) for step in kept for x in jax.tree.leaves(kept[step]))


@long_test  # In CI, resume: test_each_step_logged_once_after_kill_and_resume.
def test_changed_config_is_refused_on_resume_unless_allowed(trained, tmp_path):
  config, original, _ = trained
  workdir = str(tmp_path / "w")
  shutil.copytree(original, workdir)
  changed = _config(learning_rate=0.1, num_train_steps=12)
  with pytest.raises(ConfigError, match=r"learning_rate: 0.003 -> 0.1\. Use the recorded"):
    loop.train_and_evaluate(changed, workdir)
  assert json.load(open(os.path.join(workdir, "config.json")))["learning_rate"] == 0.003
  longer = _config(num_train_steps=12)  # Run length may change.
  loop.train_and_evaluate(longer, workdir)
  assert _logged_steps(workdir) == [4, 8, 12]
  changed = _config(learning_rate=0.1, num_train_steps=16)
  loop.train_and_evaluate(changed, workdir, allow_config_change=True)
  assert json.load(open(os.path.join(workdir, "config.json")))["learning_rate"] == 0.1
  assert json.load(open(os.path.join(workdir, "config.12.json")))["learning_rate"] == 0.1


def test_each_step_logged_once_after_kill_and_resume(tmp_path):
  args = [
    sys.executable,
    "train.py",
    "--config",
    "configs/unet_shapes.py:tiny",
    "--workdir",
    str(tmp_path),
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=5",
    "--config.eval_every_steps=1000",
  ]
  proc = subprocess.Popen(
    [*args, "--config.num_train_steps=100000"],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  metrics = os.path.join(tmp_path, "metrics.jsonl")
  deadline = time.time() + 240
  try:
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(metrics) and max(_logged_steps(tmp_path), default=0) >= 8:
        break
      time.sleep(0.2)
  finally:
    proc.kill()  # SIGKILL: no chance to save.
    proc.wait()
  assert max(_logged_steps(tmp_path)) >= 8
  subprocess.run(
    [*args, "--config.num_train_steps=12"],
    cwd=REPO,
    check=True,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    timeout=300,
  )
  assert _logged_steps(tmp_path) == list(range(1, 13))
