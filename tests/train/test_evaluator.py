"""Evaluation sums past int32: counts are added on the host in int64 (segjax/train/evaluator.py);
an ensemble's counts: its mean softmax and each member's (segjax/train/semantic.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from segjax import metrics
from segjax.ops import sliding
from segjax.train import semantic
from segjax.train.evaluator import add_counts
from tests.markers import long_test


def test_counts_add_past_int32_exactly():
  big = np.iinfo(np.int32).max  # One batch's counts fit int32; their sum does not.
  batch = {
    "confusion_matrix": np.array([[big, 7], [3, big]], np.int32),
    "num_pixels": np.int32(big),
    "top5_correct": np.int32(big - 1),
  }
  total = None
  for _ in range(3):
    total = add_counts(total, batch)
  assert total["confusion_matrix"].dtype == np.int64
  np.testing.assert_array_equal(total["confusion_matrix"], [[3 * big, 21], [9, 3 * big]])
  assert total["num_pixels"] == 3 * big and total["top5_correct"] == 3 * (big - 1)


def test_metrics_of_counts_past_int32():
  cm = np.array([[3_000_000_000, 1_000_000_000], [0, 2_000_000_000]], np.int64)
  result = metrics.segmentation_metrics(cm)
  assert result["pixel_accuracy"] == 5 / 6
  np.testing.assert_allclose(result["per_class_iou"], [3 / 4, 2 / 3])
  assert result["mean_iou"] == (3 / 4 + 2 / 3) / 2


class _LinearEnsemble:
  """A stand-in for an ensemble (segjax/models/ensemble.py): E per-pixel linear classifiers,
  images (B, H, W, C) -> logits (E, B, H, W, K), applied as `semantic.apply_model` applies."""

  def apply(self, variables, image, *, train, mutable, rngs):
    del train, mutable, rngs
    return jnp.einsum("bhwc,eck->ebhwk", image, variables["params"]["w"]), {}


def _linear_case(members=3, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  variables = {"params": {"w": jnp.asarray(rng.normal(size=(members, 3, classes)), jnp.float32)}}
  batch = {
    "image": jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32),
    "mask": jnp.asarray(rng.integers(0, classes, size=(2, 8, 8)), jnp.int32),
    "example_mask": jnp.asarray([True, True]),
  }
  w = np.asarray(variables["params"]["w"])
  logits = np.einsum("bhwc,eck->ebhwk", np.asarray(batch["image"]), w)
  return variables, batch, logits


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _confusion(labels, predicted, classes):
  return np.bincount(labels.ravel() * classes + predicted.ravel(), minlength=classes**2).reshape(
    classes, classes
  )


def test_ensemble_is_scored_by_its_mean_softmax_and_each_member_alone():
  variables, batch, logits = _linear_case()
  counts = semantic.eval_step(variables, batch, model=_LinearEnsemble(), num_classes=4)
  mask = np.asarray(batch["mask"])
  mean = _softmax(logits).mean(0)
  np.testing.assert_array_equal(counts["confusion_matrix"], _confusion(mask, mean.argmax(-1), 4))
  for i in range(3):
    np.testing.assert_array_equal(
      counts["members"]["confusion_matrix"][i], _confusion(mask, logits[i].argmax(-1), 4)
    )
  # The ensemble differs from every member here, so a member's counts cannot stand in for it.
  assert all((mean.argmax(-1) != logits[i].argmax(-1)).any() for i in range(3))
  result = semantic.summarize(add_counts(None, jax.device_get(counts)))
  for i in range(3):
    member = metrics.segmentation_metrics(_confusion(mask, logits[i].argmax(-1), 4))
    assert result[f"member_{i}/mean_iou"] == member["mean_iou"]
    assert result[f"member_{i}/pixel_accuracy"] == member["pixel_accuracy"]
  ensemble = metrics.segmentation_metrics(_confusion(mask, mean.argmax(-1), 4))
  assert result["mean_iou"] == ensemble["mean_iou"]


@long_test  # In CI, ensembles: tests/train/test_ensemble.py's shorter tests.
def test_ensemble_dense_probabilities_are_the_mean_of_each_members():
  variables, batch, _ = _linear_case()
  infer = functools.partial(sliding.dense_probabilities, multiple=1, flip=True)
  size = jnp.asarray([[8, 8], [6, 5]], jnp.int32)
  args = (batch["image"], size, size, (8, 8))
  probs, members = semantic.dense_probabilities(infer, _LinearEnsemble(), variables, *args)
  w = variables["params"]["w"]
  for i in range(3):
    alone = infer(lambda x, i=i: jnp.einsum("bhwc,ck->bhwk", x, w[i]), *args)
    np.testing.assert_allclose(members[i], alone, atol=1e-6)
  np.testing.assert_allclose(probs, np.mean(members, 0), atol=1e-6)
