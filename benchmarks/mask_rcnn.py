"""Mask R-CNN train-step and inference time: medians over timed repeats, compile times apart.

  python benchmarks/mask_rcnn.py --model all
  python benchmarks/mask_rcnn.py --model toy [--batch_sizes 8] [--image_size 64] [--repeats 10]
  python benchmarks/mask_rcnn.py --model r50 [--batch_sizes 1,2] [--image_size 800] [--repeats 2]

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


def _time_steps(train, predict, state, batch, key, repeats, warmup):
  """`((train_s, compile_s), (predict_s, compile_s))`: median step times and compile times."""
  train_compiled, train_compile = compile_timed(train, state, batch, key)

  def train_once():
    nonlocal state
    state, metrics = train_compiled(state, batch, key)
    jax.block_until_ready(metrics)

  train_s = median_seconds(train_once, repeats, warmup)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  predict_compiled, predict_compile = compile_timed(predict, variables, batch)
  predict_s = median_seconds(
    lambda: jax.block_until_ready(predict_compiled(variables, batch)), repeats, warmup
  )
  return (train_s, train_compile), (predict_s, predict_compile)


def synthetic_batch(b: int, size: int, g: int, num_classes: int, seed: int = 0) -> dict:
  """A batch per the `mask_rcnn` contract: 1 to ~G/2 (at most G-1) random boxes per image,
  sides 1/16 to 1/2 of the image, masks filled inside them, the remaining rows padding."""
  rng = np.random.default_rng(seed)
  image = rng.normal(scale=0.1, size=(b, size, size, 3)).astype(np.float32)
  boxes = np.zeros((b, g, 4), np.float32)
  classes = np.zeros((b, g), np.int32)
  masks = np.zeros((b, g, size, size), np.uint8)
  valid = np.zeros((b, g), bool)
  for i in range(b):
    for j in range(rng.integers(1, max(2, g // 2) + 1) if g > 1 else 1):
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


def measure(name: str, batch_sizes, size: int, repeats: int, warmup: int) -> None:
  from segjax.models import create_model, mask_rcnn
  from segjax.train import state as state_lib
  from segjax.train import steps

  settings = SETTINGS[name]
  model = create_model(ml_collections.ConfigDict(settings["model"]))
  config = ml_collections.ConfigDict(
    dict(**settings["optimizer"], schedule="constant", warmup_steps=10, num_train_steps=1000)
  )
  g, k = settings["max_instances"], model.roi_heads.num_classes
  note = "" if name != "r50" or size == 800 else " (reduced from torchvision's 800x800 for a CPU)"
  print(
    f"Mask R-CNN {settings['title']}: image {size}x{size}{note}, G={g} ground-truth "
    f"slots, {config.optimizer}, backbone dtype {np.dtype(model.backbone.dtype).name}, "
    f"on {jax.device_count()} x {jax.devices()[0].device_kind}",
    flush=True,
  )

  key = jax.random.key(0)
  # Parameter shapes do not depend on the image size: initialize on a small image.
  init = jax.jit(functools.partial(state_lib.create_train_state, model, config))
  fresh_state = init(key, np.zeros((1, 64, 64, 3), np.float32))
  train = jax.jit(
    functools.partial(steps.train_step, loss_fn=functools.partial(mask_rcnn.loss_fn, model=model)),
    donate_argnums=0,
  )
  predict = jax.jit(functools.partial(mask_rcnn.predict, model=model))
  for b in batch_sizes:
    batch = jax.device_put(synthetic_batch(b, size, g, k))
    state = jax.tree.map(lambda x: x.copy(), fresh_state)  # The step donates it.
    (train_s, train_compile), (predict_s, predict_compile) = _time_steps(
      train, predict, state, batch, key, repeats, warmup
    )
    print(
      f"  batch {b}: train     {1e3 * train_s:9.1f} ms/step   ({b / train_s:7.2f} images/s, "
      f"median of {repeats}; compile {train_compile:.1f} s)",
      flush=True,
    )
    print(
      f"  batch {b}: inference {1e3 * predict_s / b:9.1f} ms/image  (step "
      f"{1e3 * predict_s:.1f} ms, median of {repeats}; compile {predict_compile:.1f} s)",
      flush=True,
    )


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
