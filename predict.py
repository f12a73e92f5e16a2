"""Predicts on images: `python predict.py --workdir DIR --input PATH [PATH ...] --output OUT`.

PATH: image files, directories (their image files) or quoted glob patterns; several may follow
one `--input`, or `--input` may be repeated. Writes semantic class-id PNGs `OUT/NAME.png`, or
instance detections `OUT/predictions.json` (COCO results), and with `--overlay`
`OUT/NAME_overlay.png` (`segjax.predict`).
"""

from segjax import cli  # noqa: I001  (first: sets TensorFlow's log level before TF loads)

from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file(
  "config",
  None,
  "Config the model was trained with (default: WORKDIR/config.json, written by training).",
  lock_config=True,
)
flags.DEFINE_string("workdir", None, "Training directory holding checkpoints/.")
flags.DEFINE_multi_string("input", None, "Image files, directories or glob patterns.")
flags.DEFINE_string("output", None, "Directory for the predictions.")
flags.DEFINE_float("score_threshold", 0.5, "Instance models: lowest score of a detection kept.")
flags.DEFINE_bool("overlay", False, "Also write NAME_overlay.png: the prediction on the image.")
flags.DEFINE_integer("batch_size", 1, "Images per jitted call (padded with empty rows).")
flags.DEFINE_integer(
  "bucket",
  64,
  "Images are padded to multiples of this (and of the model's "
  "stride): one compile per padded size.",
)
cli.define_memory_flags()
flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv):
  cli.hide_gpus_from_tensorflow()
  cli.quiet_logging()
  cli.reuse_cpu_memory()
  from segjax import predict

  f = flags.FLAGS
  # `--input a.png b.png`: absl keeps what follows the first value as positional arguments.
  paths = predict.list_images(f.input + argv[1:])
  predictor = predict.Predictor.from_workdir(
    f.workdir, f.config, batch_size=f.batch_size, bucket=f.bucket, score_threshold=f.score_threshold
  )
  written = predict.predict_to_directory(
    predictor, paths, f.output, overlay=f.overlay, log=lambda line: print(line, flush=True)
  )
  print(f"Wrote {len(written)} files to {f.output} (checkpoint step {predictor.step}).", flush=True)


if __name__ == "__main__":
  cli.run(main)
