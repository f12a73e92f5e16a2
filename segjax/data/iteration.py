"""Iterating tf.data pipelines: data errors as `DataError`, the pipeline freed before raising.

A tf.data iterator whose map runs Python (`tf.numpy_function`: the folder and COCO sources
read files with Pillow) deadlocks if it is freed while the interpreter shuts down: its
destructor waits for calls that wait for the GIL. An exception's traceback keeps the iterator
alive until then, so these helpers convert TensorFlow's error and drop their reference to the
iterator before raising. The training loop frees its own iterator in its `finally`.
"""

from __future__ import annotations

from collections.abc import Iterator

import tensorflow as tf

from segjax.errors import DataError, tf_error_message


def next_batch(iterator, what: str = "input pipeline"):
  """`next(iterator)`, a TensorFlow op error raised as `DataError` without TF's frames."""
  try:
    return next(iterator)
  except tf.errors.OutOfRangeError:
    raise StopIteration from None
  except tf.errors.OpError as e:
    error = DataError(f"{what}: {tf_error_message(e.message)}")
  # Raised outside the except and without this frame's reference, so that the traceback
  # does not keep the iterator alive.
  del iterator
  raise error


def numpy_batches(dataset: tf.data.Dataset, what: str = "input pipeline") -> Iterator[dict]:
  """`dataset.as_numpy_iterator()` whose data errors are `DataError`s."""
  iterator = dataset.as_numpy_iterator()
  while True:
    try:
      batch = next_batch(iterator, what)
    except StopIteration:
      return
    except DataError:
      iterator = None
      raise
    yield batch
