"""torchvision models with random weights, shared by the tests of segjax/weights and fine-tuning.

torch is imported inside the fixtures: this file must import without it (the test modules skip
then)."""

import sys

import numpy as np
import pytest

# tests/conftest.py imports TensorFlow first; loading triton's native library after it (CUDA
# builds of torch import triton through torchvision.ops -> torch._dynamo) segfaults. These CPU
# tests need no triton, so it is hidden. (Reading .pth files imports no triton: segjax is fine.)
sys.modules.setdefault("triton", None)

MASK_RCNN = "maskrcnn_resnet50_fpn"
MASK_RCNN_V2 = "maskrcnn_resnet50_fpn_v2"


def randomize_and_calibrate(model, body, images, rois=None):
  """Random biases and batch-norm affine terms; running statistics the exact averages over
  `images` (momentum None), so every layer's output is roughly normalized.

  `body` is the part run on the images in train mode (for a Mask R-CNN with BatchNorm in its
  FPN, `model.backbone`). With `rois` (`(R, 4)` boxes inside the images), the ROI heads' batch
  norms are calibrated too, on those ROIs pooled from the calibrated features.
  """
  import torch

  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.1)
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.reset_running_stats()
        m.momentum = None
    body.train()
    for x in images:
      body(x)
    model.eval()
    if rois is not None:
      heads = model.roi_heads
      for head, pool in (
        (heads.box_head, heads.box_roi_pool),
        (heads.mask_head, heads.mask_roi_pool),
      ):
        head.train()
        for x in images:
          head(pool(model.backbone(x), [torch.as_tensor(rois)], [tuple(x.shape[-2:])]))
        head.eval()
  return model


def assert_close(actual, expected, rel=1e-4):
  """Largest absolute difference at most `rel` times the largest magnitude of `expected`."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = np.max(np.abs(expected))
  error = np.max(np.abs(actual - expected))
  assert scale > 1e-3, scale  # A vanishing reference would compare nothing.
  assert error <= rel * scale, f"max error {error:.3g} > {rel} x max |expected| {scale:.3g}"


def nhwc(t):
  """A torch NCHW tensor as an NHWC NumPy array."""
  return t.detach().permute(0, 2, 3, 1).numpy()


def random_images(n, h, w, seed):
  import torch

  return [
    torch.from_numpy(np.random.default_rng(seed + i).normal(size=(1, 3, h, w)).astype(np.float32))
    for i in range(n)
  ]


@pytest.fixture(scope="session")  # Kept across modules: built once per worker.
def tv_mask_rcnn(tmp_path_factory):
  """(torchvision Mask R-CNN with random, calibrated weights, path of its saved state dict)."""
  import torch
  import torchvision

  torch.manual_seed(0)
  model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
  randomize_and_calibrate(model, model.backbone.body, random_images(2, 128, 160, seed=1))
  path = str(tmp_path_factory.mktemp("tv") / "maskrcnn.pth")
  torch.save(model.state_dict(), path)
  return model, path


def random_rois(n, h, w, seed, min_size=8):
  """`(n, 4)` float32 boxes of all sizes (`min_size` to most of the image) inside `h x w`."""
  rng = np.random.default_rng(seed)
  size = np.exp(rng.uniform(np.log(min_size), np.log(0.8 * min(h, w)), size=(n, 2)))
  x1 = rng.uniform(0, w - size[:, 0])
  y1 = rng.uniform(0, h - size[:, 1])
  return np.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], axis=1).astype(np.float32)


@pytest.fixture(scope="session")
def tv_mask_rcnn_v2(tmp_path_factory):
  """(torchvision `maskrcnn_resnet50_fpn_v2` with random weights, every batch norm calibrated
  (backbone, FPN, box and mask heads), path of its saved state dict)."""
  import torch
  import torchvision

  torch.manual_seed(0)
  model = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)
  randomize_and_calibrate(
    model,
    model.backbone,
    random_images(2, 128, 160, seed=1),
    rois=random_rois(64, 128, 160, seed=2),
  )
  path = str(tmp_path_factory.mktemp("tv_v2") / "maskrcnn_v2.pth")
  torch.save(model.state_dict(), path)
  return model, path


@pytest.fixture(scope="session")
def imported_workdir(tmp_path_factory, tv_mask_rcnn):
  """A workdir written by `import_weights` from `tv_mask_rcnn`'s file, and its summary."""
  from segjax.weights import torchvision as tvw

  workdir = str(tmp_path_factory.mktemp("tv_import") / "imported")
  return workdir, tvw.import_weights(MASK_RCNN, tv_mask_rcnn[1], workdir)
