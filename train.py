"""Trains a segjax model: `python train.py --config configs/unet_shapes.py --workdir DIR`."""

from segjax import cli  # noqa: I001  (first: sets TensorFlow's log level before TF loads)

from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py[:arg]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Output directory: checkpoints, metrics.jsonl.")
flags.DEFINE_bool(
  "allow_config_change",
  False,
  "Resume although the config differs from WORKDIR/config.json (beyond run "
  "length and logging); the new config is kept as config.<step>.json.",
)
cli.define_distributed_flags()
cli.define_memory_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  cli.hide_gpus_from_tensorflow()
  cli.quiet_logging()
  cli.initialize_distributed()
  cli.reuse_cpu_memory()
  from segjax.train.loop import train_and_evaluate

  train_and_evaluate(
    flags.FLAGS.config, flags.FLAGS.workdir, allow_config_change=flags.FLAGS.allow_config_change
  )


if __name__ == "__main__":
  cli.run(main)
