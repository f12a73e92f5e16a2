"""Every test here needs segjax's CPU kernel library (segjax/kernels/onednn_conv.py builds it)."""

import pytest

from segjax.kernels import onednn_conv


@pytest.fixture(scope="module", autouse=True)
def kernel_library():
  try:
    onednn_conv.load()
  except onednn_conv.OnednnUnavailable as e:
    pytest.skip(f"oneDNN unavailable: {e}")
