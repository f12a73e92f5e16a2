"""Metric writing: one JSON object per line in `workdir/metrics.jsonl`, and a readable log line.

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


class MetricWriter:
  """Appends `{"step": ..., **metrics}` to `metrics.jsonl` and logs it with progress."""

  def __init__(self, workdir: str, *, enabled: bool = True, num_train_steps: int | None = None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self.num_train_steps = num_train_steps
    self._start = time.time()

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
    print(self._format(record), flush=True)

  def _format(self, record: dict) -> str:
    step = record["step"]
    progress = f"step {step}"
    if self.num_train_steps:
      progress += f"/{self.num_train_steps} ({100 * step / self.num_train_steps:.0f}%)"
    values = " ".join(
      f"{k}={v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}"
      for k, v in record.items() if k != "step" and not isinstance(v, list))
    return f"[{time.time() - self._start:7.1f}s] {progress} {values}"
