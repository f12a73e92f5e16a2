"""The host's memory around compilation: compile a step before its first run, then give the
memory that compilation freed back to the operating system.

XLA's compiler frees most of what it allocates, but glibc keeps freed heap pages in the
process, so a process that compiles a large step (a Mask R-CNN train step: about 0.95 GB kept
on the R50-FPN at 512 x 512) holds them while the step's own buffers come on top.
`malloc_trim(0)` returns them; compiling ahead of the first call (`CompileFirst`) lets the
release happen before the step's buffers are allocated, which lowers the peak, not only the
resident size afterwards.

`reuse_memory_between_runs` keeps the pages of one run of a CPU step for the next: XLA:CPU
allocates a run's temporaries as one buffer (184 MB for the U-Net train step at batch 8,
128 x 128), which glibc maps anew and unmaps after every run, being over its mmap threshold;
each run then takes a page fault per 4 KB page it touches (45,000 per U-Net step, about 80 ms of
system time, and the convolutions writing to fresh pages run several times slower).
"""

import ctypes
import ctypes.util
from typing import Any

import jax


def release_freed_memory() -> bool:
  """Returns the C heap's free pages to the OS (glibc `malloc_trim(0)`); False where the C
  library has no such call (not glibc) or had nothing to return."""
  name = ctypes.util.find_library("c")
  try:
    trim = ctypes.CDLL(name).malloc_trim
  except (OSError, AttributeError, TypeError):
    return False
  trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
  return bool(trim(0))


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h).


def reuse_memory_between_runs() -> bool:
  """Makes each run of a CPU step reuse the previous run's pages: JAX's CPU dispatch made
  synchronous, so a run allocates its buffers on the calling thread (glibc's main arena: other
  threads' arenas map any block over 64 MB whatever the options), and glibc's heap kept
  (`keep_heap`). The process then holds its peak heap until it ends; `release_freed_memory`
  still returns free pages on request.

  The heap is kept only where JAX's default backend is the CPU and the C library is glibc;
  elsewhere only the CPU client's dispatch, which the steps on a GPU or TPU do not use, becomes
  synchronous (the backend is known only once started, when the dispatch mode is fixed). Call
  it before JAX's backends start (the first computation, `jax.devices()`) and after
  `jax.distributed.initialize` if that is used: it starts them. Returns whether it applied.
  """
  from jax._src import xla_bridge

  if xla_bridge.backends_are_initialized():
    return False  # The CPU client's dispatch mode is fixed when it is created.
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return jax.default_backend() == "cpu" and keep_heap()


def keep_heap() -> bool:
  """Sets glibc's `malloc` to serve blocks from its heaps rather than by `mmap` (all but the
  blocks over 64 MB of other threads' arenas) and never to shrink the heaps (`mallopt`
  M_MMAP_MAX 0, M_TRIM_THRESHOLD -1); False where the C library is not glibc."""
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
  except (OSError, AttributeError, TypeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def _signature(args: tuple) -> Any:
  return jax.tree.map(lambda x: (getattr(x, "shape", None), getattr(x, "dtype", type(x))), args)


class CompileFirst:
  """A jitted or pmapped `fn` compiled ahead of its first call, then the memory compilation
  freed released (`release_freed_memory`) before that call runs. Calls with the first call's
  shapes and dtypes run that executable; others go through `fn` (compiled again there).
  `lower` is `fn`'s, for ahead-of-time use."""

  def __init__(self, fn):
    self.fn = fn
    self._compiled = None
    self._signature = None

  def lower(self, *args, **kwargs):
    return self.fn.lower(*args, **kwargs)

  def __call__(self, *args):
    if self._compiled is None:
      self._compiled = self.fn.lower(*args).compile()
      self._signature = _signature(args)
      release_freed_memory()
    if _signature(args) != self._signature:
      return self.fn(*args)
    return self._compiled(*args)
