"""Data parallelism: 8 simulated devices train like 1, pmap like jit, 2 processes like 1; for
Mask R-CNN, pmap averages per-device losses and 2 processes evaluate like 1."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mask_rcnn_shapes, unet_shapes
from segjax.data import instance_pipeline, pipeline
from segjax.models import build_model
from segjax.train import checkpoint, parallel, tasks
from segjax.train.state import initial_state
from tests.markers import TEST_XLA_FLAGS, long_test

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 4
# Float32 sums over 8 shards are reordered relative to 1 device: a few ulps per step. SGD
# keeps that difference linear (Adam would amplify it for near-zero gradients, whose update
# is +-lr whatever their size). Tolerances for 4 steps:
PARAM_ATOL = 1e-5
LOSS_RTOL = 1e-5


def _launch(script, args, *, devices=1, process_id=None, num_processes=None, port=None):
  """`python script args` on `devices` simulated CPU devices, optionally as one process of
  several."""
  env = {
    **os.environ,
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}",
  }
  args = [sys.executable, script, *args]
  if process_id is not None:
    args += [
      f"--coordinator_address=localhost:{port}",
      f"--num_processes={num_processes}",
      f"--process_id={process_id}",
    ]
  return subprocess.Popen(
    args, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
  )


def _train(workdir, *, devices=1, extra=(), **process):
  return _launch(
    "train.py",
    [
      "--config",
      "configs/unet_shapes.py:tiny",
      "--workdir",
      str(workdir),
      f"--config.num_train_steps={STEPS}",
      "--config.log_every_steps=1",
      f"--config.eval_every_steps={STEPS}",
      f"--config.checkpoint_every_steps={STEPS}",
      "--config.batch_size=8",
      "--config.eval_batch_size=8",
      "--config.optimizer=sgd",
      "--config.learning_rate=0.01",
      *extra,
    ],
    devices=devices,
    **process,
  )


def _finish(proc):
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  return out


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return (
    [r["loss"] for r in records if "loss" in r],
    [r for r in records if "eval/mean_iou" in r][-1],
  )


def _params(workdir):
  config = unet_shapes.get_config("tiny")
  config.optimizer = "sgd"  # As trained: the optimizer state's structure must match.
  mesh = parallel.make_mesh(1)
  model = build_model(config)
  _, abstract = initial_state(config, model, mesh)
  manager = checkpoint.checkpoint_manager(str(workdir), save_every_steps=1)
  with manager:
    state, step = checkpoint.restore(manager, abstract)
  assert step == STEPS
  return jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


def _assert_same_training(dir_a, dir_b):
  losses_a, eval_a = _losses(dir_a)
  losses_b, eval_b = _losses(dir_b)
  assert len(losses_a) == len(losses_b) == STEPS
  np.testing.assert_allclose(losses_a, losses_b, rtol=LOSS_RTOL)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL, rtol=1e-4),
    _params(dir_a),
    _params(dir_b),
  )
  assert eval_a["eval/mean_iou"] == pytest.approx(eval_b["eval/mean_iou"], abs=1e-3)


@pytest.fixture(scope="session")  # Kept across modules: built once per worker.
def one_device_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_device")
  _finish(_train(workdir))
  return workdir


@pytest.mark.xdist_group("one_device_run")
def test_eight_devices_train_like_one(one_device_run, tmp_path):
  out = _finish(_train(tmp_path, devices=8))
  _assert_same_training(one_device_run, tmp_path)
  assert f"step {STEPS}/{STEPS}" in out


@pytest.mark.xdist_group("one_device_run")
def test_pmap_trains_like_jit(one_device_run, tmp_path):
  _finish(_train(tmp_path, devices=8, extra=["--config.parallelism=pmap"]))
  _assert_same_training(one_device_run, tmp_path)


def test_batch_size_must_divide_over_devices(tmp_path):
  out, _ = _train(tmp_path, devices=3).communicate(timeout=300)
  assert (
    "config.batch_size=8 is the global batch and must be divisible by the number of "
    "devices, 3" in out
  )


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@long_test  # In CI, hosts: test_processes_read_disjoint_halves (the data).
def test_two_processes_train_together(tmp_path):
  port = _free_port()
  procs = [_train(tmp_path, devices=1, process_id=i, num_processes=2, port=port) for i in range(2)]
  # Each process asserts at the end that its parameters equal the other's (the loop's
  # `multihost_utils.assert_equal`), so both exiting cleanly means identical parameters.
  outs = [_finish(p) for p in procs]
  # Only process 0 logs.
  assert f"step {STEPS}/{STEPS}" in outs[0] and f"step {STEPS}/{STEPS}" not in outs[1]
  # One checkpoint both processes wrote: identical parameters by construction, with each
  # process's own data-iterator position.
  data_dir = os.path.join(tmp_path, "checkpoints", str(STEPS), "data")
  assert sorted(d for d in os.listdir(data_dir) if d.startswith("process_")) == [
    "process_0-of-2",
    "process_1-of-2",
  ]
  losses, eval_2proc = _losses(tmp_path)
  assert len(losses) == STEPS and np.all(np.isfinite(losses))
  # The 2-process evaluation equals a 1-process evaluation of the same checkpoint.
  proc = subprocess.run(
    [
      sys.executable,
      "evaluate.py",
      "--config",
      "configs/unet_shapes.py:tiny",
      "--workdir",
      str(tmp_path),
      "--config.eval_batch_size=8",
    ],
    cwd=REPO,
    text=True,
    capture_output=True,
    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  with open(os.path.join(tmp_path, "eval_metrics.json")) as f:
    single = json.load(f)
  assert single["mean_iou"] == pytest.approx(eval_2proc["eval/mean_iou"], abs=1e-6)
  assert single["pixel_accuracy"] == pytest.approx(eval_2proc["eval/pixel_accuracy"], abs=1e-6)


def test_processes_read_disjoint_halves():
  config = unet_shapes.get_config("tiny")
  shards = [
    list(
      pipeline.make_source(
        config.dataset, "train", process_index=i, process_count=2, **config.dataset.train_kwargs
      ).as_numpy_iterator()
    )
    for i in range(2)
  ]
  everything = list(
    pipeline.make_source(
      config.dataset, "train", process_index=0, process_count=1, **config.dataset.train_kwargs
    ).as_numpy_iterator()
  )
  keys = [{e["image"].tobytes() for e in shard} for shard in shards]
  assert len(shards[0]) == len(shards[1]) == len(everything) // 2
  assert not keys[0] & keys[1]
  assert keys[0] | keys[1] == {e["image"].tobytes() for e in everything}


MASK_RCNN_STEPS = 3
MASK_RCNN_LOSSES = ("loss", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask")
MASK_RCNN_ARGS = (
  "--config",
  "configs/mask_rcnn_shapes.py:tiny",
  "--config.batch_size=8",
  "--config.optimizer=sgd",
)


def _mask_rcnn_records(workdir, devices, extra=(), evaluate=False):
  """Loss records of a `MASK_RCNN_STEPS` run; `evaluate`: also COCO AP at the last step."""
  _finish(
    _launch(
      "train.py",
      [
        *MASK_RCNN_ARGS,
        "--workdir",
        str(workdir),
        f"--config.num_train_steps={MASK_RCNN_STEPS}",
        "--config.log_every_steps=1",
        f"--config.eval_every_steps={1000 if evaluate else 0}",
        "--config.checkpoint_every_steps=1000",
        "--config.eval_batch_size=8",
        "--config.learning_rate=0.01",
        *extra,
      ],
      devices=devices,
    )
  )
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="session")  # Kept across modules: built once per worker.
def mask_rcnn_one_device(tmp_path_factory):
  """(workdir, loss records) of a tiny Mask R-CNN trained on 1 device, checkpoint included."""
  workdir = tmp_path_factory.mktemp("mask_rcnn_one_device")
  return workdir, _mask_rcnn_records(workdir, devices=1)


# The tests sharing `mask_rcnn_one_device` run on one worker, which trains it once.
@long_test  # In CI, 8 devices: test_eight_devices_train_like_one.
@pytest.mark.xdist_group("mask_rcnn_one_device")
def test_mask_rcnn_eight_devices_train_like_one(mask_rcnn_one_device, tmp_path):
  _, one = mask_rcnn_one_device
  eight = _mask_rcnn_records(tmp_path / "eight", devices=8)
  assert len(one) == len(eight) == MASK_RCNN_STEPS
  for a, b in zip(one, eight, strict=True):
    for key in MASK_RCNN_LOSSES:
      assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)


def _first_step_device_losses(config, num_devices):
  """Each device's first-step losses, computed here as the pmap step does: device d gets
  example d of the first batch and the step's key folded with d; BatchNorm statistics are
  means over the devices (vmap with the pmap axis name, traced `parallel.per_device`)."""
  mesh = parallel.make_mesh(1)
  model = build_model(config)
  init, _ = initial_state(config, model, mesh)
  state = init()
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  batch = next(
    instance_pipeline.instance_train_dataset(
      config, local_batch_size=config.batch_size
    ).as_numpy_iterator()
  )
  slices = jax.tree.map(lambda x: x.reshape(num_devices, -1, *x.shape[1:]), batch)
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 1), 0)  # Step 0.
  rngs = jax.vmap(lambda d: jax.random.fold_in(rng, d))(jnp.arange(num_devices))
  loss_fn = tasks.get_task(config).bind_loss(config, model)

  def device_losses(device_batch, device_rng):
    loss, (metrics, _) = loss_fn(variables, device_batch, device_rng, train=True)
    return {**metrics, "loss": loss}

  return jax.jit(jax.vmap(parallel.per_device(device_losses), axis_name=parallel.PMAP_AXIS))(
    slices, rngs
  )


@long_test  # In CI, U-Net pmap: test_pmap_trains_like_jit.
def test_mask_rcnn_pmap_averages_device_losses(tmp_path):
  records = _mask_rcnn_records(
    tmp_path, devices=8, extra=["--config.parallelism=pmap"], evaluate=True
  )
  assert len(records) == MASK_RCNN_STEPS
  # Each device normalizes its losses over its own sampled anchors, ROIs and mask pixels, and
  # the step averages them over devices (as detectron2 averages per-GPU losses). Under jit the
  # box and mask losses are normalized over the global batch instead, and the sampling keys
  # differ, so pmap's losses equal jit's only in expectation; the mean over devices of
  # per-device losses is exact.
  config = mask_rcnn_shapes.get_config("tiny")
  config.batch_size, config.optimizer, config.parallelism = 8, "sgd", "pmap"
  per_device = _first_step_device_losses(config, num_devices=8)
  for key in MASK_RCNN_LOSSES:
    assert records[0][key] == pytest.approx(float(np.mean(per_device[key])), rel=1e-5), key
  assert records[-1]["loss"] < records[0]["loss"], [r["loss"] for r in records]
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:  # Evaluated under jit at the end.
    assert any("eval/box_AP" in r for r in map(json.loads, f))


def _evaluate_mask_rcnn(workdir, num_processes):
  """(metrics, detections) that `evaluate.py` writes with `num_processes` processes."""
  args = [
    *MASK_RCNN_ARGS,
    "--workdir",
    str(workdir),
    "--config.eval_batch_size=4",
    # 5 images: process 0 gets 3 (two batches, one padded), process 1 gets 2.
    "--config.dataset.eval_kwargs.num_examples=5",
  ]
  if num_processes == 1:
    _finish(_launch("evaluate.py", args))
  else:
    port = _free_port()
    procs = [
      _launch("evaluate.py", args, process_id=i, num_processes=num_processes, port=port)
      for i in range(num_processes)
    ]
    for p in procs:
      _finish(p)
  with (
    open(os.path.join(workdir, "eval_metrics.json")) as f,
    open(os.path.join(workdir, "detections.json")) as g,
  ):
    return json.load(f), json.load(g)


@long_test  # In CI, 2 processes: test_two_processes_train_together.
@pytest.mark.xdist_group("mask_rcnn_one_device")
def test_two_processes_evaluate_mask_rcnn_like_one(mask_rcnn_one_device):
  workdir, _ = mask_rcnn_one_device
  metrics_2, detections_2 = _evaluate_mask_rcnn(workdir, num_processes=2)
  metrics_1, detections_1 = _evaluate_mask_rcnn(workdir, num_processes=1)
  assert metrics_1.keys() == metrics_2.keys() and {"box_AP", "mask_AP"} <= metrics_1.keys()
  for key in metrics_1:
    assert metrics_2[key] == pytest.approx(metrics_1[key], abs=1e-6, nan_ok=True), key
  # Process 0 wrote the results of both processes: every image of the split, in image order.
  assert {d["image_id"] for d in detections_2} == set(range(5))
  column = lambda dets, key: np.array([d[key] for d in dets])
  for key in ("image_id", "category_id"):
    np.testing.assert_array_equal(column(detections_2, key), column(detections_1, key))
  # Per-device batches of 2 and 4 images round a few ulps differently.
  np.testing.assert_allclose(
    column(detections_2, "score"), column(detections_1, "score"), atol=1e-5
  )
  np.testing.assert_allclose(column(detections_2, "bbox"), column(detections_1, "bbox"), atol=1e-3)
