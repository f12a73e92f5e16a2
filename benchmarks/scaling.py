"""Data-parallel scaling on simulated CPU devices, and bfloat16 vs float32.

  python benchmarks/scaling.py [--config configs/unet_shapes.py] [--batch_size 16]

Runs `benchmarks/unet_throughput.py` in a fresh process for 1, 2, 4 and 8 devices
(`--xla_force_host_platform_device_count`) with the same global batch, in both parallelism
modes, then float32 against bfloat16 on one device. Simulated devices share this machine's
cores, so the figures show that the sharded step does not collapse (collectives, resharding),
not the speed-up of real accelerators.
"""

import argparse
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def throughput(config: str, batch_size: int, devices: int, *overrides: str) -> tuple[float, ...]:
  env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "TF_CPP_MIN_LOG_LEVEL": "2",
  }
  out = subprocess.run(
    [
      sys.executable,
      os.path.join(HERE, "unet_throughput.py"),
      "--config",
      config,
      f"--config.batch_size={batch_size}",
      f"--config.eval_batch_size={batch_size}",
      "--repeats",
      "10",
      *overrides,
    ],
    env=env,
    cwd=os.path.dirname(HERE),
    capture_output=True,
    text=True,
  )
  if out.returncode:
    raise RuntimeError(f"{devices} devices, {overrides}: {out.stderr[-2000:]}")
  out = out.stdout
  train = re.search(r"train:\s+([\d.]+) images/s.*compile ([\d.]+) s", out)
  infer = re.search(r"inference:\s+([\d.]+) images/s", out)
  return float(train[1]), float(infer[1]), float(train[2])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/unet_shapes.py")
  parser.add_argument("--batch_size", type=int, default=16)
  args = parser.parse_args()
  print(f"{args.config}, global batch {args.batch_size}; images/s (median of 10 steps)")
  print(f"{'mode':>6} {'devices':>7} {'train':>8} {'infer':>8} {'compile s':>9}")
  for mode in ("jit", "pmap"):
    base = None
    for devices in (1, 2, 4, 8):
      train, infer, compile_s = throughput(
        args.config, args.batch_size, devices, f"--config.parallelism={mode}"
      )
      base = base or train
      print(
        f"{mode:>6} {devices:>7} {train:8.1f} {infer:8.1f} {compile_s:9.1f}"
        f"   ({train / base:.2f}x of 1 device)",
        flush=True,
      )
  for dtype in ("float32", "bfloat16"):
    train, infer, compile_s = throughput(
      args.config, args.batch_size, 1, f"--config.model.dtype={dtype}"
    )
    print(
      f"{dtype:>9} 1 device: train {train:.1f}, inference {infer:.1f} images/s, "
      f"compile {compile_s:.1f} s",
      flush=True,
    )


if __name__ == "__main__":
  main()
