"""Test setup: hide GPUs from TensorFlow and keep JAX on 64-bit-free CPU defaults."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # As segjax.cli: same numerics, no notice.

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")
