"""Metric writing: one JSON object per line in `workdir/metrics.jsonl`, TensorBoard event files
in `workdir/tensorboard/` (scalars; images from `write_images`), and a readable log line with
the progress and the estimated time left.

Only process 0 writes (big_vision `BigVisionMetricWriter`); other processes get a writer that
does nothing, so calling code needs no `if process_index == 0`.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np


def to_json_value(value):
  """Python scalars and lists from numpy/jax values; NaN (an absent class's IoU) as None."""
  if isinstance(value, str):
    return value
  value = np.asarray(value)
  if value.ndim:
    return [to_json_value(v) for v in value]
  value = value.item()
  return None if isinstance(value, float) and math.isnan(value) else value


def tensorboard_scalars(metrics: dict) -> dict[str, float]:
  """The numeric values of `metrics` by TensorBoard tag; a list (per-class IoU) becomes one
  tag per entry, `name/i`; strings and None are left out."""
  scalars = {}
  for key, value in metrics.items():
    value = to_json_value(value)
    entries = enumerate(value) if isinstance(value, list) else [(None, value)]
    for index, entry in entries:
      if isinstance(entry, (int, float)) and not isinstance(entry, bool):
        scalars[key if index is None else f"{key}/{index}"] = float(entry)
  return scalars


class MetricWriter:
  """Appends `{"step": ..., **metrics}` to `metrics.jsonl`, writes the numeric values to
  TensorBoard (`workdir/tensorboard/`), and logs them with progress and time left."""

  def __init__(self, workdir: str, *, enabled: bool = True, num_train_steps: int | None = None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard_dir = os.path.join(workdir, "tensorboard")
    self.enabled = enabled
    self.num_train_steps = num_train_steps
    self._start = time.time()
    self._first: tuple[float, int] | None = None  # (time, step) of the first record.
    self._summary_writer = None

  def _summaries(self):
    if self._summary_writer is None:
      import tensorflow as tf

      self._summary_writer = tf.summary.create_file_writer(self.tensorboard_dir)
    return self._summary_writer

  def write_images(self, step: int, images: dict) -> None:
    """TensorBoard images: {tag: uint8 (H, W, 3) array}."""
    if not self.enabled or not images:
      return
    import tensorflow as tf

    with self._summaries().as_default():
      for tag, image in images.items():
        tf.summary.image(tag, np.asarray(image, np.uint8)[None], step=int(step))
    self._summary_writer.flush()

  def drop_after(self, step: int) -> None:
    """Removes the records of steps after `step`: on resume from a checkpoint at `step`,
    they are logged again, so each step appears once."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)  # Atomic: a crash now leaves the old or the new file.

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: to_json_value(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    import tensorflow as tf

    with self._summaries().as_default():
      for tag, value in tensorboard_scalars(metrics).items():
        tf.summary.scalar(tag, value, step=int(step))
    self._summary_writer.flush()
    if self._first is None:
      self._first = (time.time(), int(step))
    print(self._format(record), flush=True)

  def _format(self, record: dict) -> str:
    step = record["step"]
    progress = f"step {step}"
    if self.num_train_steps:
      progress += f"/{self.num_train_steps} ({100 * step / self.num_train_steps:.0f}%)"
      (first_time, first_step), now = self._first, time.time()
      if first_step < step < self.num_train_steps:  # The rate since the first record: no compile.
        left = (now - first_time) / (step - first_step) * (self.num_train_steps - step)
        progress += f" ETA {format_duration(left)}"
    values = " ".join(
      f"{k}={v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}"
      for k, v in record.items()
      if k != "step" and not isinstance(v, list)
    )
    return f"[{time.time() - self._start:7.1f}s] {progress} {values}"


def format_duration(seconds: float) -> str:
  """`1h02m`, `3m05s` or `42s`."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
