"""What segjax's entry points share: `run` (failures exit), flag parsing with clear config
errors, TF setup."""

from __future__ import annotations

import functools
import gc
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable

from absl import app, flags

from segjax.errors import ConfigError, Terminated, describe

# Before TensorFlow is first imported. Errors only: segjax reports data errors itself, once.
# tf.data needs no oneDNN kernels; with them on, TF prints a notice at import that no log
# level hides.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C.
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: stopped early (a checkpoint may have been saved).


def run(main: Callable[[list[str]], object]) -> None:
  """`absl.app.run(main)` for entry points: whatever fails, the process exits non-zero at once.

  On a failure the cause is printed to stderr on one line, `PROGRAM: error: CAUSE`, then the
  traceback, and the process ends with `os._exit`: the interpreter's shutdown is skipped, where
  native thread pools can block forever (a tf.data iterator with Python functions in flight,
  jax.distributed's shutdown barrier waiting for a peer that failed). What the run opened has
  been closed by then (the training loop's `finally` waits for checkpoints being written).
  SIGTERM raises `Terminated` wherever the program is; the training loop turns it into a
  checkpoint at the current step first. Exit codes: 1 failure, 130 Ctrl-C, 143 SIGTERM.
  """
  signal.signal(signal.SIGTERM, _raise_terminated)
  app.run(functools.partial(_main_or_exit, main), flags_parser=parse_flags)


def _raise_terminated(signum, frame):
  del signum, frame
  raise Terminated("SIGTERM received")


def _main_or_exit(main, argv) -> None:
  try:
    main(argv)
  except app.UsageError:
    raise  # absl prints the usage and exits.
  except SystemExit as e:
    if e.code in (None, 0):
      raise
    _exit(
      EXIT_FAILURE if not isinstance(e.code, int) else e.code,
      str(e.code) if not isinstance(e.code, int) else None,
    )
  except BaseException as e:  # noqa: BLE001  (every failure must end the process)
    code = (
      EXIT_TERMINATED
      if isinstance(e, Terminated)
      else EXIT_INTERRUPTED
      if isinstance(e, KeyboardInterrupt)
      else EXIT_FAILURE
    )
    _exit(code, describe(e), e)
  gc.collect()  # Frees reference cycles (tf.data iterators among them) before shutdown.


def _exit(code: int, cause: str | None, error: BaseException | None = None) -> None:
  program = os.path.basename(sys.argv[0])
  if cause:  # One write, on a line of its own, whatever other threads are printing.
    sys.stderr.write(f"\n{program}: error: {cause}\n")
    sys.stderr.flush()
  if error is not None and not isinstance(error, (ConfigError, Terminated, KeyboardInterrupt)):
    traceback.print_exception(type(error), error, error.__traceback__)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def hide_gpus_from_tensorflow() -> None:
  """tf.data only needs the CPU; without this TF grabs GPU memory that JAX needs."""
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")


def define_distributed_flags() -> None:
  """Flags for multi-process runs outside managed clusters (Cloud TPU needs none of them)."""
  flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-process runs outside managed clusters: host:port of process 0.",
  )
  flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes.")
  flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")


def initialize_distributed() -> None:
  """Joins a multi-process run from the flags or the cluster's environment, if there is one."""
  from segjax.train import parallel

  f = flags.FLAGS
  parallel.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)


def define_memory_flags() -> None:
  flags.DEFINE_bool(
    "reuse_cpu_memory",
    True,
    "CPU runs: every run of a step reuses the previous run's memory pages instead of mapping "
    "fresh ones (synchronous dispatch, glibc's heap kept; segjax/train/host_memory.py).",
  )


def reuse_cpu_memory() -> None:
  """`host_memory.reuse_memory_between_runs` unless `--noreuse_cpu_memory`: before anything
  starts JAX's backends, after `initialize_distributed`."""
  if flags.FLAGS.reuse_cpu_memory:
    from segjax.train import host_memory

    host_memory.reuse_memory_between_runs()


def quiet_logging() -> None:
  """Warnings only (orbax logs every save at INFO), unless `--verbosity` was given."""
  from absl import logging

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


HELP_FLAGS = ("-h", "--help", "--helpshort", "-?")

OVERRIDE_HELP = """\
Any key of the config can be overridden on the command line with --config.KEY=VALUE, nested
keys joined by dots, e.g. --config.num_train_steps=500 --config.model.depth=3
--config.image_size='(128, 128)' (tuples quoted, as Python literals). A config file takes an
argument after a colon: --config configs/unet_folder.py:NUM_CLASSES."""


def config_lines(config, prefix: str = "") -> list[str]:
  """`KEY = VALUE` for every leaf of a ConfigDict, nested keys joined by dots, in order."""
  lines = []
  for key, value in config.items():
    if hasattr(value, "items") and not isinstance(value, dict):
      lines += config_lines(value, f"{prefix}{key}.")
    else:
      lines.append(f"  --config.{prefix}{key}={value!r}")
  return lines


def print_help(argv: list[str]) -> None:
  """The program's usage, how `--config.KEY=VALUE` works, the keys of the config given with
  `--config` (or `--workdir`'s config.json) and their values, then the flags."""
  program = os.path.basename(argv[0])
  doc = (sys.modules["__main__"].__doc__ or "").strip()
  print(f"{program}: {doc}\n\n{OVERRIDE_HELP}\n")
  rest = [a for a in argv if a not in HELP_FLAGS]
  config = None
  try:
    flags.FLAGS(rest, known_only=True)
  except flags.Error:
    pass
  if "config" in flags.FLAGS and flags.FLAGS["config"].present:
    config = flags.FLAGS.config
  elif "workdir" in flags.FLAGS and flags.FLAGS["workdir"].present:
    path = os.path.join(flags.FLAGS.workdir or "", "config.json")
    if os.path.isfile(path):
      from segjax.train import run_config

      config = run_config.load(flags.FLAGS.workdir)
  if config is None:
    print(
      "Pass --config FILE (or --workdir DIR of a trained model) with --help to list the "
      "config's keys and values.\n"
    )
  else:
    print("The config's keys and values:")
    print("\n".join(config_lines(config)) + "\n")
  print(flags.FLAGS.main_module_help())


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that turns an unknown `--config.key` into an error naming the key;
  `--help` also lists the config's keys (`print_help`)."""
  if any(a in HELP_FLAGS for a in argv[1:]):
    print_help(argv)
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except AttributeError as e:
    message = str(e).encode().decode("unicode_escape")
    missing = m.group(1) if (m := re.search(r"'(\w+)'", message)) else message
    keys = [m.group(1) for a in argv if (m := re.match(r"--config\.([\w.]+)", a))]
    key = next((k for k in keys if missing in k.split(".")), missing)
    hint = f' Did you mean "{m.group(1)}"?' if (m := re.search(r'mean "(\w+)"', message)) else ""
    sys.exit(
      f"Unknown config key {key!r}: the config has no field {missing!r}.{hint} "
      "`--config.KEY=VALUE` can only override keys that the config file defines."
    )
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
