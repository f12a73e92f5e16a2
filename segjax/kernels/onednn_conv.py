"""2-D convolutions by oneDNN (the library PyTorch's CPU convolutions use) on XLA's CPU backend.

XLA:CPU's own convolution kernels (Eigen, YNNPACK) reach half to three quarters of oneDNN's
speed on the U-Net's 16-256-channel 3x3 convolutions, and its kernel gradients are slower still
(README, Benchmarks). `conv_general_dilated` here has `jax.lax.conv_general_dilated`'s
signature and values; float32 NHWC/HWIO convolutions without feature groups or input dilation
run on the CPU as three XLA FFI custom calls into oneDNN (`onednn_conv.cc`): the forward pass,
the input gradient and the kernel gradient (a `jax.custom_vjp`). Other backends, dtypes and
layouts go to `jax.lax` unchanged, chosen at trace time by `jax.lax.platform_dependent`.
A call whose batch divides among XLA's CPU threads (one per core) runs as one single-threaded
oneDNN call per thread, on XLA's own thread pool, the kernel gradient summed over them; others
run whole on oneDNN's OpenMP threads (`onednn_conv.cc` says why).

oneDNN comes from PyPI, a dependency of segjax on Linux x86-64 (`onednn-cpu-gomp`, its headers
in `onednn-devel-cpu-gomp`); the handlers are compiled with the system's C++ compiler on first
use into `$SEGJAX_CACHE_DIR` (default `~/.cache/segjax`), once per source, jax and oneDNN
version. `load()` raises `OnednnUnavailable`, saying what is missing, when that cannot be done.
Which models use it: `segjax.layers.conv.cpu_convolutions`, a run's `config.cpu_convolutions`.
"""

import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
# Compiled into the same library: BatchNorm + ReLU (segjax/layers/batch_norm.py), and the
# splitting of a call's work over XLA's threads that both use.
OTHER_SOURCES = tuple(pathlib.Path(__file__).with_name(n) for n in ("batch_norm_relu.cc",))
HEADERS = tuple(pathlib.Path(__file__).with_name(n) for n in ("parts.h",))
LIBRARY_DIST = "onednn-cpu-gomp"
HEADERS_DIST = "onednn-devel-cpu-gomp"
ONEDNN_VERSION = "2023.2.0"  # pyproject.toml's; oneDNN 3.2.
_TARGETS = {
  "forward": "SegjaxOnednnConvForward",
  "input_grad": "SegjaxOnednnConvInputGrad",
  "kernel_grad": "SegjaxOnednnConvKernelGrad",
}
_OTHER_TARGETS = {
  "segjax_batch_norm_relu_forward": "SegjaxBatchNormReluForward",
  "segjax_batch_norm_relu_backward": "SegjaxBatchNormReluBackward",
}
_NHWC = ("NHWC", "HWIO", "NHWC")
_lock = threading.Lock()
_loaded = False
_failure: Exception | None = None  # Why load() failed: it is not retried in this process.


class OnednnUnavailable(RuntimeError):
  """oneDNN's convolutions cannot be built or loaded here; the message says why."""


def _dist_file(dist: str, suffix: str) -> pathlib.Path:
  try:
    files = importlib.metadata.distribution(dist).files or ()
  except importlib.metadata.PackageNotFoundError as e:
    raise OnednnUnavailable(
      f"the Python package {dist!r} is not installed (segjax installs it on Linux x86-64: "
      f"pip install {LIBRARY_DIST}=={ONEDNN_VERSION} {HEADERS_DIST}=={ONEDNN_VERSION})"
    ) from e
  for f in files:
    if ("/" + str(f)).endswith(suffix):
      return pathlib.Path(f.locate()).resolve()
  raise OnednnUnavailable(f"{dist!r} has no file ending in {suffix!r}")


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("SEGJAX_CACHE_DIR", "~/.cache/segjax")).expanduser()


def build() -> pathlib.Path:
  """Compiles `onednn_conv.cc` into the cache (once) and returns the shared library's path."""
  header = _dist_file(HEADERS_DIST, "oneapi/dnnl/dnnl.hpp")
  library = _dist_file(LIBRARY_DIST, "/libdnnl.so")
  include_dir = header.parent.parent.parent
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if compiler is None:
    raise OnednnUnavailable("no C++ compiler found (set CXX or install g++)")
  key = hashlib.sha256(
    b"\0".join(
      str(part).encode()
      for part in (
        *(f.read_bytes() for f in (SOURCE, *OTHER_SOURCES, *HEADERS)),
        jax.__version__,
        importlib.metadata.version(LIBRARY_DIST),
        library,
        compiler,
        jax.ffi.include_dir(),
      )
    )
  ).hexdigest()[:16]
  target = cache_dir() / f"onednn_conv-{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    partial = pathlib.Path(tmp) / target.name
    command = [
      compiler, "-O3", "-std=c++17", "-shared", "-fPIC", str(SOURCE), *map(str, OTHER_SOURCES),
      "-o", str(partial),
      f"-I{jax.ffi.include_dir()}", f"-I{include_dir}", str(library),
      f"-Wl,-rpath,{library.parent}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
      raise OnednnUnavailable(f"compiling {SOURCE} failed:\n{' '.join(command)}\n{done.stderr}")
    os.replace(partial, target)  # Whole or absent: another process may be loading it.
  return target


def load() -> None:
  """Builds (once) and registers the FFI targets with XLA's CPU backend; raises
  `OnednnUnavailable` saying why it cannot (the same error again on later calls)."""
  global _loaded, _failure
  with _lock:
    if _loaded:
      return
    if _failure is not None:
      raise OnednnUnavailable(str(_failure))
    import ctypes

    try:
      path = build()
      try:
        library = ctypes.cdll.LoadLibrary(str(path))
      except OSError as e:
        raise OnednnUnavailable(f"loading {path} failed: {e}") from e
    except OnednnUnavailable as e:
      _failure = e
      raise
    targets = {f"segjax_onednn_conv_{name}": symbol for name, symbol in _TARGETS.items()}
    for name, symbol in {**targets, **_OTHER_TARGETS}.items():
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    _loaded = True


def available() -> bool:
  try:
    load()
  except OnednnUnavailable:
    return False
  return True


def _call(name: str, out: jax.ShapeDtypeStruct, a: Array, b: Array, strides, padding, dilation):
  return jax.ffi.ffi_call(f"segjax_onednn_conv_{name}", out, vmap_method="sequential")(
    a,
    b,
    strides=np.asarray(strides, np.int64),
    padding=np.asarray(padding, np.int64).reshape(-1),
    dilation=np.asarray(dilation, np.int64),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x: Array, kernel: Array, strides, padding, dilation) -> Array:
  out = jax.eval_shape(
    lambda x, k: lax.conv_general_dilated(
      x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=_NHWC
    ),
    x,
    kernel,
  )
  return _call("forward", out, x, kernel, strides, padding, dilation)


def _conv_fwd(x, kernel, strides, padding, dilation):
  return _conv(x, kernel, strides, padding, dilation), (x, kernel)


def _conv_bwd(strides, padding, dilation, residuals, g):
  x, kernel = residuals
  shape = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  dx = _call("input_grad", shape(x), g, kernel, strides, padding, dilation)
  dk = _call("kernel_grad", shape(kernel), x, g, strides, padding, dilation)
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def is_nhwc(dimension_numbers, ndim: int) -> bool:
  """Whether `lax.conv_general_dilated`'s `dimension_numbers` are 2-D NHWC / HWIO / NHWC."""
  if ndim != 4 or dimension_numbers is None:  # lax's default is NCHW / OIHW.
    return False
  as_numbers = lambda d: lax.conv_dimension_numbers((1,) * 4, (1,) * 4, d)
  return as_numbers(dimension_numbers) == as_numbers(_NHWC)


def _runs_on_onednn(lhs, rhs, lhs_dilation, dimension_numbers, groups, preferred) -> bool:
  return (
    is_nhwc(dimension_numbers, lhs.ndim)
    and lhs.dtype == rhs.dtype == jnp.float32
    and groups == (1, 1)
    and all(d == 1 for d in (lhs_dilation or (1, 1)))
    and preferred in (None, jnp.float32)
  )


def conv_general_dilated(
  lhs: Array,
  rhs: Array,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision=None,
  preferred_element_type=None,
) -> Array:
  """`jax.lax.conv_general_dilated`, by oneDNN on the CPU where it applies (module docstring).

  Requires `load()` to have run when it applies; `precision` is ignored there (oneDNN computes
  float32 products in float32).
  """
  reference = functools.partial(
    lax.conv_general_dilated,
    window_strides=window_strides,
    padding=padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  groups = (feature_group_count, batch_group_count)
  if not _runs_on_onednn(lhs, rhs, lhs_dilation, dimension_numbers, groups, preferred_element_type):
    return reference(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  dilation = tuple(int(d) for d in rhs_dilation or (1, 1))
  if isinstance(padding, str):
    dilated = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation, strict=True)]
    padding = lax.padtype_to_pads(lhs.shape[1:3], dilated, strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if any(p < 0 for pair in pads for p in pair) or 0 in lhs.shape + rhs.shape:
    return reference(lhs, rhs)  # Cropping and empty arrays: oneDNN takes neither.
  onednn = lambda x, k: _conv(x, k, strides, pads, dilation)
  return lax.platform_dependent(lhs, rhs, cpu=onednn, default=reference)
