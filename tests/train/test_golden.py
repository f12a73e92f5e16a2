"""Golden Mask R-CNN losses: the five training losses of a fixed model on a fixed batch.

The model is `configs/mask_rcnn_shapes.py:tiny`'s with smaller samples (`_config`); its
parameters are drawn with numpy from a seed per parameter name (not with jax's PRNG, whose
streams and compile time vary with the jax version), at scales that make every loss depend on
its targets; the batch is two 64 x 64 images drawn here. The losses run under jit with the
training settings and the sampling key `jax.random.key(0)` (threefry: the same bits in jax
0.10 and 0.12).

`GOLDEN` is that dictionary, recorded once. It pins everything between the batch and the
losses: anchors, matching and sampling, proposal generation (top-k, NMS), ROIAlign, the heads,
the mask targets and each loss's normalisation. A refactor meant to leave the numerics alone
must leave it alone. Re-record (`python -m tests.train.test_golden` prints the dictionary) only
for a deliberate change of what the model computes (a loss, a sampling rule, an ROIAlign or
anchor convention, a head's architecture, how `_numpy_params` fills a renamed parameter), and
say in the change which loss moved and why. The facts below hold whatever the record says.
"""

import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import mask_rcnn_shapes
from segjax.models import create_model, mask_rcnn
from segjax.train import steps
from segjax.train.state import TrainState

LOSSES = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask")

# Recorded with jax 0.10.2 on CPU; jax 0.12 gives the same to 2e-6, an AVX-512 CPU (AMD EPYC)
# to 1.1e-5 (loss_box_reg; the others within 3e-6): XLA's summation order follows the vector
# width. A change of convention moves a loss by far more (1e-3 and up).
GOLDEN_RTOL = 5e-5
GOLDEN = {
  "loss_rpn_cls": 2.1283810138702393,
  "loss_rpn_loc": 7.432342052459717,
  "loss_cls": 8.147214889526367,
  "loss_box_reg": 5.845383644104004,
  "loss_mask": 1.997532844543457,
}

# Predictors whose zero weights give the uniform losses (flattened parameter paths).
CLASS_PREDICTOR = ("roi_heads", "box_head", "cls_score")
MASK_PREDICTOR = ("roi_heads", "mask_head", "predictor")
OBJECTNESS = ("rpn", "objectness_logits")


def _config():
  """The tiny shapes model with samples smaller than the candidates: 4 anchors (2 positive
  slots) and 8 ROIs (2 foreground slots) per image, so that every loss depends on the key."""
  config = mask_rcnn_shapes.get_config("tiny")
  config.model.rpn.batch_size_per_image = 4
  config.model.roi_heads.batch_size_per_image = 8
  return config


def _batch():
  """Two 64 x 64 images with 2 and 3 instances (G = 3 slots, one padded). The large box gives
  many foreground proposals, more than the sample's foreground slots, so that the sampling
  key matters; the ellipses' masks differ from their boxes, so that the mask targets do."""
  h = w = 64
  yy, xx = np.mgrid[:h, :w] + 0.5
  boxes = np.array(
    [
      [[4, 6, 60, 58], [8, 36, 30, 60], [0, 0, 0, 0]],
      [[10, 10, 50, 28], [20, 30, 46, 60], [40, 2, 62, 22]],
    ],
    np.float32,
  )
  classes = np.array([[1, 3, 0], [2, 4, 1]], np.int32)
  valid = np.array([[True, True, False], [True, True, True]])
  masks = np.zeros((2, 3, h, w), np.uint8)
  for b, g in zip(*np.nonzero(valid)):
    x1, y1, x2, y2 = boxes[b, g]
    if (b + g) % 2:  # A rectangle filling its box.
      masks[b, g] = (x1 <= xx) & (xx < x2) & (y1 <= yy) & (yy < y2)
    else:  # An ellipse inscribed in its box.
      cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
      masks[b, g] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
  rng = np.random.default_rng(0)
  image = rng.normal(size=(2, h, w, 3)).astype(np.float32)
  image += masks.max(1)[..., None] * rng.uniform(-2, 2, size=(2, 1, 1, 3)).astype(np.float32)
  return {
    "image": image,
    "boxes": boxes,
    "classes": classes,
    "instance_masks": masks,
    "valid": valid,
    "image_size": np.full((2, 2), 64, np.int32),
  }


def _numpy_params(shapes: dict) -> dict:
  """Parameters of `shapes` (a tree of ShapeDtypeStructs), each drawn from a numpy generator
  seeded by its own name: kernels He-normal, biases N(0, 0.1), norm scales 1 + N(0, 0.1)."""

  def draw(path, shape):
    name = "/".join(path)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if path[-1] == "kernel":
      fan_in = int(np.prod(shape.shape[:-1]))
      return (rng.normal(size=shape.shape) * math.sqrt(2 / fan_in)).astype(np.float32)
    offset = 1.0 if path[-1] == "scale" else 0.0
    return (offset + 0.1 * rng.normal(size=shape.shape)).astype(np.float32)

  flat = traverse_util.flatten_dict(shapes)
  return traverse_util.unflatten_dict({k: draw(k, v) for k, v in flat.items()})


@functools.cache
def _setup():
  """(variables, jitted losses(variables, batch, rng) -> (losses, metrics)), built once."""
  model = create_model(_config().model)
  shapes = jax.eval_shape(
    functools.partial(model.init, train=False, method=type(model).initialize),
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
  )
  variables = {
    "params": _numpy_params(shapes["params"]),
    # Fresh statistics (mean 0, variance 1); training BatchNorm uses the batch's anyway.
    "batch_stats": jax.tree_util.tree_map_with_path(
      lambda path, s: np.full(s.shape, path[-1].key in ("var", "scale"), np.float32),
      shapes.get("batch_stats", {}),
    ),
  }

  @jax.jit
  def losses(variables, batch, rng):
    _, (metrics, _) = mask_rcnn.loss_fn(variables, batch, rng, model=model, train=True)
    return metrics

  return variables, losses


def _losses(variables=None, rng=0):
  default, fn = _setup()
  metrics = fn(default if variables is None else variables, _batch(), jax.random.key(rng))
  return {k: float(v) for k, v in metrics.items()}


def _with_zero(variables, *paths):
  flat = traverse_util.flatten_dict(variables["params"])
  for key in flat:
    if key[:-1] in paths:
      flat[key] = np.zeros_like(flat[key])
  return {**variables, "params": traverse_util.unflatten_dict(flat)}


def test_losses_match_the_record():
  losses = _losses()
  for key in LOSSES:
    assert losses[key] == pytest.approx(GOLDEN[key], rel=GOLDEN_RTOL), (key, losses[key])


def test_zero_predictors_give_the_uniform_losses():
  # Zero class logits: cross-entropy log(K + 1) on every sampled ROI, whatever the sample.
  # Zero mask logits: binary cross-entropy log 2 on every pixel of every foreground.
  # Zero objectness: log 2 on each sampled anchor, summed and divided by the sample size
  # (batch_size_per_image per image, detectron2), so the share of slots filled shows.
  config = _config()
  variables, _ = _setup()
  losses = _losses(_with_zero(variables, CLASS_PREDICTOR, MASK_PREDICTOR, OBJECTNESS))
  num_classes = config.model.roi_heads.num_classes
  assert losses["loss_cls"] == pytest.approx(math.log(num_classes + 1), rel=1e-6)
  assert losses["loss_mask"] == pytest.approx(math.log(2), rel=1e-5)  # float32 sums.
  sampled = losses["rpn_num_pos_anchors"] + losses["rpn_num_neg_anchors"]
  rpn_slots = config.model.rpn.batch_size_per_image
  assert losses["loss_rpn_cls"] == pytest.approx(math.log(2) * sampled / rpn_slots, rel=1e-6)
  assert sampled == rpn_slots  # Hundreds of background anchors: the sample is full.
  assert losses["num_fg_rois"] > 0  # So that the mask loss had pixels to average.


def test_sampling_follows_the_key():
  same, other = _losses(rng=0), _losses(rng=1)
  assert same == _losses(rng=0)  # Deterministic.
  # A different key samples different anchors and ROIs: every sampled loss moves (the batch
  # has more foreground proposals than the ROI sample's foreground slots).
  for key in LOSSES:
    assert other[key] != same[key], key


def test_train_step_folds_the_step_into_the_key():
  """Each step samples with `fold_in(rng, step)`: a fixed run key, a new sample each step."""

  def loss_fn(variables, batch, rng, *, train):
    del batch, train
    loss = jnp.sum(variables["params"]["w"] ** 2)
    return loss, ({"key": jax.random.key_data(rng)}, {})

  state = TrainState.create(
    apply_fn=None, params={"w": jnp.ones(3)}, batch_stats={}, tx=optax.sgd(0.1)
  )
  rng = jax.random.key(7)
  keys = []
  for _ in range(2):
    state, metrics = steps.train_step(state, {}, rng, loss_fn=loss_fn)
    keys.append(np.asarray(metrics["key"]))
  for step, key in enumerate(keys):
    np.testing.assert_array_equal(key, jax.random.key_data(jax.random.fold_in(rng, step)))
  assert not np.array_equal(keys[0], keys[1])


if __name__ == "__main__":  # Prints the dictionary to paste into GOLDEN when re-recording.
  print("GOLDEN = {")
  for name, value in _losses().items():
    if name in LOSSES:
      print(f"  {name!r}: {value!r},")
  print("}")
