"""Train-step time of an ensemble of E U-Nets (segjax/models/ensemble.py, one step vmapped
over the members, `vectorized=True`) and with the members one after the other inside one
step (`vectorized=False`, an unrolled `nn.scan`), against E steps of one U-Net, interleaved.

  python benchmarks/ensemble_step.py [--members 3 --size 32 --depth 3 --width 8 --batch 8]

Prints median milliseconds per step of each, the ratios to E single steps, and the load.
"""

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax.models import UNet, ensemble
from segjax.train import semantic
from segjax.train.state import create_train_state
from segjax.train.steps import train_step


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--members", type=int, default=3)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--depth", type=int, default=3)
  parser.add_argument("--width", type=int, default=8)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  config = ml_collections.ConfigDict(
    dict(
      optimizer="adamw",
      learning_rate=1e-3,
      weight_decay=1e-4,
      schedule="constant",
      warmup_steps=0,
      num_train_steps=1000,
      grad_clip_norm=0.0,
      dataset=dict(ignore_label=255),
    )
  )
  member = UNet(num_classes=5, depth=args.depth, base_width=args.width)
  rng = np.random.default_rng(0)
  batch = {
    "image": jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, 3)), jnp.float32),
    "mask": jnp.asarray(rng.integers(0, 5, (args.batch, args.size, args.size)), jnp.int32),
  }
  sample = jnp.zeros((1, args.size, args.size, 3))

  def prepare(model):
    state = create_train_state(model, config, jax.random.key(0), sample)
    step = jax.jit(
      functools.partial(train_step, loss_fn=semantic.bind_loss(config, model)), donate_argnums=0
    )
    return [state, step]

  runs = {
    "vmap": (prepare(ensemble.Ensemble(member, args.members, vectorized=True)), 1),
    "scan": (prepare(ensemble.Ensemble(member, args.members, vectorized=False)), 1),
    "single": (prepare(member), args.members),
  }
  key = jax.random.key(1)

  def time_steps(run, repeats):
    start = time.perf_counter()
    for _ in range(args.steps):
      for _ in range(repeats):
        run[0], metrics = run[1](run[0], batch, key)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / args.steps * 1e3

  for run, repeats in runs.values():  # Compiles.
    time_steps(run, repeats)
  times = {name: [] for name in runs}
  for _ in range(args.rounds):
    for name, (run, repeats) in runs.items():
      times[name].append(time_steps(run, repeats))
  single = statistics.median(times["single"])
  print(
    f"E={args.members} U-Net depth {args.depth} width {args.width}, batch {args.batch} of "
    f"{args.size}x{args.size}, {jax.default_backend()}, load {os.getloadavg()[0]:.1f}"
  )
  for name, values in times.items():
    median = statistics.median(values)
    label = f"{name} ({args.members} steps)" if name == "single" else name
    print(f"{label:>18}: {median:8.1f} ms/step  x{median / single:.2f} of E single steps")


if __name__ == "__main__":
  main()
