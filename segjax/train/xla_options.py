"""XLA compiler options of a run's compiled steps, by platform: `config.compiler_options`.

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
"""

from typing import Any

import jax

from segjax.errors import ConfigError

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
