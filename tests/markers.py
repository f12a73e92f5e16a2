"""Markers and settings shared by test files."""

import contextlib
import os

import jax
import pytest

# Tests past the CI time budget (20 minutes on 2 cores, as slow as a 2017 AMD EPYC): run with
# SEGJAX_LONG_TESTS=1. Each names, where it is marked, the test that covers its area in CI.
long_test = pytest.mark.skipif(
  not os.environ.get("SEGJAX_LONG_TESTS"),
  reason="past the CI time budget: set SEGJAX_LONG_TESTS=1",
)

# XLA:CPU's LLVM at optimization level 0 instead of 2: compiling (most of the suite's time)
# takes 15-25 % less; the golden losses move by 1.5e-5, within their tolerance
# (tests/train/test_golden.py). tests/conftest.py sets it for the test processes; subprocesses
# that set their own XLA_FLAGS prepend it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1"


@contextlib.contextmanager
def rbg_prng():
  """jax's "rbg" PRNG as the default while active: training compiles much faster on CPU."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  try:
    yield
  finally:
    jax.config.update("jax_default_prng_impl", previous)
