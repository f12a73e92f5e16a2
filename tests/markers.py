"""Markers and settings shared by test files."""

import contextlib
import os

import jax
import pytest

# Tests past the CI time budget (20 minutes on 2 cores): run with SEGJAX_LONG_TESTS=1.
long_test = pytest.mark.skipif(
  not os.environ.get("SEGJAX_LONG_TESTS"),
  reason="past the CI time budget: set SEGJAX_LONG_TESTS=1",
)

# XLA:CPU's LLVM at optimization level 1 instead of 2: compiling (most of the suite's time)
# takes about 25 % less and the golden losses still match to 1e-5 (level 0 does not: its log
# is off by 1.5e-5). tests/conftest.py sets it for the test processes; subprocesses that set
# their own XLA_FLAGS prepend it.
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
