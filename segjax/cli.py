"""What `train.py` and `evaluate.py` share: flag parsing with clear config errors, TF setup."""

from __future__ import annotations

import os
import re
import sys

from absl import flags

# Before TensorFlow is first imported. tf.data needs no oneDNN kernels; with them on, TF prints
# a notice at import that no log level hides.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def hide_gpus_from_tensorflow() -> None:
  """tf.data only needs the CPU; without this TF grabs GPU memory that JAX needs."""
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")


def define_distributed_flags() -> None:
  """Flags for multi-process runs outside managed clusters (Cloud TPU needs none of them)."""
  flags.DEFINE_string("coordinator_address", None,
                      "Multi-process runs outside managed clusters: host:port of process 0.")
  flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes.")
  flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")


def initialize_distributed() -> None:
  """Joins a multi-process run from the flags or the cluster's environment, if there is one."""
  from segjax.train import parallel

  f = flags.FLAGS
  parallel.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)


def quiet_logging() -> None:
  """Warnings only (orbax logs every save at INFO), unless `--verbosity` was given."""
  from absl import logging

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that turns an unknown `--config.key` into an error naming the key."""
  try:
    return flags.FLAGS(argv)
  except AttributeError as e:
    message = str(e).encode().decode("unicode_escape")
    missing = m.group(1) if (m := re.search(r"'(\w+)'", message)) else message
    keys = [m.group(1) for a in argv if (m := re.match(r"--config\.([\w.]+)", a))]
    key = next((k for k in keys if missing in k.split(".")), missing)
    hint = f' Did you mean "{m.group(1)}"?' if (m := re.search(r'mean "(\w+)"', message)) else ""
    sys.exit(f"Unknown config key {key!r}: the config has no field {missing!r}.{hint} "
             "`--config.KEY=VALUE` can only override keys that the config file defines.")
  except flags.Error as e:
    sys.exit(f"Flags parsing error: {e}")


def format_metrics(metrics: dict) -> str:
  """A readable multi-line block: scalars first, then per-class lists one value a line."""
  lines = []
  for key, value in metrics.items():
    if isinstance(value, float):
      lines.append(f"{key:>24}: {value:.4f}")
    elif not isinstance(value, (list, dict)):
      lines.append(f"{key:>24}: {value}")
  for key, value in metrics.items():
    if isinstance(value, dict):
      lines.append(f"{key}:")
      lines += [f"{name:>24}: {v:.4f}" for name, v in value.items()]
  return "\n".join(lines)
