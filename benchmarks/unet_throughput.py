"""U-Net training and inference throughput: median images/s over timed repeats, compile time.

  python benchmarks/unet_throughput.py --config configs/unet_shapes.py [--repeats 20]

Uses the real jitted train step (forward, backward, optimizer update, batch-norm statistics)
and the evaluation forward pass at `config.batch_size` and `config.image_size`, on whatever
devices JAX sees, with the batch sharded over them.
"""

from segjax import cli  # noqa: I001  (first: sets TensorFlow's log level before TF loads)

import functools

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from timing import compile_timed, median_seconds

config_flags.DEFINE_config_file(
  "config", "configs/unet_shapes.py", "Config file.", lock_config=True
)
flags.DEFINE_integer("repeats", 20, "Timed steps; the median is reported.")
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")


def unet_steps(config):
  """The U-Net of `config` as `(calls, info)`: one blocking call each of the compiled train
  step (forward, backward, optimizer update, batch-norm statistics), the evaluation step
  (logits, confusion matrix, top-k counts) and the forward pass with its argmax (what a
  prediction runs), `calls["train"]`, `["eval"]`, `["forward"]`, on a random batch of
  `config.batch_size` at `config.image_size`, compiled with the config's XLA options; info
  holds the compile times ("train_compile_s", "eval_compile_s") and "num_params"."""
  import jax.numpy as jnp

  from segjax.models import build_model
  from segjax.train import loop, parallel, semantic, xla_options
  from segjax.train.evaluator import Evaluator
  from segjax.train.state import initial_state

  mesh = parallel.make_mesh()
  model = build_model(config)
  init, _ = initial_state(config, model, mesh)
  loss_fn = functools.partial(semantic.loss_fn, model=model)
  runner = loop.StepRunner(config, loss_fn, mesh)
  evaluator = Evaluator(config, model=model, mesh=mesh)
  b, (h, w) = parallel.local_batch_size(config.batch_size), config.image_size
  rng = np.random.default_rng(0)
  local = {
    "image": rng.normal(size=(b, h, w, 3)).astype(np.float32),
    "mask": rng.integers(0, config.model.num_classes, (b, h, w)).astype(np.int32),
    "example_mask": np.ones((b,), bool),
  }
  key = jax.random.key(0)
  state = runner.to_run_state(init())
  train_batch = runner.batch({k: local[k] for k in ("image", "mask")})
  train, train_compile = compile_timed(runner.step, state, train_batch, key)

  def train_once():
    nonlocal state
    state, metrics = train(state, train_batch, key)
    jax.block_until_ready(metrics)

  # Read at each call: the train step donates the state it is given.
  variables = lambda: {"params": state.params, "batch_stats": state.batch_stats}
  eval_batch = evaluator.put(local)
  evaluate, eval_compile = compile_timed(evaluator.step, variables(), eval_batch)
  forward = xla_options.jit(lambda v, x: jnp.argmax(semantic.logits_fn(model, v)(x), -1), config)
  forward, _ = compile_timed(forward, variables(), eval_batch["image"])
  info = dict(
    train_compile_s=train_compile,
    eval_compile_s=eval_compile,
    num_params=sum(x.size for x in jax.tree.leaves(state.params)),
  )
  calls = {
    "train": train_once,
    "eval": lambda: jax.block_until_ready(evaluate(variables(), eval_batch)),
    "forward": lambda: jax.block_until_ready(forward(variables(), eval_batch["image"])),
  }
  return calls, info


def main(argv):
  del argv
  config = flags.FLAGS.config
  calls, info = unet_steps(config)
  repeats, warmup = flags.FLAGS.repeats, flags.FLAGS.warmup
  train_s = median_seconds(calls["train"], repeats, warmup)
  eval_s = median_seconds(calls["eval"], repeats, warmup)
  train_compile, eval_compile = info["train_compile_s"], info["eval_compile_s"]
  h, w = config.image_size
  devices = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  print(
    f"U-Net depth={config.model.depth} base_width={config.model.base_width} "
    f"upsampling={config.model.upsampling} dtype={config.model.dtype} "
    f"parallelism={config.parallelism} batch={config.batch_size} image={h}x{w} "
    f"on {devices}"
  )
  print(
    f"train:     {config.batch_size / train_s:8.1f} images/s  (median step "
    f"{1e3 * train_s:.1f} ms over {repeats}; compile {train_compile:.1f} s)"
  )
  print(
    f"inference: {config.batch_size / eval_s:8.1f} images/s  (median step "
    f"{1e3 * eval_s:.1f} ms over {repeats}; compile {eval_compile:.1f} s)"
  )


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
