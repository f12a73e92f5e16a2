"""segjax against PyTorch on the same architectures, interleaved in one run.

  python benchmarks/vs_pytorch.py                       # all parts, 5 rounds
  python benchmarks/vs_pytorch.py --only unet,conv      # a couple of minutes on 2 cores
  python benchmarks/vs_pytorch.py --only maskrcnn --rounds 3

Needs torch and torchvision (the "benchmark" extra). Every framework runs in its own worker
process (so each peak RSS is its own), both started before timing; a round times each
candidate in turn (A B A B ...), `--steps` calls each, and the medians over `--rounds` rounds
are printed with their ratio, the minor page faults per call and the load average before and
after. PyTorch runs with `--torch_threads` threads (2: the machine's cores) and channels_last
where that is faster. segjax runs as its entry points run it (`--reuse_cpu_memory`: each run of
a step reuses the previous run's pages, `segjax.train.host_memory.reuse_memory_between_runs`);
`--torch_kept_heap` also times PyTorch with glibc's malloc set the same way (no mmap, no
trimming), which PyTorch's users do not get by default.

Parts:
  unet      the U-Net of configs/unet_shapes.py (depth 4, base width 16, BatchNorm, 2x2
            up-convolutions) at batch 8, 128x128: train step (forward, backward, AdamW) and
            inference; parameter counts asserted equal.
  conv      one 3x3 conv 64->64 on 8x128x128 (forward: the achievable GFLOP/s, and forward +
            backward), and the RPN head's 3x3 conv 256->256 on 2x128x128 (forward + backward),
            by the convolutions segjax's models use here (oneDNN's where it loads:
            `cpu_convolutions`, printed as "convolutions").
  maskrcnn  Mask R-CNN R50-FPN, 91 classes, frozen BN, stem and res2 frozen, train step (SGD)
            at batch 2, 512x512, 5 ground-truth boxes per image, 256 anchors and 512 ROIs
            sampled per image; inference on one 640x640 image. torchvision's model is built
            with FrozenBatchNorm2d and min_size = max_size = the image side (no resize);
            segjax's with `conventions="torchvision"` (its 2 x 2 ROIAlign samples per bin,
            anchors and size thresholds), the same work.
With `--compare_kernel_grad` the segjax candidates are also run with XLA's own convolution
kernel gradient (`segjax.layers.conv.USE_MATMUL_KERNEL_GRAD = False`): before and after. It
changes the conv and maskrcnn parts where they run XLA's convolutions (`cpu_convolutions="xla"`,
or oneDNN not loading; the ResNet, FPN and heads use `segjax.layers.conv.Conv`); the U-Net
keeps XLA's kernel gradient (`PlainConv`), where the matmul one did not prove faster.
"""

import argparse
import copy
import multiprocessing
import os
import resource
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before TensorFlow loads (segjax.cli).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # timing, unet_throughput; configs, segjax.
UNET_BATCH, UNET_SIZE = 8, 128
CONV_BATCH, CONV_SIZE, CONV_CHANNELS = 8, 128, 64
MRCNN_BATCH, MRCNN_SIZE, MRCNN_TEST_SIZE, MRCNN_GT = 2, 512, 640, 5
# configs/unet_shapes.py's model, checked against it in `measure_part` (the torch worker must
# not import the config: it loads TensorFlow).
UNET_SHAPES_MODEL = dict(num_classes=5, depth=4, base_width=16)
UNET_SHAPES_WEIGHT_DECAY = 1e-4
MRCNN_CLASSES = 90  # Foreground; torchvision's num_classes=91 counts the background.


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _reset_step_peak() -> None:
  """Restarts Linux's peak-RSS count (`VmHWM`), so that `_step_peak_gb` sees the steps only,
  not the setup and compilation before them."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def _minor_faults() -> int:
  """Minor page faults of this process so far: first touches of freshly mapped memory (XLA:CPU
  maps its temporary buffer anew each run when it exceeds glibc's mmap threshold)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _step_peak_gb() -> float:
  """`VmHWM` (GB) since `_reset_step_peak`; NaN where /proc does not tell."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return float("nan")


def _conv_flops(b, h, w, c, o, k) -> float:
  return 2.0 * b * h * w * c * o * k * k


# ---------------------------------------------------------------------------------------------
# segjax candidates


def _jax_unet(kernel_grad: str):
  from unet_throughput import unet_steps

  from configs import unet_shapes
  from segjax.layers import conv as conv_lib
  from segjax.train import host_memory

  config = unet_shapes.get_config()
  config.batch_size, config.image_size = UNET_BATCH, (UNET_SIZE, UNET_SIZE)
  conv_lib.USE_MATMUL_KERNEL_GRAD = kernel_grad == "matmul"  # Read while tracing.
  calls, info = unet_steps(config)
  host_memory.release_freed_memory()  # As segjax's train loop does after compiling.
  # Inference as PyTorch's row runs it: the forward pass and its argmax.
  return {"train": calls["train"], "inference": calls["forward"]}, info


def _jax_conv(kernel_grad: str):
  import jax
  import jax.numpy as jnp
  import ml_collections

  from segjax.layers import conv as conv_lib
  from segjax.train import xla_options

  conv_lib.USE_MATMUL_KERNEL_GRAD = kernel_grad == "matmul"
  # The convolutions segjax's models run here: oneDNN's where it loads (`cpu_convolutions`).
  convolutions = xla_options.cpu_convolutions(ml_collections.ConfigDict())
  conv = conv_lib.selected(conv_lib.conv_general_dilated)  # `conv_lib.Conv`'s.
  dn = ("NHWC", "HWIO", "NHWC")
  calls, info = {}, {"convolutions": convolutions}
  for name, (b, s, c) in {
    "conv64": (CONV_BATCH, CONV_SIZE, CONV_CHANNELS),
    "conv256": (2, 128, 256),
  }.items():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, s, s, c)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, c, c)), jnp.float32)
    forward = jax.jit(
      conv_lib.traced_with(
        convolutions,
        lambda x, k: conv(x, k, (1, 1), "SAME", dimension_numbers=dn),
      )
    )
    grads = jax.jit(jax.grad(lambda x, k, f=forward: jnp.sum(f(x, k) ** 2) / 2, (0, 1)))
    forward(x, k).block_until_ready()
    jax.block_until_ready(grads(x, k))
    if name == "conv64":
      calls[f"{name} forward"] = lambda f=forward, x=x, k=k: f(x, k).block_until_ready()
    calls[f"{name} fwd+bwd"] = lambda g=grads, x=x, k=k: jax.block_until_ready(g(x, k))
  return calls, info


def _mrcnn_batch(b: int, size: int, seed: int = 0) -> dict:
  """`MRCNN_GT` random boxes per image, sides 1/8 to 1/2 of the image, masks filled."""
  rng = np.random.default_rng(seed)
  image = rng.normal(scale=0.1, size=(b, size, size, 3)).astype(np.float32)
  boxes = np.zeros((b, MRCNN_GT, 4), np.float32)
  masks = np.zeros((b, MRCNN_GT, size, size), np.uint8)
  for i in range(b):
    for j in range(MRCNN_GT):
      w, h = rng.integers(size // 8, size // 2 + 1, 2)
      x1, y1 = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
      boxes[i, j] = (x1, y1, x1 + w, y1 + h)
      masks[i, j, y1 : y1 + h, x1 : x1 + w] = 1
      image[i, y1 : y1 + h, x1 : x1 + w, j % 3] += 1.0
  return {
    "image": image,
    "boxes": boxes,
    "classes": rng.integers(1, MRCNN_CLASSES + 1, (b, MRCNN_GT)).astype(np.int32),
    "instance_masks": masks,
    "valid": np.ones((b, MRCNN_GT), bool),
    "image_size": np.full((b, 2), size, np.int32),
  }


def _jax_maskrcnn(kernel_grad: str):
  import functools

  import jax
  import ml_collections
  from timing import compile_timed

  from configs import mask_rcnn_r50_fpn_coco
  from segjax.layers import conv as conv_lib
  from segjax.models import create_model, mask_rcnn
  from segjax.train import host_memory, steps, xla_options
  from segjax.train import state as state_lib

  conv_lib.USE_MATMUL_KERNEL_GRAD = kernel_grad == "matmul"
  # rpn: 256 anchors sampled per image, roi_heads: 512 ROIs, backbone: freeze_at=2 (defaults);
  # torchvision's conventions, as the model it runs against: 2 x 2 ROIAlign samples per bin
  # (detectron2's adaptive grid takes up to 5 x 5 slots), its anchors and size thresholds.
  model = create_model(
    ml_collections.ConfigDict(
      dict(name="mask_rcnn", conventions="torchvision", roi_heads=dict(num_classes=MRCNN_CLASSES))
    )
  )
  config = ml_collections.ConfigDict(
    dict(
      optimizer="sgd",
      learning_rate=1e-3,
      weight_decay=1e-4,
      grad_clip_norm=0.0,
      schedule="constant",
      warmup_steps=0,
      num_train_steps=1000,
    )
  )
  key = jax.random.key(0)
  init = jax.jit(functools.partial(state_lib.create_train_state, model, config))
  state = init(key, np.zeros((1, 64, 64, 3), np.float32))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  # The R50-FPN COCO recipe's XLA options and convolutions (configs/mask_rcnn_r50_fpn_coco.py).
  recipe = mask_rcnn_r50_fpn_coco.get_config()
  train = xla_options.jit(
    functools.partial(steps.train_step, loss_fn=functools.partial(mask_rcnn.loss_fn, model=model)),
    recipe,
    donate_argnums=0,
  )
  predict = xla_options.jit(functools.partial(mask_rcnn.predict, model=model), recipe)
  batch = jax.device_put(_mrcnn_batch(MRCNN_BATCH, MRCNN_SIZE))
  test_batch = jax.device_put(_mrcnn_batch(1, MRCNN_TEST_SIZE, seed=1))
  train_compiled, train_compile = compile_timed(train, state, batch, key)
  variables = lambda: {"params": state.params, "batch_stats": state.batch_stats}
  predict_compiled, predict_compile = compile_timed(predict, variables(), test_batch)
  host_memory.release_freed_memory()  # As segjax's train loop does after compiling.

  def train_once():
    nonlocal state
    state, metrics = train_compiled(state, batch, key)
    jax.block_until_ready(metrics)

  def infer_once():  # The latest parameters: the train step donates the previous ones.
    jax.block_until_ready(predict_compiled(variables(), test_batch))

  info = dict(train_compile_s=train_compile, eval_compile_s=predict_compile, num_params=num_params)
  return {"train": train_once, "inference": infer_once}, info


# ---------------------------------------------------------------------------------------------
# PyTorch candidates


def _torch_unet_module(num_classes: int, depth: int, base: int):
  import torch
  from torch import nn

  def block(c_in, c_out):
    return nn.Sequential(
      nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
      nn.BatchNorm2d(c_out, momentum=0.1, eps=1e-5),
      nn.ReLU(inplace=True),
      nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
      nn.BatchNorm2d(c_out, momentum=0.1, eps=1e-5),
      nn.ReLU(inplace=True),
    )

  class UNet(nn.Module):
    def __init__(self):
      super().__init__()
      widths = [base * 2**i for i in range(depth + 1)]
      self.down = nn.ModuleList(
        block(3 if i == 0 else widths[i - 1], widths[i]) for i in range(depth)
      )
      self.bottleneck = block(widths[depth - 1], widths[depth])
      self.upconv = nn.ModuleList(
        nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(depth)
      )
      self.up = nn.ModuleList(block(2 * widths[i], widths[i]) for i in range(depth))
      self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
      skips = []
      for down in self.down:
        x = down(x)
        skips.append(x)
        x = torch.nn.functional.max_pool2d(x, 2)
      x = self.bottleneck(x)
      for i in reversed(range(len(skips))):
        x = torch.cat([self.upconv[i](x), skips[i]], dim=1)
        x = self.up[i](x)
      return self.head(x)

  return UNet()


def _faster_memory_format(make_call, torch):
  """(memory_format, call): channels_last or contiguous, whichever runs `make_call`'s call
  faster (the best of 5 calls after one warmup). `make_call(fmt)` converts the model, so each
  layout is timed right after its call is made, and the winner's is made again."""
  seconds = {}
  for fmt in (torch.channels_last, torch.contiguous_format):
    call = make_call(fmt)
    call()
    seconds[fmt] = min(_timed(call) for _ in range(5))
  best = min(seconds, key=seconds.get)
  return best, make_call(best)


def _timed(call) -> float:
  start = time.perf_counter()
  call()
  return time.perf_counter() - start


def _torch_unet(threads: int):
  import torch

  # The U-Net of configs/unet_shapes.py, read from a TensorFlow-free copy: TensorFlow loaded in
  # this process (segjax.data imports it) slows torch's CPU kernels several-fold.
  model_config, weight_decay = UNET_SHAPES_MODEL, UNET_SHAPES_WEIGHT_DECAY
  torch.set_num_threads(threads)
  k = model_config["num_classes"]
  rng = np.random.default_rng(0)
  image = rng.normal(size=(UNET_BATCH, 3, UNET_SIZE, UNET_SIZE)).astype(np.float32)
  image = torch.from_numpy(image)
  mask = torch.from_numpy(rng.integers(0, k, (UNET_BATCH, UNET_SIZE, UNET_SIZE)))
  model = _torch_unet_module(k, model_config["depth"], model_config["base_width"])
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=weight_decay)

  def make_train(fmt):
    model.to(memory_format=fmt)
    x = image.contiguous(memory_format=fmt)

    def train_once():
      model.train()
      optimizer.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(model(x), mask)
      loss.backward()
      optimizer.step()

    return train_once

  infer_model = copy.deepcopy(model).eval()  # Its own layout: the faster for inference.

  def make_infer(fmt):
    infer_model.to(memory_format=fmt)
    x = image.contiguous(memory_format=fmt)

    def infer_once():
      with torch.inference_mode():
        infer_model(x).argmax(1)

    return infer_once

  train_fmt, train_once = _faster_memory_format(make_train, torch)
  infer_fmt, infer_once = _faster_memory_format(make_infer, torch)
  info = dict(
    num_params=sum(p.numel() for p in model.parameters()),
    layout=f"train {train_fmt}, inference {infer_fmt}".replace("torch.", ""),
  )
  return {"train": train_once, "inference": infer_once}, info


def _torch_conv(threads: int):
  import torch

  torch.set_num_threads(threads)
  calls, layouts = {}, {}
  for name, (b, s, c) in {
    "conv64": (CONV_BATCH, CONV_SIZE, CONV_CHANNELS),
    "conv256": (2, 128, 256),
  }.items():
    rng = np.random.default_rng(0)
    x0 = torch.from_numpy(rng.normal(size=(b, c, s, s)).astype(np.float32))
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)

    def make_forward(fmt, conv=copy.deepcopy(conv), x0=x0):  # Its own layout.
      conv.to(memory_format=fmt)
      x = x0.contiguous(memory_format=fmt)

      def forward():
        with torch.inference_mode():
          conv(x)

      return forward

    def make_grads(fmt, conv=conv, x0=x0):
      conv.to(memory_format=fmt)
      x = x0.contiguous(memory_format=fmt).requires_grad_(True)

      def grads():
        conv.weight.grad, x.grad = None, None
        (conv(x) ** 2).sum().div(2).backward()

      return grads

    if name == "conv64":
      fmt, calls[f"{name} forward"] = _faster_memory_format(make_forward, torch)
      layouts[f"{name} forward"] = str(fmt).replace("torch.", "")
    fmt, calls[f"{name} fwd+bwd"] = _faster_memory_format(make_grads, torch)
    layouts[f"{name} fwd+bwd"] = str(fmt).replace("torch.", "")
  return calls, {"layout": ", ".join(f"{k}: {v}" for k, v in layouts.items())}


def _torch_maskrcnn(threads: int):
  import torch
  from torchvision.models import resnet50
  from torchvision.models.detection import MaskRCNN
  from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
  from torchvision.ops import FrozenBatchNorm2d

  torch.set_num_threads(threads)
  # maskrcnn_resnet50_fpn(weights=None, weights_backbone=None) would use trainable
  # BatchNorm2d; segjax (and torchvision with pretrained weights) freezes it. Stem and res2
  # frozen = trainable_backbone_layers 3 = segjax's freeze_at=2.
  backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
  model = MaskRCNN(
    backbone,
    num_classes=MRCNN_CLASSES + 1,
    min_size=MRCNN_SIZE,
    max_size=MRCNN_SIZE,
    rpn_batch_size_per_image=256,
    box_batch_size_per_image=512,
  )
  optimizer = torch.optim.SGD(
    [p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9, weight_decay=1e-4
  )
  batch = _mrcnn_batch(MRCNN_BATCH, MRCNN_SIZE)
  images = [torch.from_numpy(im.transpose(2, 0, 1).copy()) for im in batch["image"]]
  targets = [
    {
      "boxes": torch.from_numpy(batch["boxes"][i]),
      "labels": torch.from_numpy(batch["classes"][i].astype(np.int64)),
      "masks": torch.from_numpy(batch["instance_masks"][i]),
    }
    for i in range(MRCNN_BATCH)
  ]
  test = _mrcnn_batch(1, MRCNN_TEST_SIZE, seed=1)
  test_images = [torch.from_numpy(test["image"][0].transpose(2, 0, 1).copy())]

  def train_once():
    model.train()
    model.transform.min_size, model.transform.max_size = (MRCNN_SIZE,), MRCNN_SIZE
    optimizer.zero_grad(set_to_none=True)
    sum(model(images, targets).values()).backward()
    optimizer.step()

  def infer_once():
    model.eval()
    model.transform.min_size, model.transform.max_size = (MRCNN_TEST_SIZE,), MRCNN_TEST_SIZE
    with torch.inference_mode():
      model(test_images)

  info = dict(num_params=sum(p.numel() for p in model.parameters()))
  return {"train": train_once, "inference": infer_once}, info


BUILDERS = {
  ("segjax", "unet"): _jax_unet,
  ("segjax", "conv"): _jax_conv,
  ("segjax", "maskrcnn"): _jax_maskrcnn,
  ("torch", "unet"): _torch_unet,
  ("torch", "conv"): _torch_conv,
  ("torch", "maskrcnn"): _torch_maskrcnn,
}


# ---------------------------------------------------------------------------------------------
# Workers and the interleaved schedule


def _worker(framework: str, part: str, arg, conn, kept_heap: bool = False) -> None:
  """Builds the candidate's calls, then answers ("run", name, steps) with the mean seconds and
  minor page faults of `steps` calls and ("peak",) with its peak RSS in GB, until ("stop",)."""
  import faulthandler

  faulthandler.enable()  # A crash in a worker shows where.
  try:
    memory = {}
    if framework == "segjax":  # As train.py, evaluate.py and predict.py run (--reuse_cpu_memory).
      from segjax.train import host_memory

      memory["reuse_cpu_memory"] = host_memory.reuse_memory_between_runs()
    elif kept_heap:
      _keep_glibc_heap()
    start = time.perf_counter()
    calls, info = BUILDERS[framework, part](arg)
    info.update(memory, setup_s=time.perf_counter() - start)
    _reset_step_peak()
    conn.send(("ready", sorted(calls), info))
    while True:
      message = conn.recv()
      if message[0] == "stop":
        return
      if message[0] == "peak":
        conn.send((_peak_rss_gb(), _step_peak_gb()))
        continue
      _, name, steps = message
      faults = _minor_faults()
      seconds = sum(_timed(calls[name]) for _ in range(steps)) / steps
      conn.send((seconds, (_minor_faults() - faults) / steps))
  except BaseException as e:  # Reported to the parent, which stops.
    conn.send(("error", f"{type(e).__name__}: {e}", None))
    raise


def _keep_glibc_heap() -> None:
  """`segjax.train.host_memory.keep_heap` without importing JAX into PyTorch's worker."""
  import ctypes
  import ctypes.util

  mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
  M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
  if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, -1)):
    raise RuntimeError("mallopt refused M_MMAP_MAX or M_TRIM_THRESHOLD")


class Candidate:
  """One framework's calls for one part, in a worker process of its own."""

  def __init__(self, label: str, framework: str, part: str, arg, kept_heap: bool = False):
    self.label = label
    context = multiprocessing.get_context("spawn")
    self.conn, child = context.Pipe()
    self.process = context.Process(
      target=_worker, args=(framework, part, arg, child, kept_heap), daemon=True
    )
    self.process.start()

  def wait_ready(self):
    status, names, info = self.conn.recv()
    if status != "ready":
      raise RuntimeError(f"{self.label} failed to build: {names}")
    self.names, self.info = names, info

  def run(self, name: str, steps: int) -> tuple[float, float]:
    """(seconds, minor page faults) per call of `name`, means over `steps` calls."""
    self.conn.send(("run", name, steps))
    reply = self.conn.recv()
    if reply[0] == "error":
      raise RuntimeError(f"{self.label} failed running {name}: {reply[1]}")
    return reply

  def close(self) -> tuple[float, float]:
    """(peak RSS of the process, peak RSS since its setup and compilation) in GB."""
    self.conn.send(("peak",))
    peak = self.conn.recv()
    self.conn.send(("stop",))
    self.process.join()
    return peak


def _load() -> str:
  return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def measure_part(part: str, args) -> None:
  if part == "unet":
    from configs import unet_shapes

    config = unet_shapes.get_config()
    actual = {key: config.model[key] for key in UNET_SHAPES_MODEL}
    if actual != UNET_SHAPES_MODEL or config.weight_decay != UNET_SHAPES_WEIGHT_DECAY:
      raise AssertionError(f"configs/unet_shapes.py changed: {actual}; update UNET_SHAPES_MODEL.")
  kernel_grads = ["matmul", "xla"] if args.compare_kernel_grad else ["matmul"]
  specs = [
    ("segjax" if kg == "matmul" else "segjax (XLA kernel grad)", "segjax", kg, False)
    for kg in kernel_grads
  ]
  if args.torch_kept_heap:
    specs.append(("PyTorch (heap kept)", "torch", args.torch_threads, True))
  specs.append(("PyTorch", "torch", args.torch_threads, False))  # The reference: last.
  candidates = []
  for label, framework, arg, kept_heap in specs:
    # One after the other: a setup's timings (PyTorch's layout choice) must not compete with
    # another's compilation. Earlier workers wait, idle, meanwhile.
    candidates.append(Candidate(label, framework, part, arg, kept_heap=kept_heap))
    candidates[-1].wait_ready()
  print(f"\n== {part}  ({_load()} before)", flush=True)
  for c in candidates:
    extra = {k: (f"{v:.1f}" if isinstance(v, float) else v) for k, v in c.info.items()}
    print(f"   {c.label}: {extra}", flush=True)
  counts = {c.info.get("num_params") for c in candidates}
  if part != "conv" and len(counts) != 1:
    raise AssertionError(f"{part}: parameter counts differ: {counts}")
  steps = args.steps if part != "maskrcnn" else 1
  names = candidates[0].names
  times = {(c.label, n): [] for c in candidates for n in names}
  faults = {(c.label, n): [] for c in candidates for n in names}
  for _ in range(args.warmup):
    for n in names:
      for c in candidates:
        c.run(n, 1)
  for _ in range(args.rounds):
    for n in names:
      for c in candidates:
        seconds, call_faults = c.run(n, steps)
        times[c.label, n].append(seconds)
        faults[c.label, n].append(call_faults)
  torch_label = candidates[-1].label
  for n in names:
    reference = statistics.median(times[torch_label, n])
    for c in candidates:
      median = statistics.median(times[c.label, n])
      spread = f"{min(times[c.label, n]):.3f}-{max(times[c.label, n]):.3f}"
      line = f"   {n:18s} {c.label:26s} {median:8.3f} s  (rounds {spread})"
      flops = _part_flops(part, n)
      if flops:
        line += f"  {flops / median / 1e9:6.1f} GFLOP/s"
      if c.label != torch_label:
        line += f"  segjax/PyTorch {median / reference:5.2f}x"
      line += f"  {statistics.median(faults[c.label, n]) / 1e3:.1f}k page faults"
      print(line, flush=True)
  for c in candidates:
    peak, step_peak = c.close()
    print(
      f"   peak RSS {c.label}: {peak:.2f} GB (setup and compilation included), "
      f"{step_peak:.2f} GB in the timed steps",
      flush=True,
    )
  print(f"   ({_load()} after; {args.rounds} rounds x {steps} steps, medians)", flush=True)


def _unet_flops(train: bool) -> float:
  """Convolution FLOPs of the benchmark U-Net (3x forward for a train step)."""
  from configs import unet_shapes

  model = unet_shapes.get_config().model
  b, s, base = UNET_BATCH, UNET_SIZE, model.base_width
  total, c_in = 0.0, 3
  for i in range(model.depth + 1):
    w, size = base * 2**i, s // 2**i
    total += _conv_flops(b, size, size, c_in, w, 3) + _conv_flops(b, size, size, w, w, 3)
    c_in = w
  for i in range(model.depth):
    w, size = base * 2**i, s // 2**i
    total += _conv_flops(b, size // 2, size // 2, 2 * w, w, 2)  # Up-convolution.
    total += _conv_flops(b, size, size, 2 * w, w, 3) + _conv_flops(b, size, size, w, w, 3)
  total += _conv_flops(b, s, s, base, model.num_classes, 1)
  return 3 * total if train else total


def _part_flops(part: str, name: str) -> float | None:
  if part == "unet":
    return _unet_flops(name == "train")
  if part == "conv":
    conv64 = _conv_flops(CONV_BATCH, CONV_SIZE, CONV_SIZE, CONV_CHANNELS, CONV_CHANNELS, 3)
    return {
      "conv64 forward": conv64,
      "conv64 fwd+bwd": 3 * conv64,
      "conv256 fwd+bwd": 3 * _conv_flops(2, 128, 128, 256, 256, 3),
    }[name]
  return None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", default="unet,conv,maskrcnn", help="Comma-separated parts.")
  parser.add_argument("--rounds", type=int, default=5, help="Interleaved timed rounds.")
  parser.add_argument("--steps", type=int, default=2, help="Calls per round (not Mask R-CNN).")
  parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds first.")
  parser.add_argument("--torch_threads", type=int, default=2)
  parser.add_argument(
    "--torch_kept_heap",
    action="store_true",
    help="Also time PyTorch with glibc's malloc set as segjax's runs set it (no mmap, no trim).",
  )
  parser.add_argument(
    "--compare_kernel_grad",
    action="store_true",
    help="Also time segjax with XLA's own convolution kernel gradient.",
  )
  args = parser.parse_args()
  parts = [p.strip() for p in args.only.split(",") if p.strip()]
  unknown = sorted(set(parts) - {"unet", "conv", "maskrcnn"})
  if unknown:
    parser.error(f"--only: unknown part(s) {unknown}; choose from unet, conv, maskrcnn.")
  import platform

  import torch

  print(
    f"segjax vs PyTorch {torch.__version__} ({args.torch_threads} threads) on "
    f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {_load()}",
    flush=True,
  )
  for part in parts:
    measure_part(part, args)


if __name__ == "__main__":
  main()
