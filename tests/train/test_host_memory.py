"""Tests for segjax/train/host_memory.py: freed heap pages go back to the OS, and a step
compiled ahead of its first call computes what the jitted step does, compiling once."""

import ctypes
import ctypes.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.train import host_memory


def _rss_mb() -> float:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _glibc():
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc_trim  # noqa: B018
    return libc
  except (OSError, AttributeError, TypeError):
    return None


@pytest.mark.skipif(_glibc() is None, reason="needs glibc's malloc_trim")
def test_release_freed_memory_returns_freed_heap_pages():
  libc = _glibc()
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  # 300 MB in 32 KB blocks (under glibc's mmap threshold: on the heap), every page touched;
  # one block kept last so the heap's top cannot shrink by itself.
  blocks = [libc.malloc(32 * 1024) for _ in range(9600)]
  for b in blocks:
    ctypes.memset(b, 1, 32 * 1024)
  held = _rss_mb()
  for b in blocks[:-1]:
    libc.free(b)
  freed = _rss_mb()
  assert host_memory.release_freed_memory()
  released = _rss_mb()
  libc.free(blocks[-1])
  assert held - freed < 100  # free() alone keeps most of them
  assert freed - released > 200, (held, freed, released)


def test_compile_first_matches_the_jitted_step_and_compiles_once():
  traces = []

  def step(state, x):
    traces.append(x.shape)
    return state + jnp.sum(jnp.sin(x)), x * 2

  jitted = jax.jit(step, donate_argnums=0)
  compiled = host_memory.CompileFirst(jitted)
  x = np.arange(12.0, dtype=np.float32).reshape(3, 4)
  state = jnp.float32(1.0)
  want = step(jnp.float32(1.0), x)
  for _ in range(3):
    state, y = compiled(state, x)
    np.testing.assert_allclose(y, want[1])
  np.testing.assert_allclose(state, 1.0 + 3 * np.sum(np.sin(x)), rtol=1e-6)
  assert traces.count((3, 4)) == 2  # the reference call above and one compilation
  # Another shape: through the jitted step, compiled for it.
  state, y = compiled(state, x[:2])
  np.testing.assert_allclose(y, x[:2] * 2)
  assert traces[-1] == (2, 4)
  assert compiled.lower(state, x).compile() is not None


_RUNS = """
import json, resource, sys
import jax, jax.numpy as jnp
from segjax.train import host_memory

applied = host_memory.reuse_memory_between_runs() if sys.argv[1] == "reuse" else None
from segjax.kernels import onednn_conv

onednn_conv.load()
NHWC = ("NHWC", "HWIO", "NHWC")


def loss(kernels, x):
  for k in kernels:  # 8 x 128 x 128 x 32 float32: 16 MB per activation kept for the backward
    x = jax.nn.relu(onednn_conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC))
  return jnp.sum(x * x)


step = jax.jit(jax.grad(loss))
kernels, x = [jnp.full((3, 3, 32, 32), 0.01)] * 6, jnp.ones((8, 128, 128, 32))
jax.block_until_ready(step(kernels, x))
faults = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(step(kernels, x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": min(faults)}))
"""


def _faults_per_run(mode: str) -> dict:
  import json
  import subprocess
  import sys

  done = subprocess.run(
    [sys.executable, "-c", _RUNS, mode], capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None, reason="needs glibc's mallopt")
def test_reuse_memory_between_runs_stops_the_page_faults_of_each_run():
  from segjax.kernels import onednn_conv  # The U-Net's convolutions, as its steps run them.

  if not onednn_conv.available():
    pytest.skip("oneDNN unavailable")
  default, reused = _faults_per_run("default"), _faults_per_run("reuse")
  # The step's temporaries (six 16 MB activations and more) mapped anew by every run: a fault
  # per 4 KB page touched. Reused, those pages fault no more (the U-Net train step's faults go
  # from 45,000 to none). Some runs here take 16,000-33,000 faults more in either mode, from
  # no mmap that strace shows: the fewest of 5 runs are compared.
  saved_pages = default["faults"] - reused["faults"]
  assert default["faults"] > 96 * 256, default
  assert reused["applied"] is True
  assert saved_pages > 64 * 256, (default, reused)


def test_reuse_memory_between_runs_changes_nothing_once_jax_runs():
  jax.devices()  # The backends have started.
  assert host_memory.reuse_memory_between_runs() is False
  assert jax.config.values["jax_cpu_enable_async_dispatch"]  # left as it was
