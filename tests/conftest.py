"""Test setup: hide GPUs from TensorFlow and keep JAX on 64-bit-free CPU defaults."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")
