"""Markers shared by test files."""

import os

import pytest

# Tests past the CI time budget (20 minutes on 2 cores): run with SEGJAX_LONG_TESTS=1.
long_test = pytest.mark.skipif(
  not os.environ.get("SEGJAX_LONG_TESTS"),
  reason="past the CI time budget: set SEGJAX_LONG_TESTS=1",
)
