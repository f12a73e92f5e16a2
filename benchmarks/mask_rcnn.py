"""Mask R-CNN train-step and inference time: medians over timed repeats, compile times apart.

  python benchmarks/mask_rcnn.py --model all
  python benchmarks/mask_rcnn.py --model toy [--batch_sizes 8] [--image_size 64] [--repeats 10]
  python benchmarks/mask_rcnn.py --model r50 [--batch_sizes 1,2] [--image_size 800] [--repeats 2]
  python benchmarks/mask_rcnn.py --model r50 --batch_sizes 2 --image_size 512 --gt_per_image 5 \
    --variants previous,current --train_only --repeats 3
  python benchmarks/mask_rcnn.py --model toy --cropped_mask_size 56   # masks cropped on the host

`--variants` compiles one step per named model variant (`VARIANTS`: config overrides, e.g. the
previous implementation of a rewritten op) and times them interleaved (A B A B ...), printing
each one's median, its ratio to the first, its compile time and its executable's memory
(arguments + outputs + temporaries, XLA's `memory_analysis`), with the load average; the
process's peak RSS comes last (all variants together).

Two models: "r50", torchvision's `maskrcnn_resnet50_fpn` (91 classes: K = 90 plus background,
frozen batch norm, stem and res2 frozen, detectron2 1x heads and proposal counts, SGD) at
800 x 800, batches 1 and 2; and "toy", the shapes-sized model of
`configs/mask_rcnn_shapes.py` (ResNet-18, base width 16, 64-channel FPN, AdamW) at 64 x 64,
batch 8. Each runs the real jitted `segjax.train.steps.train_step` (forward, backward,
optimizer update) and `mask_rcnn.predict` (detections and pasted masks) on a synthetic batch
that follows the batch contract: random boxes inside the image, their masks filled, some
ground-truth rows padding. Compilation (`.lower(...).compile()`) is timed apart from the
steps. On a 2-core CPU `--model r50` takes about 5 minutes (train steps of 21 s at batch 1
and 45 s at batch 2, inference 2.6-2.9 s per image, compiles 5-17 s), hence its default of 2
repeats.
"""

from segjax import cli  # noqa: I001  (first: sets TensorFlow's log level before TF loads)

import functools
import os
import resource
import statistics
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags

from timing import compile_timed, median_seconds

flags.DEFINE_enum("model", "all", ["r50", "toy", "all"], "Which model(s) to measure.")
flags.DEFINE_list("batch_sizes", None, "Batch sizes; default 1,2 for r50 and 8 for toy.")
flags.DEFINE_integer("image_size", None, "Square image side; default 800 for r50, 64 for toy.")
flags.DEFINE_integer("repeats", None, "Timed steps (median reported); default 2 r50, 10 toy.")
flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
flags.DEFINE_list("variants", ["current"], "Model variants (VARIANTS keys), timed interleaved.")
flags.DEFINE_integer("gt_per_image", None, "Ground truths per image; default 1 to ~G/2 random.")
flags.DEFINE_bool("train_only", False, "Skip the inference step.")
flags.DEFINE_integer(
  "cropped_mask_size",
  0,
  "S > 0: masks cropped to their boxes at S x S (dataset.cropped_mask_size).",
)

# Model config overrides (merged into the model settings) naming an implementation choice, so
# that before and after are measured in one run. "previous" is the tree before the rewrites.
VARIANTS = {
  "current": {},
  "previous": {
    "rpn": {"nms_block_size": 0},
    "roi_heads": {
      "adaptive_layout": "pairs",
      "nms_block_size": 0,
      "mask_slot_buckets": 1,
      "train_mask_slot_buckets": 1,
    },
  },
  "serial_nms": {"rpn": {"nms_block_size": 0}, "roi_heads": {"nms_block_size": 0}},
  "pairs": {"roi_heads": {"adaptive_layout": "pairs"}},
  "mask32": {"roi_heads": {"mask_batch_size_per_image": 32}},
  "mask64": {"roi_heads": {"mask_batch_size_per_image": 64}},
  "no_buckets": {"roi_heads": {"mask_slot_buckets": 1, "train_mask_slot_buckets": 1}},
  "no_train_buckets": {"roi_heads": {"train_mask_slot_buckets": 1}},
  "onednn": {},
}
# Variants whose convolutions run on the CPU by oneDNN (`config.cpu_convolutions`).
ONEDNN_VARIANTS = ("onednn",)

# Per model: the model config for `create_model`, the optimizer keys of
# `create_train_state`, ground-truth slots G, and the defaults of the flags above.
SETTINGS = {
  "r50": dict(
    title="R50-FPN, 91 classes (torchvision maskrcnn_resnet50_fpn)",
    model=dict(name="mask_rcnn", roi_heads=dict(num_classes=90)),
    optimizer=dict(optimizer="sgd", learning_rate=0.02, weight_decay=1e-4, grad_clip_norm=0.0),
    max_instances=100,
    batch_sizes=(1, 2),
    image_size=800,
    repeats=2,
  ),
  "toy": dict(
    title="toy shapes-sized (ResNet-18, base width 16, FPN 64, 4 classes)",
    model=dict(
      name="mask_rcnn",
      backbone=dict(depth=18, base_width=16, norm="bn", freeze_at=0),
      fpn=dict(out_channels=64),
      rpn=dict(
        anchor_sizes=((8,), (16,), (32,), (64,), (128,)),
        pre_nms_topk_train=256,
        pre_nms_topk_test=128,
        post_nms_topk_train=128,
        post_nms_topk_test=64,
        batch_size_per_image=64,
      ),
      roi_heads=dict(
        num_classes=4,
        batch_size_per_image=64,
        fc_dims=(128, 128),
        mask_conv_dims=(64, 64),
        sampling_ratio=2,
        detections_per_image=16,
      ),
    ),
    optimizer=dict(optimizer="adamw", learning_rate=1e-3, weight_decay=1e-4, grad_clip_norm=10.0),
    max_instances=8,
    batch_sizes=(8,),
    image_size=64,
    repeats=10,
  ),
}


def synthetic_batch(
  b: int, size: int, g: int, num_classes: int, seed: int = 0, per_image: int | None = None
) -> dict:
  """A batch per the `mask_rcnn` contract: 1 to ~G/2 (at most G-1) random boxes per image, or
  `per_image` of them, sides 1/16 to 1/2 of the image, masks filled inside them, the remaining
  rows padding."""
  rng = np.random.default_rng(seed)
  image = rng.normal(scale=0.1, size=(b, size, size, 3)).astype(np.float32)
  boxes = np.zeros((b, g, 4), np.float32)
  classes = np.zeros((b, g), np.int32)
  masks = np.zeros((b, g, size, size), np.uint8)
  valid = np.zeros((b, g), bool)
  for i in range(b):
    count = per_image or (rng.integers(1, max(2, g // 2) + 1) if g > 1 else 1)
    for j in range(min(count, g)):
      w, h = rng.integers(size // 16, size // 2 + 1, 2)
      x1, y1 = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
      boxes[i, j] = (x1, y1, x1 + w, y1 + h)
      classes[i, j] = rng.integers(1, num_classes + 1)
      masks[i, j, y1 : y1 + h, x1 : x1 + w] = 1
      image[i, y1 : y1 + h, x1 : x1 + w, j % 3] += 1.0
      valid[i, j] = True
  return {
    "image": image,
    "boxes": boxes,
    "classes": classes,
    "instance_masks": masks,
    "valid": valid,
    "image_size": np.full((b, 2), size, np.int32),
  }


def with_cropped_masks(batch: dict, size: int) -> dict:
  """`batch` with `cropped_masks` (B, G, S, S) instead of `instance_masks`, as the instance
  pipeline crops them (`segjax.data.instance_ops.crop_and_resize_masks`)."""
  from segjax.data import instance_ops

  masks = batch.pop("instance_masks")
  b, g = masks.shape[:2]
  flat = instance_ops.crop_and_resize_masks(
    masks.reshape(b * g, *masks.shape[2:]), batch["boxes"].reshape(b * g, 4), size
  )
  crops = np.asarray(flat).reshape(b, g, size, size) * batch["valid"][..., None, None]
  return {**batch, "cropped_masks": crops.astype(np.float32)}


def _merge(base: dict, overrides: dict) -> dict:
  out = dict(base)
  for key, value in overrides.items():
    out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
  return out


def _memory(compiled) -> str:
  """The executable's buffers in GB: all, then arguments, outputs and temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    return "not reported"
  parts = (m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes)
  args, outs, temps = (x / 1e9 for x in parts)
  return f"{sum(parts) / 1e9:.2f} GB (arguments {args:.2f}, outputs {outs:.2f}, temp {temps:.2f})"


def _traced(variant: str, fn):
  from segjax.layers import conv

  return conv.traced_with("onednn" if variant in ONEDNN_VARIANTS else "xla", fn)


def measure(name: str, batch_sizes, size: int, repeats: int, warmup: int) -> None:
  from segjax.models import create_model, mask_rcnn
  from segjax.train import state as state_lib
  from segjax.train import steps

  f = flags.FLAGS
  settings = SETTINGS[name]
  models = {
    v: create_model(ml_collections.ConfigDict(_merge(settings["model"], VARIANTS[v])))
    for v in f.variants
  }
  model = models[f.variants[0]]
  config = ml_collections.ConfigDict(
    dict(**settings["optimizer"], schedule="constant", warmup_steps=10, num_train_steps=1000)
  )
  g, k = settings["max_instances"], model.roi_heads.num_classes
  note = "" if name != "r50" or size == 800 else " (reduced from torchvision's 800x800 for a CPU)"
  gt = f"{f.gt_per_image} per image" if f.gt_per_image else "1 to G/2 per image"
  if f.cropped_mask_size:
    gt += f", masks cropped to {f.cropped_mask_size}x{f.cropped_mask_size}"
  print(
    f"Mask R-CNN {settings['title']}: image {size}x{size}{note}, G={g} ground-truth "
    f"slots ({gt}), {config.optimizer}, backbone dtype {np.dtype(model.backbone.dtype).name}, "
    f"on {jax.device_count()} x {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs",
    flush=True,
  )

  key = jax.random.key(0)
  # Parameter shapes do not depend on the image size: initialize on a small image.
  init = jax.jit(functools.partial(state_lib.create_train_state, model, config))
  fresh_state = init(key, np.zeros((1, 64, 64, 3), np.float32))
  for b in batch_sizes:
    batch = synthetic_batch(b, size, g, k, per_image=f.gt_per_image)
    if f.cropped_mask_size:
      batch = with_cropped_masks(batch, f.cropped_mask_size)
    batch = jax.device_put(batch)
    steps_by_variant, compiles, states, memory = {}, {}, {}, {}
    for v, m in models.items():
      train = jax.jit(
        _traced(
          v,
          functools.partial(
            steps.train_step, loss_fn=functools.partial(mask_rcnn.loss_fn, model=m)
          ),
        ),
        donate_argnums=0,
      )
      states[v] = jax.tree.map(lambda x: x.copy(), fresh_state)  # The step donates it.
      steps_by_variant[v], compiles[v] = compile_timed(train, states[v], batch, key)
      memory[v] = _memory(steps_by_variant[v])
    times = {v: [] for v in models}
    fg = {}
    for round_ in range(warmup + repeats):
      for v in models:  # interleaved: A B A B ...
        start = time.perf_counter()
        states[v], metrics = steps_by_variant[v](states[v], batch, key)
        jax.block_until_ready(metrics)
        if round_ >= warmup:
          times[v].append(time.perf_counter() - start)
        fg[v] = float(metrics["num_fg_rois"])
    first = statistics.median(times[f.variants[0]])
    for v in models:
      train_s = statistics.median(times[v])
      print(
        f"  batch {b} {v:>9}: train {1e3 * train_s:9.1f} ms/step ({b / train_s:6.2f} images/s, "
        f"median of {repeats}, x{train_s / first:.2f} of {f.variants[0]}; compile "
        f"{compiles[v]:.1f} s; executable memory {memory[v]}; "
        f"{fg[v]:.0f} foreground ROIs/image; load {os.getloadavg()[0]:.1f})",
        flush=True,
      )
    if f.train_only:
      continue
    for v, m in models.items():
      predict = jax.jit(_traced(v, functools.partial(mask_rcnn.predict, model=m)))
      variables = {"params": states[v].params, "batch_stats": states[v].batch_stats}
      predict_compiled, predict_compile = compile_timed(predict, variables, batch)
      run = functools.partial(predict_compiled, variables, batch)
      predict_s = median_seconds(lambda run=run: jax.block_until_ready(run()), repeats, warmup)
      print(
        f"  batch {b} {v:>9}: inference {1e3 * predict_s / b:9.1f} ms/image (step "
        f"{1e3 * predict_s:.1f} ms, median of {repeats}; compile {predict_compile:.1f} s)",
        flush=True,
      )
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
  print(f"  peak RSS of the process (all variants): {peak:.2f} GB", flush=True)


def main(argv):
  del argv
  f = flags.FLAGS
  for name in ("r50", "toy") if f.model == "all" else (f.model,):
    settings = SETTINGS[name]
    batch_sizes = [int(b) for b in f.batch_sizes] if f.batch_sizes else settings["batch_sizes"]
    measure(
      name,
      batch_sizes,
      f.image_size or settings["image_size"],
      f.repeats or settings["repeats"],
      f.warmup,
    )


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
