"""How a run's steps compile: XLA compiler options by platform, `config.compiler_options`, and
the CPU's convolutions, `config.cpu_convolutions` (`cpu_convolutions`, `jit`).

  config.compiler_options = {"cpu": {"xla_cpu_experimental_ynn_fusion_type": ""}}

The options under the name of JAX's default backend ("cpu", "gpu", "tpu") go to every step
that `segjax.train.parallel.runner` compiles under `parallelism="jit"` (train and evaluation
steps), to instance evaluation's jitted prediction and to `segjax.predict.Predictor`; the
other platforms' are ignored, so one config runs everywhere. `jax.pmap` takes no compiler
options: under `parallelism="pmap"` the pmapped steps compile without them. XLA rejects an
unknown option by name when the step compiles.

The U-Net configs set the one above: XLA:CPU then runs convolutions and matrix products with
its Eigen kernels instead of YNNPACK's fusions, 1.15-1.24x faster for the U-Net step on 2-core
x86 CPUs (`benchmarks/unet_step.py --only previous_ynn`). The Mask R-CNN configs keep YNNPACK
(its train step is slower without) and set `xla_cpu_scheduler_type:
CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`: the R50-FPN train step's temporaries go from 1.31 to
0.97 GiB, and it runs faster too (README "Benchmarks").

`config.cpu_convolutions` ("auto", the default) traces every convolution of the steps as
oneDNN's (`segjax/kernels/onednn_conv.py`) where the steps run on the CPU: 1.3x (U-Net) and
1.4x (R50-FPN Mask R-CNN) faster train steps than XLA:CPU's own convolutions.
"""

from collections.abc import Callable
from typing import Any

import jax
from absl import logging

from segjax.errors import ConfigError
from segjax.kernels import onednn_conv
from segjax.layers import conv

PLATFORMS = ("cpu", "gpu", "tpu")


def compiler_options(config, platform: str | None = None) -> dict[str, Any] | None:
  """`config.compiler_options[platform]` as a dict (`platform` defaults to JAX's default
  backend), or None when the config sets none for it."""
  options = config.get("compiler_options")
  if not options:
    return None
  unknown = sorted(set(options) - set(PLATFORMS))
  if unknown:
    raise ConfigError(
      f"compiler_options: unknown platform(s) {unknown}; expected keys among {PLATFORMS}."
    )
  chosen = options.get(platform or jax.default_backend())
  if not chosen:
    return None
  chosen = dict(chosen)
  for name, value in chosen.items():
    if not isinstance(value, str | bool | int | float):
      raise ConfigError(
        f"compiler_options: {name}={value!r} is a {type(value).__name__}; XLA options are "
        "strings, booleans or numbers."
      )
  return chosen


def cpu_convolutions(config) -> str:
  """Which convolutions a run's steps use, "onednn" or "xla", by `config.cpu_convolutions`:
  "auto" (the default) oneDNN's (`segjax/kernels/onednn_conv.py`) where JAX's default backend
  is the CPU and oneDNN loads, else XLA's; "onednn" oneDNN's on the CPU or a `ConfigError`
  saying why it cannot load; "xla" XLA's. Other backends always use XLA's."""
  name = config.get("cpu_convolutions", "auto")
  if name not in ("auto", *conv.CPU_CONVOLUTIONS):
    raise ConfigError(
      f"cpu_convolutions: {name!r} is not one of {('auto', *conv.CPU_CONVOLUTIONS)}."
    )
  if name == "xla" or jax.default_backend() != "cpu":
    return "xla"
  try:
    onednn_conv.load()
  except onednn_conv.OnednnUnavailable as e:
    if name == "onednn":
      raise ConfigError(f"cpu_convolutions='onednn': {e}") from e
    logging.log_first_n(
      logging.WARNING, "cpu_convolutions='auto': XLA's convolutions (no oneDNN: %s)", 1, e
    )
    return "xla"
  return "onednn"


def jit(fn: Callable, config, **kwargs) -> Callable:
  """`jax.jit(fn, **kwargs)` compiled with `config`'s XLA options for this platform, its
  convolutions traced as `config.cpu_convolutions` says."""
  traced = conv.traced_with(cpu_convolutions(config), fn)
  return jax.jit(traced, compiler_options=compiler_options(config), **kwargs)
