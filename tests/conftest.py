"""Test setup: hide GPUs from TensorFlow and keep JAX on 64-bit-free CPU defaults; one JAX
persistent compilation cache for the whole session (both xdist workers and the entry points
that tests start as subprocesses), so a computation that several tests compile (the tiny
U-Net's train step, the tiny Mask R-CNN's) is compiled once, at XLA's lighter optimization
level (tests/markers.py). Per session: no test depends on
what an earlier run left."""

import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # As segjax.cli: same numerics, no notice.

import tensorflow as tf  # noqa: E402

from tests.markers import TEST_XLA_FLAGS  # noqa: E402

# Before jax initialises its CPU backend; inherited by the entry points tests start.
os.environ["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()

tf.config.set_visible_devices([], "GPU")

_CACHE_OWNER = False


def pytest_configure(config):
  """Before xdist starts its workers (they inherit the environment) and before jax loads."""
  global _CACHE_OWNER
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ and not hasattr(config, "workerinput"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="segjax_test_jax_cache_")
    _CACHE_OWNER = True


def pytest_unconfigure(config):
  if _CACHE_OWNER and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ.pop("JAX_COMPILATION_CACHE_DIR"), ignore_errors=True)
