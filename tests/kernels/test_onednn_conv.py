"""Tests for segjax/kernels/onednn_conv.py: oneDNN's convolutions equal `jax.lax`'s.

Skipped where oneDNN cannot be built (not Linux x86-64, or no C++ compiler); CI builds it first
(`.ci/run`), so they run there.
"""

import importlib.metadata
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from segjax.kernels import onednn_conv
from tests.markers import TEST_XLA_FLAGS

DN = ("NHWC", "HWIO", "NHWC")


def _normal(seed, *shapes):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape).astype(np.float32) for shape in shapes]


def _custom_calls(fn, *args) -> list[str]:
  text = jax.jit(fn).lower(*args).as_text()
  return [line for line in text.splitlines() if "segjax_onednn_conv" in line]


# (input, kernel, strides, padding, dilation): stride 2 on odd sizes, the ResNet stem, 1x1
# convs with stride, non-square inputs and kernels, asymmetric and one-sided padding, dilation,
# batch 1, a window as large as the input.
CASES = [
  ((2, 9, 7, 3), (3, 3, 3, 4), (2, 2), "SAME", (1, 1)),
  ((1, 11, 13, 5), (3, 3, 5, 6), (1, 1), ((1, 1), (1, 1)), (1, 1)),
  ((2, 16, 16, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3)), (1, 1)),
  ((2, 9, 9, 8), (1, 1, 8, 4), (2, 2), "VALID", (1, 1)),
  ((1, 10, 8, 4), (2, 3, 4, 5), (1, 2), ((0, 1), (2, 0)), (1, 1)),
  ((2, 12, 12, 6), (3, 3, 6, 6), (1, 1), "SAME", (2, 2)),
  ((1, 13, 9, 2), (3, 2, 2, 3), (2, 1), "VALID", (2, 3)),
  ((3, 5, 5, 4), (5, 5, 4, 2), (1, 1), "VALID", (1, 1)),
  ((2, 32, 32, 64), (3, 3, 64, 32), (1, 1), "SAME", (1, 1)),
]


@pytest.mark.parametrize("x_shape, k_shape, strides, padding, dilation", CASES)
def test_values_and_gradients_match_lax(x_shape, k_shape, strides, padding, dilation):
  _assert_matches_lax(x_shape, k_shape, strides, padding, dilation)


@pytest.mark.parametrize("extra", [0, 1])
def test_batches_split_across_xla_threads_match_lax(extra):
  """A batch that divides among XLA's CPU threads (one per core) runs as one single-threaded
  oneDNN call per thread, the kernel gradient summed over them; one that does not, whole."""
  batch = 2 * len(os.sched_getaffinity(0)) + extra
  _assert_matches_lax((batch, 12, 10, 16), (3, 3, 16, 24), (1, 1), "SAME", (1, 1))
  _assert_matches_lax((batch, 11, 9, 8), (3, 3, 8, 4), (2, 2), "VALID", (1, 1))


def _assert_matches_lax(x_shape, k_shape, strides, padding, dilation):
  x, kernel = _normal(0, x_shape, k_shape)

  def loss(conv_fn):
    def f(x, kernel):
      y = conv_fn(x, kernel, strides, padding, rhs_dilation=dilation, dimension_numbers=DN)
      return jnp.sum(jnp.sin(y)), y

    return jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))

  (_, y), (dx, dk) = loss(onednn_conv.conv_general_dilated)(x, kernel)
  (_, y_ref), (dx_ref, dk_ref) = loss(lax.conv_general_dilated)(x, kernel)
  for got, want in ((y, y_ref), (dx, dx_ref), (dk, dk_ref)):
    assert got.shape == want.shape
    scale = float(np.abs(want).max()) or 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale * np.sqrt(x.size / x.shape[0]))
  f = lambda x, k: onednn_conv.conv_general_dilated(x, k, strides, padding, None, dilation, DN)
  assert len(_custom_calls(f, x, kernel)) == 1


def test_runs_as_three_custom_calls_in_a_gradient():
  x, kernel = _normal(1, (2, 8, 8, 4), (3, 3, 4, 4))
  loss = lambda x, k: jnp.sum(
    onednn_conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN) ** 2
  )
  calls = _custom_calls(jax.grad(loss, (0, 1)), x, kernel)
  for name in ("forward", "input_grad", "kernel_grad"):
    assert sum(f"segjax_onednn_conv_{name}" in c for c in calls) == 1, calls


@pytest.mark.parametrize(
  "dtype, dimension_numbers, groups, lhs_dilation, padding",
  [
    (jnp.bfloat16, DN, 1, None, "SAME"),
    (jnp.float32, ("NCHW", "OIHW", "NCHW"), 1, None, "SAME"),
    (jnp.float32, None, 1, None, "SAME"),
    (jnp.float32, DN, 2, None, "SAME"),
    (jnp.float32, DN, 1, (2, 2), ((1, 1), (1, 1))),
    (jnp.float32, DN, 1, None, ((-1, 0), (1, 1))),
  ],
)
def test_other_convolutions_are_lax_unchanged(
  dtype, dimension_numbers, groups, lhs_dilation, padding
):
  x, kernel = _normal(2, (2, 6, 6, 4), (3, 3, 4 // groups, 4))
  if dimension_numbers != DN:
    x, kernel = x.transpose(0, 3, 1, 2), kernel.transpose(3, 2, 0, 1)
  x, kernel = jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)
  kwargs = dict(
    lhs_dilation=lhs_dilation, dimension_numbers=dimension_numbers, feature_group_count=groups
  )
  ours = lambda x, k: onednn_conv.conv_general_dilated(x, k, (1, 1), padding, **kwargs)
  theirs = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), padding, **kwargs)
  assert _custom_calls(ours, x, kernel) == []
  np.testing.assert_array_equal(jax.jit(ours)(x, kernel), jax.jit(theirs)(x, kernel))


def test_vmap_over_kernels_and_inputs():
  """Ensembles vmap the model over its parameters: a batch of kernels and of inputs."""
  xs, kernels = _normal(3, (3, 2, 7, 7, 4), (3, 3, 3, 4, 5))
  conv = lambda fn: jax.jit(jax.vmap(lambda x, k: fn(x, k, (1, 1), "SAME", dimension_numbers=DN)))
  np.testing.assert_allclose(
    conv(onednn_conv.conv_general_dilated)(xs, kernels),
    conv(lax.conv_general_dilated)(xs, kernels),
    rtol=1e-5,
    atol=1e-5,
  )


def test_flax_conv_with_it_matches_flax_conv():
  (x,) = _normal(4, (2, 10, 10, 3))
  plain = nn.Conv(8, (3, 3), strides=(2, 2))
  ours = nn.Conv(8, (3, 3), strides=(2, 2), conv_general_dilated=onednn_conv.conv_general_dilated)
  variables = plain.init(jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(ours.init(jax.random.key(0), x))

  def loss(module):
    return jax.jit(jax.grad(lambda v: jnp.sum(module.apply(v, x) ** 2)))

  np.testing.assert_allclose(
    ours.apply(variables, x), plain.apply(variables, x), rtol=1e-5, atol=1e-5
  )
  for got, want in zip(
    jax.tree.leaves(loss(ours)(variables)), jax.tree.leaves(loss(plain)(variables))
  ):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_build_is_cached(tmp_path, monkeypatch):
  monkeypatch.setenv("SEGJAX_CACHE_DIR", str(tmp_path))
  first = onednn_conv.build()
  mtime = first.stat().st_mtime_ns
  assert onednn_conv.build() == first and first.stat().st_mtime_ns == mtime
  assert [p.name for p in tmp_path.iterdir()] == [first.name]  # No partial files left.


def test_missing_package_names_the_extra(monkeypatch):
  real = importlib.metadata.distribution

  def distribution(name):
    if name == onednn_conv.HEADERS_DIST:
      raise importlib.metadata.PackageNotFoundError(name)
    return real(name)

  monkeypatch.setattr(importlib.metadata, "distribution", distribution)
  with pytest.raises(
    onednn_conv.OnednnUnavailable, match=r"'onednn-devel-cpu-gomp' is not installed.*pip install"
  ):
    onednn_conv.build()


def test_a_failed_load_is_not_retried(monkeypatch):
  calls = []

  def failing_build():
    calls.append(1)
    raise onednn_conv.OnednnUnavailable("compiling onednn_conv.cc failed: no space left")

  monkeypatch.setattr(onednn_conv, "_loaded", False)
  monkeypatch.setattr(onednn_conv, "_failure", None)
  monkeypatch.setattr(onednn_conv, "build", failing_build)
  for _ in range(2):
    with pytest.raises(onednn_conv.OnednnUnavailable, match="no space left"):
      onednn_conv.load()
  assert not onednn_conv.available() and len(calls) == 1


_EIGHT_DEVICES = """
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from segjax.kernels import onednn_conv
onednn_conv.load()
dn = ("NHWC", "HWIO", "NHWC")
rng = np.random.default_rng(0)
# (kernel, in, out, stride): a stem, 1x1s, a strided 1x1, 3x3s; devices run them at once.
layers = [(7, 3, 32, 2), (1, 32, 128, 1), (3, 128, 128, 1), (1, 128, 256, 2), (3, 256, 64, 1)]
x = rng.normal(size=(8, 1, 32, 32, 3)).astype(np.float32)
ks = [rng.normal(size=(8, s, s, a, b)).astype(np.float32) / np.sqrt(s * s * a)
      for s, a, b, _ in layers]
def grads(conv):
  def loss(x, ks):
    for k, (_, _, _, st) in zip(ks, layers):
      x = jnp.tanh(conv(x, k, (st, st), "SAME", dimension_numbers=dn))
    return jnp.sum(x)
  return jax.pmap(jax.grad(loss, (0, 1)))
for _ in range(5):
  got = jax.block_until_ready(grads(onednn_conv.conv_general_dilated)(x, ks))
want = grads(lax.conv_general_dilated)(x, ks)
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
"""


def test_eight_devices_at_once_match_lax():
  """pmap runs each device's custom calls on its own thread: each needs its own scratchpad
  (a shared one corrupted the heap in an 8-device Mask R-CNN run)."""
  env = dict(os.environ, XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=8")
  done = subprocess.run(
    [sys.executable, "-c", _EIGHT_DEVICES], env=env, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-3000:]
