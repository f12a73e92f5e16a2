"""Times the detection ops at Mask R-CNN scale: ROIAlign pooler, NMS, anchor matching.

  python benchmarks/ops.py [--repeats 5]

Prints, per case, the compile time (lower + compile) and the median of `repeats` runs of the
compiled function. Shapes follow detectron2's COCO setting: an 800 x 1344 (padded) image,
FPN P2-P5 with 256 channels, 512 ROIs, 267k anchors, 1000 or 5000 boxes into NMS. Where an
op has a previous implementation still selectable (ROIAlign's "pairs" layout, the serial NMS),
both run interleaved (A B A B ...) and the ratio to the previous one is printed, with the load.
"""

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from segjax import ops

IMAGE = (800, 1344)


def measure(name, fn, *args, repeats):
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  print(
    f"{name:<58} compile {compile_s:7.2f} s   median {np.median(times) * 1e3:9.1f} ms", flush=True
  )


def measure_ab(name, fns, *args, repeats):
  """Compiles each of `fns` (a dict, the previous implementation first), then times them
  interleaved; prints medians and each one's ratio to the first."""
  compiled, compile_s = {}, {}
  for key, fn in fns.items():
    start = time.perf_counter()
    compiled[key] = jax.jit(fn).lower(*args).compile()
    compile_s[key] = time.perf_counter() - start
    jax.block_until_ready(compiled[key](*args))  # warm-up
  times = {key: [] for key in fns}
  for _ in range(repeats):
    for key in fns:
      start = time.perf_counter()
      jax.block_until_ready(compiled[key](*args))
      times[key].append(time.perf_counter() - start)
  first = np.median(next(iter(times.values())))
  print(f"{name} (load {os.getloadavg()[0]:.1f})", flush=True)
  for key in fns:
    median = np.median(times[key])
    print(
      f"  {key:<56} compile {compile_s[key]:7.2f} s   median {median * 1e3:9.1f} ms"
      f"   x{median / first:.2f}",
      flush=True,
    )


def random_boxes(rng, n, min_size, max_size):
  wh = rng.uniform(min_size, max_size, (n, 2))
  xy = rng.uniform(0, 1, (n, 2)) * (np.array(IMAGE[::-1]) - wh)
  return jnp.asarray(np.concatenate([xy, xy + wh], 1), jnp.float32)


def bench_roi_align(rng, repeats):
  maps = [
    jnp.asarray(rng.normal(size=(IMAGE[0] >> l, IMAGE[1] >> l, 256)), jnp.float32)
    for l in range(2, 6)
  ]
  # Sizes spread over all four levels (32 to 700 pixels).
  rois = random_boxes(rng, 512, 32, 700)
  levels = np.bincount(np.asarray(ops.assign_boxes_to_levels(rois)), minlength=6)[2:]
  print(f"ROIAlign: 512 ROIs over P2-P5 (ROIs per level {levels.tolist()}), 256 channels")
  for size in ((7, 7), (14, 14)):
    pool = lambda f, b, size=size, sr=2: ops.multilevel_roi_align(f, b, size, sr)
    measure(f"  multilevel_roi_align {size} sampling_ratio=2", pool, maps, rois, repeats=repeats)
    layouts = {
      f"adaptive_layout={layout!r}": lambda f, b, size=size, layout=layout: (
        ops.multilevel_roi_align(f, b, size, 0, adaptive_layout=layout)
      )
      for layout in ("pairs", "window")
    }
    measure_ab(f"  multilevel_roi_align {size} adaptive", layouts, maps, rois, repeats=repeats)
  grads = {
    f"adaptive_layout={layout!r}": jax.grad(
      lambda f, b, layout=layout: jnp.sum(
        ops.multilevel_roi_align(f, b, (7, 7), 0, adaptive_layout=layout) ** 2
      )
    )
    for layout in ("pairs", "window")
  }
  measure_ab(
    "  gradient wrt features, (7, 7) adaptive", grads, maps, rois, repeats=max(1, repeats // 2)
  )


def bench_nms(rng, repeats):
  for n in (1000, 5000):
    # Clustered boxes, as from an RPN: heavy overlap within clusters.
    centres = rng.uniform(0, 1, (n // 20, 2)) * np.array(IMAGE[::-1])
    c = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 12, (n, 2))
    wh = rng.uniform(20, 200, (n, 2))
    boxes = jnp.asarray(np.concatenate([c - wh / 2, c + wh / 2], 1), jnp.float32)
    scores = jnp.asarray(rng.uniform(size=n), jnp.float32)
    classes = jnp.asarray(rng.integers(0, 80, n), jnp.int32)
    kept = int(ops.nms(boxes, scores, 0.7, 1000)[1].sum())
    algorithms = lambda fn: {
      f"block_size={b}{' (serial)' if b == 0 else ''}": functools.partial(fn, block_size=b)
      for b in (0, 256)
    }
    measure_ab(
      f"NMS {n} boxes, IoU 0.7, max_output 1000 ({kept} kept)",
      algorithms(lambda b, s, block_size: ops.nms(b, s, 0.7, 1000, block_size=block_size)),
      boxes,
      scores,
      repeats=repeats,
    )
    measure_ab(
      f"batched_nms {n} boxes, 80 classes, IoU 0.5, max_output 100",
      algorithms(
        lambda b, s, c, block_size: ops.batched_nms(b, s, c, 0.5, 100, block_size=block_size)
      ),
      boxes,
      scores,
      classes,
      repeats=repeats,
    )


def bench_matching(rng, repeats):
  anchors = jnp.asarray(ops.image_anchors(IMAGE))
  gt = random_boxes(rng, 100, 16, 400)
  valid = jnp.arange(100) < 20  # 20 objects, padded to 100

  def rpn_targets(gt, valid, key):
    idx, labels = ops.match_boxes(
      gt, anchors, valid, thresholds=(0.3, 0.7), labels=(0, -1, 1), allow_low_quality_matches=True
    )
    sample, ok = ops.sample_balanced(key, labels, 256, 0.5)
    return ops.mask_unsampled(labels, sample, ok), ops.encode_boxes(gt[idx], anchors)

  measure(
    f"RPN matching + sampling + encoding, {anchors.shape[0]} anchors x 100 gt",
    rpn_targets,
    gt,
    valid,
    jax.random.key(0),
    repeats=repeats,
  )
  batch = lambda g, v, k: jax.vmap(rpn_targets)(g, v, jax.random.split(k, 2))
  measure(
    "  same, vmap over 2 images",
    batch,
    jnp.stack([gt, gt[::-1]]),
    jnp.stack([valid, valid[::-1]]),
    jax.random.key(0),
    repeats=repeats,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.device_count()} device(s))")
  rng = np.random.default_rng(0)
  bench_roi_align(rng, args.repeats)
  bench_nms(rng, args.repeats)
  bench_matching(rng, args.repeats)


if __name__ == "__main__":
  main()
