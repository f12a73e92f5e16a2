"""Serializes a trained model's inference function with `jax.export` (StableHLO, weights inside).

  python -m segjax.export --workdir DIR --output FILE [--batch_size B] [--image_size H,W]

FILE holds `f(images)`, runnable where only jax is installed:

  exported = jax.export.deserialize(open(FILE, "rb").read())
  outputs = exported.call(images)   # a dict of arrays

`images`: uint8 (B, H, W, 3) RGB. H, W are fixed at export (`--image_size`, default the
config's `image_size`; multiples of the task's stride: 2**depth for a U-Net, 32 for Mask
R-CNN); B is symbolic (any batch) unless `--batch_size` fixes it. The whole H x W is the
image: an image of another size must be brought to H x W by the caller (resized as
`segjax.predict` does for instance models, padded bottom and right; the Predictor pads with
the mean colour, 0 after normalization, which uint8 padding cannot reproduce exactly).

`outputs` are `segjax.predict.inference_fn`'s, i.e. the Predictor's before cropping or mapping
back to original pixels (`Predictor.infer` with `image_size` (H, W) for every row):
  U-Net: "probs" float32 (B, H, W, K) softmax, "labels" int32 (B, H, W).
  Mask R-CNN: D = `roi_heads.detections_per_image` detections per image, best first, in the
    input's pixels: "boxes" float32 (B, D, 4) `[x1, y1, x2, y2]`, "scores" float32 (B, D),
    "classes" int32 (B, D) the model's labels 1..K (not category ids), "valid" bool (B, D),
    "mask_probs" float32 (B, D, 28, 28), "instance_masks" bool (B, D, H, W); no score
    threshold is applied.
Serialized for the platforms cpu, cuda and tpu (`--platforms`).
"""

from segjax import cli  # noqa: I001  (first: sets TensorFlow's log level before TF loads)

from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

PLATFORMS = ("cpu", "cuda", "tpu")


def export_predictor(
  predictor,
  *,
  image_size: Sequence[int] | None = None,
  batch_size: int | None = None,
  platforms: Sequence[str] = PLATFORMS,
):
  """The `jax.export.Exported` of `predictor`'s inference on uint8 (B, H, W, 3) images
  (module docstring); `image_size` (H, W) defaults to the config's, `batch_size` None is a
  symbolic batch."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from segjax.layers import conv
  from segjax.predict import inference_fn

  size = tuple(int(s) for s in (image_size or predictor.config.image_size))
  stride = predictor.task.stride(predictor.config)
  if len(size) != 2 or size[0] % stride or size[1] % stride:
    raise ValueError(f"image_size {size} must be (H, W), multiples of {stride} for this model.")
  infer = inference_fn(predictor.task.bind_predict(predictor.config, predictor.model))
  variables = jax.tree.map(np.asarray, jax.device_get(predictor.variables))  # Constants.

  def fn(images):
    sizes = jnp.broadcast_to(jnp.asarray(size, jnp.int32), (images.shape[0], 2))
    return infer(variables, images, sizes)

  batch = jax.export.symbolic_shape("b")[0] if batch_size is None else int(batch_size)
  spec = jax.ShapeDtypeStruct((batch, *size, 3), jnp.uint8)
  # XLA's own convolutions: oneDNN's custom calls exist only in a segjax process.
  with conv.cpu_convolutions("xla"):
    return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec)


def define_flags() -> None:
  """The command line's flags: defined only when run as a program, so that importing this
  module (for `export_predictor`) leaves absl's global flags alone."""
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Config the model was trained with (default: WORKDIR/config.json).",
    lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "Training directory holding checkpoints/.")
  flags.DEFINE_string("output", None, "File to write the serialized function to.")
  flags.DEFINE_integer("batch_size", None, "Fixed batch size; default a symbolic batch.")
  flags.DEFINE_list("image_size", None, "H,W of the input images; default the config's.")
  flags.DEFINE_list("platforms", list(PLATFORMS), "Platforms to serialize for.")
  flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
  del argv
  cli.hide_gpus_from_tensorflow()
  cli.quiet_logging()
  from segjax.predict import Predictor

  f = flags.FLAGS
  predictor = Predictor.from_workdir(f.workdir, f.config)
  size = tuple(int(s) for s in f.image_size) if f.image_size else None
  exported = export_predictor(
    predictor, image_size=size, batch_size=f.batch_size, platforms=f.platforms
  )
  data = exported.serialize()
  with open(f.output, "wb") as out:
    out.write(data)
  print(
    f"Wrote {f.output} ({len(data) / 2**20:.1f} MiB): inputs {exported.in_avals}, "
    f"platforms {exported.platforms}, checkpoint step {predictor.step}.",
    flush=True,
  )


if __name__ == "__main__":
  define_flags()
  cli.run(main)
