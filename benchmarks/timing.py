"""Timing helpers shared by the benchmark scripts: compile time apart from median step time."""

import statistics
import time

# XLA compiler options for `compile_timed` (benchmarks/unet_step.py's backend candidates).
COMPILER_OPTIONS: dict[str, str] = {}


def compile_timed(fn, *args):
  """(compiled, seconds): ahead-of-time compilation of a jitted/pmapped `fn` for `args`."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile(compiler_options=COMPILER_OPTIONS or None)
  return compiled, time.perf_counter() - start


def median_seconds(run, repeats: int, warmup: int) -> float:
  """Median wall time of `run()` (which must block until done) after `warmup` calls."""
  for _ in range(warmup):
    run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)
