"""2-D convolution whose kernel gradient is a sum of matmuls on the CPU backend.

XLA's CPU backend lowers a convolution's kernel gradient to a convolution with a huge window
(the output-gradient map) that runs several times slower than the forward pass when channels
are wide: for the RPN head's 3x3 conv, 256 -> 256 on 2 x 128 x 128, 2.8 s against 0.9 s for
the same gradient as nine `(O, N) @ (N, C)` matrix products, one per kernel tap; at 64
channels (8 x 128 x 128) XLA's was the faster, 0.8 s against 1.1 s (both on a 2-core CPU
under load; `benchmarks/vs_pytorch.py --only conv --compare_kernel_grad` times them in place).
`conv_general_dilated` here computes the same values as `jax.lax.conv_general_dilated`: the
forward pass is XLA's own; the input gradient at stride 1 is the convolution of the output
gradient with the flipped kernel in HWIO order (`jax.vjp`'s swaps the kernel's channel
dimensions instead, which XLA:CPU compiles to a slow loop inside a `lax.switch` branch or a
loop body: 3x the mask head's gradient time), XLA's own at other strides; the kernel gradient is

    dK[i, j] = sum over (b, y, x) of  x_padded[b, s*y + i, s*x + j, :]^T  g[b, y, x, :]

(one strided slice and one `dot_general` per tap `(i, j)`), on CPU only and only for
convolutions at least `MIN_MATMUL_CHANNELS` wide in and out (narrower ones, e.g. a 3-channel
stem, are faster as XLA's convolution); other backends keep XLA's gradient, chosen at trace time
by `jax.lax.platform_dependent`. Dilations and feature groups go to `jax.lax` unchanged.

`Conv` is `flax.linen.Conv` using it: the same module with the same parameters ("kernel"
`(KH, KW, C, O)`, "bias"), so checkpoints and the torchvision import are unaffected;
`PlainConv` is `flax.linen.Conv` with XLA's gradients. Traced under `cpu_convolutions("onednn")`
(a run's steps: `segjax.train.xla_options.cpu_convolutions`), both run their convolutions by
oneDNN instead (`segjax/kernels/onednn_conv.py`), as every segjax model's convolutions do.
"""

import contextlib
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from segjax.kernels import onednn_conv

Array = jax.Array

# Below this many input or output channels XLA's own kernel gradient is as fast or faster.
MIN_MATMUL_CHANNELS = 128
# Flip to False to measure or debug with XLA's kernel gradient everywhere.
USE_MATMUL_KERNEL_GRAD = True

_NHWC = ("NHWC", "HWIO", "NHWC")


def _kernel_grad_by_taps(x: Array, g: Array, kernel_shape, strides, padding) -> Array:
  """`(KH, KW, C, O)` kernel gradient of a NHWC conv: one strided slice and matmul per tap.

  The taps run one after the other in a loop, so one slice of the input is alive at a time:
  unrolled, XLA's CPU scheduler kept every tap's slice alive at once, and a Mask R-CNN R50-FPN
  train step (batch 2, 512x512) needed 4.4 GB of buffers instead of 2.4 (the mask head's four
  3x3 convs on 256 ROIs: 49 MB per slice).
  """
  kh, kw, c, o = kernel_shape
  b, ho, wo, _ = g.shape
  sy, sx = strides
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  span = (b, (ho - 1) * sy + 1, (wo - 1) * sx + 1, c)

  def tap(t, taps):
    i, j = t // kw, t % kw
    window = lax.dynamic_slice(xp, (0, i, j, 0), span)
    if (sy, sx) != (1, 1):
      window = lax.slice(window, (0, 0, 0, 0), span, (1, sy, sx, 1))
    # (O, C): the output gradient as the left operand is the faster orientation on CPU.
    grad = lax.dot_general(
      g, window, (((0, 1, 2), (0, 1, 2)), ((), ())), preferred_element_type=jnp.float32
    )
    return lax.dynamic_update_index_in_dim(taps, grad, t, 0)

  taps = lax.fori_loop(0, kh * kw, tap, jnp.zeros((kh * kw, o, c), jnp.float32))
  return taps.reshape(kh, kw, o, c).transpose(0, 1, 3, 2)


def _input_grad(conv, x, g, kernel, strides, padding, precision) -> Array:
  """The input gradient of `conv(x, kernel)`. At stride 1, a convolution of `g` with the
  flipped kernel, its in and out channels swapped into HWIO order, as a layout XLA:CPU runs
  with its fast kernels everywhere (`jax.vjp`'s transposed kernel dimensions are slow inside a
  `lax.switch` branch or a loop body)."""
  kh, kw = kernel.shape[:2]
  if tuple(strides) != (1, 1) or not all(
    0 <= lo < k and 0 <= hi < k for (lo, hi), k in zip(padding, (kh, kw), strict=True)
  ):
    _, input_vjp = jax.vjp(lambda x: conv(x, kernel), x)
    return input_vjp(g)[0]
  flipped = jnp.swapaxes(jnp.flip(kernel, (0, 1)), 2, 3)
  pads = tuple((k - 1 - lo, k - 1 - hi) for (lo, hi), k in zip(padding, (kh, kw), strict=True))
  return lax.conv_general_dilated(
    g, flipped, (1, 1), pads, dimension_numbers=_NHWC, precision=precision
  ).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_nhwc(x: Array, kernel: Array, strides, padding, precision) -> Array:
  return lax.conv_general_dilated(
    x, kernel, strides, padding, dimension_numbers=_NHWC, precision=precision
  )


def _conv_nhwc_fwd(x, kernel, strides, padding, precision):
  return _conv_nhwc(x, kernel, strides, padding, precision), (x, kernel)


def _conv_nhwc_bwd(strides, padding, precision, residuals, g):
  x, kernel = residuals
  conv = lambda x, k: lax.conv_general_dilated(
    x, k, strides, padding, dimension_numbers=_NHWC, precision=precision
  )
  dx = _input_grad(conv, x, g, kernel, strides, padding, precision)

  def xla_kernel_grad(x, g):
    _, kernel_vjp = jax.vjp(lambda k: conv(x, k), kernel)
    return kernel_vjp(g)[0]

  def matmul_kernel_grad(x, g):
    return _kernel_grad_by_taps(x, g, kernel.shape, strides, padding).astype(kernel.dtype)

  dk = lax.platform_dependent(x, g, cpu=matmul_kernel_grad, default=xla_kernel_grad)
  return dx, dk


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


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
  """`jax.lax.conv_general_dilated` with the CPU kernel gradient of the module docstring.

  Takes the fast path for NHWC / HWIO 2-D convolutions without dilation or groups whose input
  and output have at least `MIN_MATMUL_CHANNELS` channels; everything else is `lax`'s.
  """
  ones = (1,) * (lhs.ndim - 2)
  plain = (
    onednn_conv.is_nhwc(dimension_numbers, lhs.ndim)
    and tuple(lhs_dilation or ones) == ones
    and tuple(rhs_dilation or ones) == ones
    and feature_group_count == 1
    and batch_group_count == 1
    and preferred_element_type is None
  )
  if not (
    USE_MATMUL_KERNEL_GRAD and plain and min(rhs.shape[2], rhs.shape[3]) >= MIN_MATMUL_CHANNELS
  ):
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv_nhwc(lhs, rhs, tuple(window_strides), padding, precision)


# ---------------------------------------------------------------------------------------------
# Which convolutions run on the CPU: XLA's ("xla") or oneDNN's ("onednn", segjax/kernels/
# onednn_conv.py), chosen while a step is traced (`traced_with`), as `config.cpu_convolutions`.

CPU_CONVOLUTIONS = ("xla", "onednn")
_cpu_convolutions = "xla"


@contextlib.contextmanager
def cpu_convolutions(name: str):
  """Convolutions traced inside the block run on the CPU by `name` (one of CPU_CONVOLUTIONS);
  "onednn" builds and loads oneDNN's first (`onednn_conv.OnednnUnavailable` if it cannot)."""
  global _cpu_convolutions
  if name not in CPU_CONVOLUTIONS:
    raise ValueError(f"cpu_convolutions: {name!r} is not one of {CPU_CONVOLUTIONS}.")
  if name == "onednn":
    onednn_conv.load()
  saved, _cpu_convolutions = _cpu_convolutions, name
  try:
    yield
  finally:
    _cpu_convolutions = saved


def onednn_selected() -> bool:
  """Whether convolutions traced now run by oneDNN (inside `cpu_convolutions("onednn")`)."""
  return _cpu_convolutions == "onednn"


def traced_with(name: str, fn: Callable) -> Callable:
  """`fn`, whose convolutions run on the CPU by `name` when it is traced (e.g. by jax.jit)."""
  if name == "xla":
    return fn

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with cpu_convolutions(name):
      return fn(*args, **kwargs)

  return traced


def selected(conv_fn: Callable) -> Callable:
  """`conv_fn` (`lax.conv_general_dilated`'s signature), or oneDNN's where it applies when the
  convolutions are traced under `cpu_convolutions("onednn")`."""

  @functools.wraps(conv_fn)
  def conv(*args, **kwargs):
    if onednn_selected():
      return onednn_conv.conv_general_dilated(*args, **kwargs)
    return conv_fn(*args, **kwargs)

  return conv


Conv = functools.partial(nn.Conv, conv_general_dilated=selected(conv_general_dilated))
Conv.__doc__ = (
  "`flax.linen.Conv` with `conv_general_dilated`'s CPU kernel gradient (or oneDNN's, selected)."
)
PlainConv = functools.partial(nn.Conv, conv_general_dilated=selected(lax.conv_general_dilated))
PlainConv.__doc__ = "`flax.linen.Conv` with XLA's convolutions (or oneDNN's, selected)."
