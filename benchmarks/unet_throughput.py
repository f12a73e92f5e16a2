"""U-Net training and inference throughput: median images/s over timed repeats, compile time.

  python benchmarks/unet_throughput.py --config configs/unet_shapes.py [--repeats 20]

Uses the real jitted train step (forward, backward, optimizer update, batch-norm statistics)
and the evaluation forward pass at `config.batch_size` and `config.image_size`, on whatever
devices JAX sees, with the batch sharded over them.
"""

from segjax import cli  # noqa: I001  (first: sets TensorFlow's log level before TF loads)

import functools
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/unet_shapes.py", "Config file.",
                                lock_config=True)
flags.DEFINE_integer("repeats", 20, "Timed steps; the median is reported.")
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")


def _time(fn, args, repeats, warmup):
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  out = None
  for _ in range(warmup):
    out = compiled(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return compile_s, statistics.median(times)


def main(argv):
  del argv
  from segjax.train import loop, parallel, semantic
  from segjax.train.steps import train_step

  config = flags.FLAGS.config
  mesh = parallel.make_mesh()
  model = loop.build_model(config)
  init, _ = loop.initial_state(config, model, mesh)
  state = init()
  b, (h, w) = config.batch_size, config.image_size
  batch = parallel.to_global({
    "image": jax.random.normal(jax.random.key(0), (b, h, w, 3)),
    "mask": jax.random.randint(jax.random.key(1), (b, h, w), 0, config.model.num_classes),
    "example_mask": jnp.ones((b,), bool),
  }, mesh)
  rng = jax.random.key(0)
  replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  loss_fn = functools.partial(semantic.loss_fn, model=model)
  # No donation here: the same state is fed to every timed repeat.
  train = jax.jit(functools.partial(train_step, loss_fn=loss_fn),
                  in_shardings=(replicated, sharded, replicated))
  evaluate = jax.jit(functools.partial(semantic.eval_step, model=model,
                                       num_classes=config.model.num_classes),
                     in_shardings=(replicated, sharded))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  repeats, warmup = flags.FLAGS.repeats, flags.FLAGS.warmup
  train_compile, train_s = _time(train, (state, batch, rng), repeats, warmup)
  eval_compile, eval_s = _time(evaluate, (variables, batch), repeats, warmup)
  devices = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  print(f"U-Net depth={config.model.depth} base_width={config.model.base_width} "
        f"upsampling={config.model.upsampling} batch={b} image={h}x{w} on {devices}")
  print(f"train:     {b / train_s:8.1f} images/s  (median step {1e3 * train_s:.1f} ms over "
        f"{repeats}; compile {train_compile:.1f} s)")
  print(f"inference: {b / eval_s:8.1f} images/s  (median step {1e3 * eval_s:.1f} ms over "
        f"{repeats}; compile {eval_compile:.1f} s)")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
