"""`segjax.layers.UpConv2x` against `flax.linen.ConvTranspose` (same parameters, same output).

  python benchmarks/upconv.py [--repeats 10]

Prints, for the Mask R-CNN mask head and a U-Net decoder stage, the median forward time and
forward+backward time (gradients for kernel and input) of both, and their ratio.
"""

from segjax import cli  # noqa: I001  (first: sets TensorFlow's log level before TF loads)

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from segjax.layers import UpConv2x
from timing import compile_timed, median_seconds

flags.DEFINE_integer("repeats", 10, "Timed calls (median reported).")

# name: input (N, H, W, C) and output channels.
CASES = {
  "R50 mask head (2 x 512 ROIs, 14x14x256)": ((1024, 14, 14, 256), 256),
  "shapes mask head (8 x 16 ROIs, 14x14x64)": ((128, 14, 14, 64), 64),
  "U-Net last stage (batch 8, 32x32x32 -> 64x64x16)": ((8, 32, 32, 32), 16),
}


def _time(fn, *args, repeats):
  compiled, _ = compile_timed(jax.jit(fn), *args)
  return median_seconds(lambda: jax.block_until_ready(compiled(*args)), repeats, 1)


def main(argv):
  del argv
  repeats = flags.FLAGS.repeats
  print(f"on {jax.devices()[0].device_kind}; median of {repeats}")
  for name, (shape, features) in CASES.items():
    x = jax.random.normal(jax.random.key(0), shape)
    reference = nn.ConvTranspose(features, (2, 2), strides=(2, 2))
    variables = reference.init(jax.random.key(1), x)
    print(name)
    times = {}
    for label, module in (("flax ConvTranspose", reference), ("UpConv2x", UpConv2x(features))):
      loss = lambda v, x, module=module: jnp.sum(module.apply(v, x) ** 2)
      times[label] = (
        _time(module.apply, variables, x, repeats=repeats),
        _time(jax.grad(loss, argnums=(0, 1)), variables, x, repeats=repeats),
      )
      print(
        f"  {label:<20} forward {1e3 * times[label][0]:8.1f} ms   forward+backward "
        f"{1e3 * times[label][1]:8.1f} ms",
        flush=True,
      )
    (ref_f, ref_b), (f, b) = times.values()
    print(f"  speed-up: forward {ref_f / f:.1f}x, forward+backward {ref_b / b:.1f}x")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
