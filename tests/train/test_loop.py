"""End-to-end: training lowers the loss, writes its outputs, resumes exactly, stops on SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import unet_shapes
from segjax.errors import Terminated
from segjax.models import build_model
from segjax.train import checkpoint, loop, parallel
from segjax.train.state import initial_state
from segjax.train.writer import MetricWriter
from tests.markers import long_test

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _final_params(config, workdir):
  mesh = parallel.make_mesh(1)
  model = build_model(config)
  _, abstract = initial_state(config, model, mesh)
  manager = checkpoint.checkpoint_manager(workdir, save_every_steps=1)
  with manager:
    state, step = checkpoint.restore(manager, abstract)
  return jax.device_get(state.params), jax.device_get(state.batch_stats), step


@pytest.fixture(scope="session")  # Kept across modules: built once per worker.
def trained(tmp_path_factory):
  config = unet_shapes.get_config("tiny")
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  eval_metrics = loop.train_and_evaluate(config, workdir)
  return config, workdir, eval_metrics


@pytest.mark.xdist_group("unet_trained")
def test_training_lowers_loss_and_writes_outputs(trained):
  config, workdir, eval_metrics = trained
  records = _records(workdir)
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval/mean_iou" in r]
  assert [r["step"] for r in train] == list(range(5, 21, 5))
  assert train[-1]["loss"] < 0.9 * train[0]["loss"]
  for r in train:
    assert {"learning_rate", "images_per_sec", "pixel_accuracy"} <= r.keys()
    assert r["images_per_sec"] > 0 and np.isfinite(r["loss"])
  assert [r["step"] for r in evals] == [10, 20]
  assert evals[-1]["eval/mean_iou"] == pytest.approx(eval_metrics["mean_iou"])
  assert len(evals[-1]["eval/per_class_iou"]) == config.model.num_classes
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
  assert json.load(open(os.path.join(workdir, "config.json")))["batch_size"] == 4


def _tensorboard_events(workdir) -> dict:
  """{tag: {step: value or image shape}} read back from workdir/tensorboard's event files."""
  import tensorflow as tf

  directory = os.path.join(workdir, "tensorboard")
  events = {}
  for name in sorted(os.listdir(directory)):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name)):
      for value in event.summary.value:
        array = tf.make_ndarray(value.tensor)
        if value.metadata.plugin_data.plugin_name == "images":  # [width, height, png, ...]
          array = tf.io.decode_png(array[2]).shape
        events.setdefault(value.tag, {})[event.step] = array
  return events


@pytest.mark.xdist_group("unet_trained")
def test_tensorboard_holds_every_logged_scalar(trained):
  _, workdir, _ = trained
  events = _tensorboard_events(workdir)
  for record in _records(workdir):
    for key, value in record.items():
      if key == "step" or value is None:
        continue
      values = value if isinstance(value, list) else [value]
      for i, v in enumerate(values):
        tag = key if not isinstance(value, list) else f"{key}/{i}"
        if v is not None:
          assert float(events[tag][record["step"]]) == pytest.approx(v, rel=1e-6), tag


def test_progress_line_estimates_the_time_left(tmp_path, monkeypatch, capsys):
  now = [100.0]
  monkeypatch.setattr("segjax.train.writer.time.time", lambda: now[0])
  writer = MetricWriter(str(tmp_path), num_train_steps=100)
  now[0] = 150.0
  writer.write(10, {"loss": 1.0})  # The first record (after compiling) starts the clock.
  now[0] = 170.0
  writer.write(30, {"loss": 0.5})  # 20 steps in 20 s: 70 left take 70 s.
  lines = capsys.readouterr().out.splitlines()
  assert "ETA" not in lines[0] and "step 30/100 (30%) ETA 1m10s loss=0.5" in lines[1]


@pytest.mark.xdist_group("unet_trained")
def test_resume_after_sigterm_continues_exactly(trained, tmp_path, monkeypatch, capsys):
  config, reference_dir, _ = trained
  workdir = str(tmp_path)
  original_write = MetricWriter.write

  def write_then_terminate(self, step, metrics):
    original_write(self, step, metrics)
    if step == 5 and "loss" in metrics:
      os.kill(os.getpid(), signal.SIGTERM)

  with monkeypatch.context() as m:
    m.setattr(MetricWriter, "write", write_then_terminate)
    with pytest.raises(Terminated, match="stopped at step 5; checkpoint saved"):
      loop.train_and_evaluate(config, workdir)
  stopped_at = max(r["step"] for r in _records(workdir))
  assert stopped_at < config.num_train_steps
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["5"]

  loop.train_and_evaluate(config, workdir)
  assert "Resuming from checkpoint at step 5" in capsys.readouterr().out
  steps = [r["step"] for r in _records(workdir) if "loss" in r]
  assert steps == [5, 10, 15, 20]  # Continued from 5: no step trained or logged twice.

  params, stats, step = _final_params(config, workdir)
  ref_params, ref_stats, ref_step = _final_params(config, reference_dir)
  assert step == ref_step == config.num_train_steps
  # Same data order and same updates as the uninterrupted run.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    (params, stats),
    (ref_params, ref_stats),
  )


def _run(args, **kwargs):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  return subprocess.Popen(
    [sys.executable, *args],
    cwd=REPO,
    env=env,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    **kwargs,
  )


def test_sigterm_saves_checkpoint_before_exit(tmp_path):
  workdir = str(tmp_path)
  proc = _run(
    [
      "train.py",
      "--config",
      "configs/unet_shapes.py:tiny",
      "--workdir",
      workdir,
      "--config.num_train_steps=100000",
      "--config.checkpoint_every_steps=100000",
      "--config.eval_every_steps=100000",
    ]
  )
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while not os.path.exists(metrics) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.5)
  assert os.path.exists(metrics), proc.communicate()[0]
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143, out  # 128 + SIGTERM: stopped early, to be resumed.
  assert "checkpoint saved" in out
  saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert len(saved) == 1 and 5 <= saved[0] < 100000
  assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]


@pytest.mark.xdist_group("unet_trained")
def test_evaluate_writes_metrics_and_visualizations(trained):
  config, workdir, eval_metrics = trained
  proc = _run(
    [
      "evaluate.py",
      "--config",
      "configs/unet_shapes.py:tiny",
      "--workdir",
      workdir,
      "--num_visualizations",
      "3",
    ]
  )
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert "mean_iou" in out and "oneDNN" not in out
  metrics = json.load(open(os.path.join(workdir, "eval_metrics.json")))
  assert metrics["step"] == config.num_train_steps
  assert metrics["mean_iou"] == pytest.approx(eval_metrics["mean_iou"], abs=1e-6)
  assert {
    "pixel_accuracy",
    "mean_class_accuracy",
    "frequency_weighted_iou",
    "per_class_iou",
  } <= metrics.keys()
  pngs = sorted(os.listdir(os.path.join(workdir, "visualizations")))
  assert pngs == ["0000.png", "0001.png", "0002.png"]
  from PIL import Image

  shape = np.asarray(Image.open(os.path.join(workdir, "visualizations", pngs[0]))).shape
  h, w = config.image_size  # 32: upscaled 8 times to 256, three panels 2 px apart, titled.
  assert shape[1] == 3 * 8 * w + 4 and shape[0] > 16 + 8 * h
  images = _tensorboard_events(workdir)["visualizations/0000"]
  assert tuple(images[config.num_train_steps]) == shape


@pytest.mark.parametrize(
  "override, expected",
  [
    ("--config.nope=1", "Unknown config key 'nope'"),
    ("--config.model.depthh=2", 'Did you mean "depth"'),
    ("--config.batch_size=abc", "batch_size"),
  ],
)
def test_bad_config_override_is_a_clear_error(tmp_path, override, expected):
  proc = _run(
    ["train.py", "--config", "configs/unet_shapes.py:tiny", "--workdir", str(tmp_path), override]
  )
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0
  assert expected in out
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


@long_test  # In CI, bfloat16: the models' dtype tests.
def test_bfloat16_computes_in_bf16_with_float32_state(tmp_path):
  config = unet_shapes.get_config("tiny")
  config.model.dtype = "bfloat16"
  config.num_train_steps = 10
  model = build_model(config)
  _, abstract = initial_state(config, model, parallel.make_mesh(1))
  assert {
    x.dtype
    for x in jax.tree.leaves((abstract.params, abstract.opt_state))
    if hasattr(x, "dtype") and x.ndim
  } == {np.dtype("float32")}
  sample = np.zeros((1, *config.image_size, 3), np.float32)
  variables = model.init(jax.random.key(0), sample, train=False)
  _, intermediates = model.apply(variables, sample, train=False, mutable=["intermediates"])
  assert {x.dtype for x in jax.tree.leaves(intermediates)} == {jax.numpy.dtype("bfloat16")}
  loop.train_and_evaluate(config, str(tmp_path))
  losses = [r["loss"] for r in _records(str(tmp_path)) if "loss" in r]
  assert losses[-1] < losses[0] and np.all(np.isfinite(losses))
