"""Instance counts per image, to choose `dataset.max_instances` (COCO: Lin et al. 2014).

Static shapes pad every image to `max_instances` (segjax.data.instance_pipeline), so the
value trades memory (instance_masks are (K, H, W) per image) against truncated images.

  python -m segjax.data.scan_instances --annotation_file=annotations/instances_train2017.json
  python -m segjax.data.scan_instances --shapes --num_examples=2000

prints the number of images, the max and the 50/90/99/99.9th percentiles of instances per
image (crowd regions included: they take a slot), and suggests the smallest multiple of 8 at
or above the 99.9th percentile, with how many images it would truncate.
"""

from __future__ import annotations

import math

import numpy as np
from absl import app, flags

PERCENTILES = (50, 90, 99, 99.9)


def coco_instance_counts(annotation_file: str) -> np.ndarray:
  """(num_images,) usable annotations per image, as `segjax.data.coco` counts them."""
  from segjax.data import coco  # Lazy: imports TensorFlow.

  info = coco.load_coco(annotation_file)
  selected = coco.select_annotations(info, max_instances=2**31 - 1, overflow="truncate")
  return np.array([len(anns) for _, anns in selected], np.int64)


def shapes_instance_counts(
  split: str = "train",
  *,
  num_examples: int = 2000,
  image_size: tuple[int, int] = (64, 64),
  seed: int = 0,
  max_shapes: int = 4,
) -> np.ndarray:
  """(num_examples,) shapes per image of the shapes split."""
  from segjax.data.shapes import generate_example  # Lazy: imports TensorFlow.

  return np.array(
    [
      generate_example(seed, split, i, tuple(image_size), max_shapes, max_shapes)["valid"].sum()
      for i in range(num_examples)
    ],
    np.int64,
  )


def summarize(counts) -> dict:
  """Distribution of instance counts and a suggested `max_instances`."""
  counts = np.asarray(counts)
  if counts.size == 0:
    raise ValueError("No images to scan.")
  summary = {"images": int(counts.size), "max": int(counts.max()), "mean": float(counts.mean())}
  for p in PERCENTILES:
    summary[f"p{p:g}"] = float(np.percentile(counts, p))
  # A multiple of 8 keeps shapes friendly to accelerators; 99.9 % untruncated is plenty.
  suggested = max(8, 8 * math.ceil(summary["p99.9"] / 8))
  summary["suggested_max_instances"] = suggested
  summary["truncated_at_suggested"] = int((counts > suggested).sum())
  return summary


def format_summary(summary: dict) -> str:
  lines = [
    f"images: {summary['images']}",
    f"instances per image: mean {summary['mean']:.2f}, max {summary['max']}",
  ]
  lines += [f"  p{p:g}: {summary[f'p{p:g}']:g}" for p in PERCENTILES]
  lines.append(
    f"suggested max_instances: {summary['suggested_max_instances']} "
    f"(truncates {summary['truncated_at_suggested']} images)"
  )
  return "\n".join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  if (f.annotation_file is None) == (not f.shapes):
    raise app.UsageError("Give exactly one of --annotation_file or --shapes.")
  if f.shapes:
    counts = shapes_instance_counts(
      f.split, num_examples=f.num_examples, seed=f.seed, max_shapes=f.max_shapes
    )
  else:
    counts = coco_instance_counts(f.annotation_file)
  print(format_summary(summarize(counts)))


def define_flags() -> None:
  """Flags are defined only when run as a command, so that importing never clashes."""
  flags.DEFINE_string("annotation_file", None, "A COCO-format instances JSON to scan.")
  flags.DEFINE_bool("shapes", False, "Scan the shapes data set instead.")
  flags.DEFINE_string("split", "train", "Shapes split.")
  flags.DEFINE_integer("num_examples", 2000, "Shapes examples.")
  flags.DEFINE_integer("max_shapes", 4, "Shapes per image at most.")
  flags.DEFINE_integer("seed", 0, "Shapes seed.")


if __name__ == "__main__":
  from segjax import cli

  define_flags()
  cli.run(main)
