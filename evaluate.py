"""Evaluates the latest checkpoint: `python evaluate.py --config CONFIG --workdir DIR`."""

from segjax import cli  # noqa: I001  (first: sets TensorFlow's log level before TF loads)

from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file(
  "config", None, "Config file the model was trained with.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Training directory holding checkpoints/.")
flags.DEFINE_integer("num_visualizations", 0, "PNG panels to write to WORKDIR/visualizations/.")
cli.define_distributed_flags()
cli.define_memory_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  cli.hide_gpus_from_tensorflow()
  cli.quiet_logging()
  cli.initialize_distributed()
  cli.reuse_cpu_memory()
  from segjax.train.evaluation import evaluate_checkpoint

  evaluate_checkpoint(
    flags.FLAGS.config,
    flags.FLAGS.workdir,
    flags.FLAGS.num_visualizations,
    report=lambda metrics: print(cli.format_metrics(metrics), flush=True),
  )


if __name__ == "__main__":
  cli.run(main)
