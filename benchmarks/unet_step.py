"""The U-Net step against candidate rewrites of its slow parts, interleaved in one process.

  python benchmarks/unet_step.py                  # all candidates, 5 rounds (10-15 min, 2 cores)
  python benchmarks/unet_step.py --only previous_pool,previous_bn --rounds 7
  python benchmarks/unet_step.py --check          # numerics of each candidate against current

The U-Net of configs/unet_shapes.py at batch 8, 128x128 (`benchmarks/vs_pytorch.py --only
unet`'s setup): the real train step (forward, backward, AdamW, batch statistics), the
evaluation step (logits, confusion matrix, top-5 counts) and the forward pass alone with its
argmax (what PyTorch's inference row times). Each candidate is compiled with segjax's modules
patched at trace time (their `nn` namespace, `semantic.eval_counts`); a round times every
candidate in turn (A B A B ...), and medians over the rounds are printed with their ratio to
"current" and the load average. With `--check` each candidate's logits, loss, parameter
gradients and batch statistics are compared with the current code's on the same parameters,
for normal inputs and for inputs rounded to integers (ties in every max-pool window).

Candidates (from a profile of the train step: kernel gradients of the 3x3 convs 21 %, max pool
15 %, BatchNorm 15 %; of the evaluation step: `lax.top_k` 23 %). "current" has the four that
were adopted; the "previous_" candidates put back what they replaced, so their ratio is the
gain:
  previous_ynn   XLA:CPU's default YNNPACK fusions of convolutions and dots (current: the
             config's `compiler_options`, Eigen's kernels; segjax/train/xla_options.py).
  previous_concat  the decoder's first conv as a conv per part (the upsampled features, the
             skip), summed, under oneDNN too (current: there, one conv on their concatenation;
             segjax/layers/concat_conv.py).
  previous_pool  flax's reduce_window max pool, whose JVP materialises index iotas of the
             input's size (current: segjax/layers/pool.py, reshape + max, the same gradient).
  previous_topk  evaluation's top-5 membership by `lax.top_k`, a sort (current: counting the
             higher-ranked classes, `semantic.in_top_k`).
  previous_bn  flax's BatchNorm (current: segjax/layers/batch_norm.py, its sums over the
             batch as matrix-vector products, forward and backward).
  previous_bn_relu  the ConvBlocks' BatchNorm and ReLU in XLA (current: fused, one FFI call
             forward and one backward, segjax/kernels/batch_norm_relu.py).
  xla_xnn_greedy  every step compiled with XLA:CPU's XNNPACK graph fusion (greedy).
  previous_upconv  the 2x up-convolutions as XLA's matrix product under oneDNN too (current:
             oneDNN's 1x1 convolution to 4x the channels, segjax/layers/upconv.py).
  onednn     `config.cpu_convolutions = "onednn"`: every convolution (forward, input and kernel
             gradients) by oneDNN through XLA's FFI (segjax/kernels/onednn_conv.py).
  kgrad_taps / kgrad_im2col   3x3 conv kernel gradients as nine matmuls per conv (segjax/layers/
             conv.py's) / as one im2col matmul, for every conv of 16 or more channels.
"""

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
import types

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

BATCH, SIZE = 8, 128
# Modules whose `nn` namespace the candidates patch; whichever of them exist.
PATCHED_MODULES = ("segjax.models.unet", "segjax.layers.conv_blocks", "segjax.layers.norms")

# ---------------------------------------------------------------------------------------------
# Candidates


def previous_max_pool_2x2(x):
  """The U-Net's pooling before `segjax.layers.pool`: flax's `reduce_window` max pool."""
  return nn.max_pool(x, (2, 2), strides=(2, 2))


_NHWC = ("NHWC", "HWIO", "NHWC")


def _kernel_grad_im2col(x, g, kernel_shape, strides, padding):
  """`(KH, KW, C, O)` kernel gradient as one `(O, N) @ (N, KH*KW*C)` product."""
  kh, kw, c, o = kernel_shape
  b, ho, wo, _ = g.shape
  sy, sx = strides
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  windows = [
    lax.slice(
      xp, (0, i, j, 0), (b, i + (ho - 1) * sy + 1, j + (wo - 1) * sx + 1, c), (1, sy, sx, 1)
    )
    for i in range(kh)
    for j in range(kw)
  ]
  patches = jnp.concatenate(windows, axis=-1)
  dk = lax.dot_general(
    g, patches, (((0, 1, 2), (0, 1, 2)), ((), ())), preferred_element_type=jnp.float32
  )
  return dk.reshape(o, kh, kw, c).transpose(1, 2, 3, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, kernel, strides, padding, precision, method):
  return lax.conv_general_dilated(
    x, kernel, strides, padding, dimension_numbers=_NHWC, precision=precision
  )


def _conv_fwd(x, kernel, strides, padding, precision, method):
  return _conv(x, kernel, strides, padding, precision, method), (x, kernel)


def _conv_bwd(strides, padding, precision, method, residuals, g):
  from segjax.layers import conv as conv_lib

  x, kernel = residuals

  def conv(x):
    return lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=_NHWC, precision=precision
    )

  dx = jax.vjp(conv, x)[1](g)[0]
  grad = _kernel_grad_im2col if method == "im2col" else conv_lib._kernel_grad_by_taps
  return dx, grad(x, g, kernel.shape, strides, padding).astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_with_kernel_grad(method: str, min_channels: int = 16):
  """`nn.Conv` whose 2-D NHWC convolutions of >= `min_channels` channels (in and out, kernel
  larger than 1x1) take their kernel gradient by `method` ("taps" or "im2col")."""

  def conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs):
    plain = (
      lhs.ndim == 4
      and not args
      and kwargs.get("dimension_numbers") is not None
      and kwargs.get("feature_group_count", 1) == 1
      and all(d == 1 for d in kwargs.get("lhs_dilation") or ())
      and all(d == 1 for d in kwargs.get("rhs_dilation") or ())
      and kwargs.get("batch_group_count", 1) == 1
      and kwargs.get("preferred_element_type") is None
    )
    if not plain or rhs.shape[:2] == (1, 1) or min(rhs.shape[2:]) < min_channels:
      return lax.conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs)
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, tuple(window_strides), padding, kwargs.get("precision"), method)

  return functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def previous_in_top_k(scores, labels, k):
  """Top-k membership before `segjax.train.semantic.in_top_k`: by `lax.top_k` (a sort)."""
  top = lax.top_k(scores, min(k, scores.shape[-1]))[1]
  return (top == labels[..., None]).any(-1)


def previous_upconv2x(x, kernel, bias=None):
  """The 2x up-convolution before oneDNN: XLA's matrix product (one einsum), always."""
  *lead, h, w, _ = x.shape
  y = jnp.einsum("...hwc,abco->...hawbo", x, kernel[::-1, ::-1])
  y = y.reshape(*lead, 2 * h, 2 * w, kernel.shape[-1])
  return y if bias is None else y + bias


# name -> (nn overrides, {module: {attribute: override}})
PREVIOUS_POOL = {"segjax.layers.pool": {"max_pool_2x2": previous_max_pool_2x2}}
PREVIOUS_TOPK = {"segjax.train.semantic": {"in_top_k": previous_in_top_k}}
PREVIOUS_CONCAT = {"segjax.layers.concat_conv": {"onednn_selected": lambda: False}}
PREVIOUS_BN = {"segjax.layers.norms": {"BatchNorm": nn.BatchNorm}}
# ConvBlock fuses ReLU into the BatchNorms it recognises: none.
PREVIOUS_BN_RELU = {"segjax.layers.conv_blocks": {"BatchNorm": type("NoBatchNorm", (), {})}}
KGRAD_TAPS, KGRAD_IM2COL = (
  {m: {"PlainConv": conv_with_kernel_grad(method)} for m in PATCHED_MODULES[:2]}
  for method in ("taps", "im2col")
)
# XLA:CPU options (jaxlib 0.10's names), merged over the config's.
XNN_GREEDY = {
  "timing": {
    "COMPILER_OPTIONS": {
      "xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"
    }
  }
}


def _without_compiler_options(config):
  del config["compiler_options"]


# name -> edit of the config the candidate builds its steps from.
def _onednn(config):
  config.cpu_convolutions = "onednn"


CONFIG_EDITS = {"previous_ynn": _without_compiler_options, "onednn": _onednn}
CANDIDATES = {
  "current": ({}, {}),
  "xla_xnn_greedy": ({}, XNN_GREEDY),
  "previous_ynn": ({}, {}),
  "previous_pool": ({}, PREVIOUS_POOL),
  "previous_topk": ({}, PREVIOUS_TOPK),
  "previous_concat": ({}, PREVIOUS_CONCAT),
  "previous_bn": ({}, PREVIOUS_BN),
  "previous_bn_relu": ({}, PREVIOUS_BN_RELU),
  "onednn": ({}, {}),
  "previous_upconv": ({}, {"segjax.layers.upconv": {"upconv2x": previous_upconv2x}}),
  "kgrad_taps": ({}, KGRAD_TAPS),
  "kgrad_im2col": ({}, KGRAD_IM2COL),
}


@contextlib.contextmanager
def patched(name: str):
  """segjax's modules with candidate `name`'s overrides, while tracing."""
  import importlib

  nn_overrides, attribute_overrides = CANDIDATES[name]
  saved = []
  for module_name in PATCHED_MODULES:
    try:
      module = importlib.import_module(module_name)
    except ImportError:
      continue
    if getattr(module, "nn", None) is nn:
      proxy = types.SimpleNamespace(**{k: getattr(nn, k) for k in dir(nn)})
      proxy.__dict__.update(nn_overrides)
      saved.append((module, "nn", nn))
      module.nn = proxy
  for module_name, overrides in attribute_overrides.items():
    module = importlib.import_module(module_name)
    for key, value in overrides.items():
      saved.append((module, key, getattr(module, key)))
      setattr(module, key, value)
  try:
    yield
  finally:
    for module, key, value in reversed(saved):
      setattr(module, key, value)


# ---------------------------------------------------------------------------------------------
# Timing and checks


def _config():
  from configs import unet_shapes

  config = unet_shapes.get_config()
  config.batch_size, config.image_size = BATCH, (SIZE, SIZE)
  return config


def build_calls(name: str) -> dict:
  """{"train", "eval", "forward"}: blocking calls of candidate `name`'s compiled steps."""
  from unet_throughput import unet_steps

  config = _config()
  CONFIG_EDITS.get(name, lambda config: None)(config)
  with patched(name):
    calls, _ = unet_steps(config)
  return calls


def _load() -> str:
  return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def time_candidates(names, rounds: int, steps: int) -> None:
  calls = {}
  for name in names:
    start = time.perf_counter()
    calls[name] = build_calls(name)
    print(f"  built {name} in {time.perf_counter() - start:.1f} s ({_load()})", flush=True)
  kinds = ("train", "eval", "forward")
  for name in names:  # Warm up.
    for kind in kinds:
      calls[name][kind]()
  print(f"timing: {rounds} rounds x {steps} calls, interleaved ({_load()} before)", flush=True)
  times = {(n, k): [] for n in names for k in kinds}
  for _ in range(rounds):
    for kind in kinds:
      for name in names:
        start = time.perf_counter()
        for _ in range(steps):
          calls[name][kind]()
        times[name, kind].append((time.perf_counter() - start) / steps)
  for kind in kinds:
    reference = statistics.median(times["current", kind])
    for name in names:
      t = times[name, kind]
      median = statistics.median(t)
      print(
        f"  {kind:8s} {name:14s} {1e3 * median:8.1f} ms  (rounds {1e3 * min(t):.0f}-"
        f"{1e3 * max(t):.0f})  current/candidate {reference / median:5.2f}x",
        flush=True,
      )
  print(f"({_load()} after)", flush=True)


def _outputs(name: str, variables: dict, x, mask):
  """Logits (train, eval), loss, parameter gradients and new batch stats of candidate `name`."""
  from segjax.models import build_model
  from segjax.train import semantic, xla_options

  config = _config()
  CONFIG_EDITS.get(name, lambda config: None)(config)
  jit = lambda fn: xla_options.jit(fn, config)  # The candidate's compiler options and convs.
  with patched(name):
    model = build_model(config)
    tree = jax.tree.map(jnp.shape, model.init(jax.random.key(0), x[:1], train=False))

    def loss(params):
      v = {"params": params, "batch_stats": variables["batch_stats"]}
      batch = {"image": x, "mask": mask}
      out, (_, updates) = semantic.loss_fn(v, batch, None, model=model, train=True)
      return out, updates

    (value, updates), grads = jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    train_logits = jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables)[
      0
    ][0]
    eval_logits = jit(lambda v: model.apply(v, x, train=False))(variables)[0]
    batch = {"image": x, "mask": mask, "example_mask": jnp.ones((x.shape[0],), bool)}
    counts = jit(
      lambda v: semantic.eval_step(v, batch, model=model, num_classes=config.model.num_classes)
    )(variables)
  return tree, {
    "train logits": train_logits,
    "eval logits": eval_logits,
    "loss": value,
    "grads": grads,
    "batch_stats": updates["batch_stats"],
    "eval counts": counts,
  }


def check(names) -> None:
  from segjax.models import build_model

  config = _config()
  rng = np.random.default_rng(0)
  b, s = 4, 64
  normal = rng.normal(size=(b, s, s, 3)).astype(np.float32)
  inputs = {"normal": normal, "integer (ties)": np.round(normal)}
  mask = jnp.asarray(rng.integers(0, config.model.num_classes, (b, s, s)), jnp.int32)
  model = build_model(config)
  variables = model.init(jax.random.key(0), jnp.asarray(normal), train=False)
  # Non-trivial running statistics, so that inference differs from training.
  variables = jax.tree.map(lambda v: v, variables)
  variables["batch_stats"] = jax.tree.map(
    lambda v: v + 0.1 * jnp.abs(jnp.asarray(rng.normal(size=v.shape), v.dtype)),
    variables["batch_stats"],
  )
  for label, x in inputs.items():
    x = jnp.asarray(x)
    tree0, reference = _outputs("current", variables, x, mask)
    for name in names:
      if name == "current":
        continue
      tree, out = _outputs(name, variables, x, mask)
      if tree != tree0:
        raise AssertionError(f"{name}: variable tree differs from the current one.")
      parts = []
      for key, ref in reference.items():
        a = np.concatenate([np.ravel(v) for v in jax.tree.leaves(out[key])]).astype(np.float64)
        r = np.concatenate([np.ravel(v) for v in jax.tree.leaves(ref)]).astype(np.float64)
        diff = np.abs(a - r).max()
        parts.append(f"{key} {diff:.1e} ({diff / max(np.abs(r).max(), 1e-30):.1e} rel)")
      print(f"  {label:15s} {name:13s} max |diff|: " + ", ".join(parts), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", default="", help="Comma-separated candidates (current added).")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=2, help="Calls per candidate per round.")
  parser.add_argument("--check", action="store_true", help="Compare numerics instead of timing.")
  args = parser.parse_args()
  names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CANDIDATES)
  unknown = sorted(set(names) - set(CANDIDATES))
  if unknown:
    parser.error(f"--only: unknown candidate(s) {unknown}; choose from {sorted(CANDIDATES)}.")
  names = ["current"] + [n for n in names if n != "current"]
  from segjax.train import host_memory

  reused = host_memory.reuse_memory_between_runs()  # As train.py runs its steps.
  print(
    f"U-Net step candidates on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
    f"reuse_cpu_memory {reused}; {_load()}"
  )
  if args.check:
    check(names)
  else:
    time_candidates(names, args.rounds, args.steps)


if __name__ == "__main__":
  main()
