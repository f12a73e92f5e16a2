"""The U-Net's 3x3 convolutions one by one: XLA:CPU (YNNPACK, Eigen) against PyTorch (oneDNN).

  python benchmarks/unet_convs.py [--rounds 15] [--no-torch]

Every 3x3 'SAME' convolution of configs/unet_shapes.py's U-Net at batch 8, 128x128 (encoder,
bottleneck, decoder on the concatenated skip), forward only, float32. XLA compiles each twice:
with its CPU defaults (YNNPACK fusions) and with the U-Net configs' `compiler_options` (Eigen's
kernels); PyTorch runs the same convolution in channels_last with 2 threads. Calls are
interleaved (XLA default, XLA Eigen, PyTorch) in each round; the best round is printed as
GFLOP/s (the best, not the median: this compares kernels, not the machine's load), with the
sum of each column's times over the network's convolutions.
"""

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import jax  # noqa: E402
from jax import lax  # noqa: E402

BATCH, SIZE, BASE, DEPTH = 8, 128, 16, 4
NHWC = ("NHWC", "HWIO", "NHWC")


def unet_convs() -> list[tuple[int, int, int]]:
  """(in channels, out channels, resolution) of each 3x3 conv, in network order."""
  convs, c_in = [], 3
  for level in range(DEPTH + 1):  # Encoder levels, then the bottleneck.
    width, size = BASE * 2**level, SIZE // 2**level
    convs += [(c_in, width, size), (width, width, size)]
    c_in = width
  for level in reversed(range(DEPTH)):  # Decoder: upsampled + skip, concatenated.
    width, size = BASE * 2**level, SIZE // 2**level
    convs += [(2 * width, width, size), (width, width, size)]
  return convs


def _xla_call(options, x, k):
  def conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC)

  compiled = jax.jit(conv).lower(x, k).compile(compiler_options=options or None)
  return lambda: compiled(x, k).block_until_ready()


def _torch_call(torch, x, k):
  conv = torch.nn.Conv2d(k.shape[2], k.shape[3], 3, padding=1, bias=False)
  with torch.no_grad():
    conv.weight.copy_(torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
  conv = conv.to(memory_format=torch.channels_last)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).contiguous(
    memory_format=torch.channels_last
  )

  def call():
    with torch.no_grad():
      conv(xt)

  return call


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--no-torch", action="store_true", help="XLA only.")
  args = parser.parse_args()
  from configs import unet_shapes
  from segjax.train import xla_options

  eigen = xla_options.compiler_options(unet_shapes.get_config(), "cpu")
  torch = None
  if not args.no_torch:
    import torch

    torch.set_num_threads(2)
  load = "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
  print(f"U-Net 3x3 convs, batch {BATCH}, forward, float32, best of {args.rounds} ({load})")
  names = ["XLA default", "XLA config"] + ([] if torch is None else ["PyTorch"])
  print(f"{'conv':>18s} " + " ".join(f"{n:>14s}" for n in names) + "   (GFLOP/s)")
  totals = dict.fromkeys(names, 0.0)
  rng = np.random.default_rng(0)
  for c_in, c_out, size in unet_convs():
    x = rng.normal(size=(BATCH, size, size, c_in)).astype(np.float32)
    k = rng.normal(size=(3, 3, c_in, c_out)).astype(np.float32)
    calls = {"XLA default": _xla_call({}, x, k), "XLA config": _xla_call(eigen, x, k)}
    if torch is not None:
      calls["PyTorch"] = _torch_call(torch, x, k)
    times = {n: [] for n in calls}
    for call in calls.values():
      call()
    for _ in range(args.rounds):
      for n, call in calls.items():
        start = time.perf_counter()
        call()
        times[n].append(time.perf_counter() - start)
    flops = 2 * BATCH * size * size * c_in * c_out * 9
    row = f"{c_in:4d}->{c_out:4d} @{size:4d}^2 "
    for n in names:
      best = min(times[n])
      totals[n] += best
      row += f" {flops / best / 1e9:14.0f}"
    print(row, flush=True)
  print(f"{'sum of times (ms)':>18s} " + " ".join(f"{1e3 * totals[n]:14.1f}" for n in names))
  load = "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
  print(f"({load} after)")


if __name__ == "__main__":
  main()
