"""Tests for segjax/ops/nms.py: exactly the greedy result, with static shapes, for the blocked
algorithm (one block and several) and the serial loop alike."""

import sys

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# segjax.ops.nms is the function (the public API), so import from the module path.
from segjax.ops.nms import batched_nms, nms, nms_per_image

nms_module = sys.modules["segjax.ops.nms"]

# As tests/weights/conftest.py: triton (imported by torchvision.ops in CUDA builds of torch)
# segfaults when loaded after TensorFlow, which tests/conftest.py imports; no test needs it.
sys.modules.setdefault("triton", None)
try:
  import torch
  import torchvision
except ImportError:  # CI installs the torch extra; without it the torchvision test skips.
  torch = torchvision = None


def iou_ref(a, b):
  """Pairwise IoU of (N, 4) and (M, 4) boxes; 0 without overlap."""
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), -1)
  area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), -1)
  union = area(a)[:, None] + area(b)[None] - inter
  return np.where(inter > 0, inter / np.where(inter > 0, union, 1), 0)


def nms_ref(boxes, scores, thr, score_thr=-np.inf, classes=None):
  """Textbook greedy NMS (torchvision semantics); order by score, ties by index."""
  order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
  iou = iou_ref(boxes, boxes)
  keep = []
  for i in order:
    if not scores[i] > score_thr:
      continue
    if all(iou[k, i] <= thr or (classes is not None and classes[k] != classes[i]) for k in keep):
      keep.append(i)
  return keep


_nms = jax.jit(nms, static_argnames=("max_output", "block_size"))
_batched = jax.jit(batched_nms, static_argnames=("max_output", "block_size"))
# The default (blocked, one block for these sizes), blocks of 5 boxes, the serial loop.
BLOCK_SIZES = (256, 5, 0)


@pytest.fixture(scope="module", autouse=True)
def blocked_whatever_the_count():
  """The blocked algorithm for any box count: segjax uses the serial loop for up to
  `SERIAL_UP_TO_BLOCKS` blocks of boxes, which would leave the small cases here serial."""
  previous, nms_module.SERIAL_UP_TO_BLOCKS = nms_module.SERIAL_UP_TO_BLOCKS, 0
  yield
  nms_module.SERIAL_UP_TO_BLOCKS = previous


def check(boxes, scores, thr, max_output, score_thr=-np.inf, classes=None):
  ref = nms_ref(boxes, scores, thr, score_thr, classes)[:max_output]
  for block_size in BLOCK_SIZES:
    if classes is None:
      idx, valid = _nms(boxes, scores, thr, max_output, score_thr, block_size=block_size)
    else:
      idx, valid = _batched(
        boxes, scores, classes, thr, max_output, score_thr, block_size=block_size
      )
    idx, valid = np.asarray(idx), np.asarray(valid)
    assert idx.shape == valid.shape == (max_output,) and idx.dtype == np.int32
    np.testing.assert_array_equal(valid, np.arange(max_output) < len(ref), f"{block_size=}")
    np.testing.assert_array_equal(idx[valid], ref, f"{block_size=}")
    np.testing.assert_array_equal(idx[~valid], 0)
  return idx[valid]


# Coordinates on a half-pixel grid: areas are exact, so no IoU lands within float32 rounding
# of a threshold without being exactly on it, and the float64 reference agrees.
_box = hnp.arrays(np.float32, (12, 4), elements=st.integers(0, 60).map(lambda v: v / 2)).map(
  lambda a: np.concatenate([a[:, :2], a[:, :2] + a[:, 2:] / 2 + 0.5], 1)
)
# Few distinct scores so ties are common.
_scores = hnp.arrays(np.float32, (12,), elements=st.sampled_from([0.1, 0.5, 0.5, 0.9, 1.0]))


@settings(max_examples=40, deadline=None)
@given(_box, _scores, st.sampled_from([0.0, 0.3, 0.5, 0.7]))
def test_greedy_invariant(boxes, scores, thr):
  kept = check(boxes, scores, thr, 12)
  rank = {i: r for r, i in enumerate(sorted(range(12), key=lambda i: (-scores[i], i)))}
  iou = iou_ref(boxes, boxes)
  for i in range(12):
    beats = [k for k in kept if rank[k] < rank[i] and iou[k, i] > thr]
    assert (i in kept) == (not beats)
  assert [rank[k] for k in kept] == sorted(rank[k] for k in kept)  # descending score


@settings(max_examples=20, deadline=None)
@given(_box, _scores, hnp.arrays(np.int32, (12,), elements=st.integers(0, 2)))
def test_batched_nms_is_per_class(boxes, scores, classes):
  check(boxes, scores, 0.5, 12, classes=classes)


def test_edge_cases():
  boxes = np.array(
    [
      [0, 0, 10, 10],
      [1, 1, 11, 11],  # IoU 0.68 with box 0
      [0, 0, 10, 10],  # duplicate of box 0, same score: lower index wins
      [5, 5, 5, 5],  # zero area: never suppresses nor suppressed
      [50, 50, 60, 60],
      [0, 0, 0, 0],  # padding
    ]
    + [[100, 100, 110, 110]] * 6,
    np.float32,
  )
  scores = np.array([0.9, 0.95, 0.9, 0.99, 0.2, -np.inf] + [0.1] * 6, np.float32)
  np.testing.assert_array_equal(check(boxes, scores, 0.5, 12), [3, 1, 4, 6])
  np.testing.assert_array_equal(check(boxes, scores, 0.7, 12), [3, 1, 0, 4, 6])
  check(boxes, scores, 0.5, 2)  # truncated to max_output
  check(boxes, scores, 0.5, 12, score_thr=0.5)
  check(boxes, np.full(12, -np.inf, np.float32), 0.5, 12)  # nothing valid
  idx, valid = nms(jnp.zeros((0, 4)), jnp.zeros((0,)), 0.5, 3)
  assert idx.shape == (3,) and not np.asarray(valid).any()


def test_batched_nms_keeps_overlapping_classes():
  boxes = np.array([[0, 0, 10, 10]] * 3 + [[0, 0, 0, 0]] * 9, np.float32)
  scores = np.array([0.5, 0.9, 0.7] + [-np.inf] * 9, np.float32)
  kept = check(boxes, scores, 0.5, 12, classes=np.array([1, 1, 2] + [0] * 9, np.int32))
  np.testing.assert_array_equal(kept, [1, 2])


def test_nms_per_image_matches_single_image():
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 40, (3, 12, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(2, 20, (3, 12, 2))], -1).astype(np.float32)
  scores = rng.uniform(size=(3, 12)).astype(np.float32)
  classes = rng.integers(0, 2, (3, 12)).astype(np.int32)
  run = jax.jit(nms_per_image, static_argnames="max_output")
  idx, valid = run(boxes, scores, 0.5, 12)
  cidx, cvalid = run(boxes, scores, 0.5, 12, classes=classes)
  for b in range(3):
    i, v = _nms(boxes[b], scores[b], 0.5, 12)
    np.testing.assert_array_equal(idx[b], i)
    np.testing.assert_array_equal(valid[b], v)
    i, v = _batched(boxes[b], scores[b], classes[b], 0.5, 12)
    np.testing.assert_array_equal(cidx[b], i)
    np.testing.assert_array_equal(cvalid[b], v)


def test_blocked_equals_serial_and_torchvision_on_clustered_boxes():
  # RPN-like: 600 boxes in 12 clusters, exact duplicates, tied scores, -inf padding.
  rng = np.random.default_rng(1)
  centre = rng.uniform(0, 300, (12, 2))[rng.integers(0, 12, 600)] + rng.normal(0, 6, (600, 2))
  wh = rng.uniform(10, 80, (600, 2))
  boxes = np.concatenate([centre - wh / 2, centre + wh / 2], 1).astype(np.float32)
  boxes[500:550] = boxes[:50]  # identical boxes
  scores = rng.choice(np.linspace(0, 1, 41), 600).astype(np.float32)  # many ties
  scores[550:] = -np.inf
  classes = rng.integers(0, 3, 600).astype(np.int32)
  serial = {thr: _nms(boxes, scores, thr, 1000, block_size=0) for thr in (0.7, 0.3)}
  for block_size in (64, 7):  # several blocks, the last one partial
    for thr in (0.7, 0.3):
      blocked = _nms(boxes, scores, thr, 1000, block_size=block_size)
      np.testing.assert_array_equal(blocked[0], serial[thr][0])
      np.testing.assert_array_equal(blocked[1], serial[thr][1])
  # Truncated to max_output (the blocked loop stops early); class-aware.
  for a, b in (
    (_nms(boxes, scores, 0.5, 60, block_size=64), _nms(boxes, scores, 0.5, 60, block_size=0)),
    (
      _batched(boxes, scores, classes, 0.5, 1000, block_size=64),
      _batched(boxes, scores, classes, 0.5, 1000, block_size=0),
    ),
  ):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  assert 60 < int(np.sum(serial[0.3][1])) < 500
  if torchvision is not None:
    finite = np.isfinite(scores)
    for thr in (0.7, 0.3):
      want = torchvision.ops.nms(torch.tensor(boxes[finite]), torch.tensor(scores[finite]), thr)
      np.testing.assert_array_equal(np.asarray(serial[thr][0])[serial[thr][1]], want.numpy())
