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


def randomize_and_calibrate(model, body, images):
  """Random biases and batch-norm affine terms; running statistics the exact averages over
  `images` (momentum None), so every layer's output is roughly normalized."""
  import torch

  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.1)
    for m in body.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.reset_running_stats()
        m.momentum = None
    body.train()
    for x in images:
      body(x)
  model.eval()
  return model


def random_images(n, h, w, seed):
  import torch

  return [torch.from_numpy(np.random.default_rng(seed + i).normal(size=(1, 3, h, w))
                           .astype(np.float32)) for i in range(n)]


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


@pytest.fixture(scope="session")
def imported_workdir(tmp_path_factory, tv_mask_rcnn):
  """A workdir written by `import_weights` from `tv_mask_rcnn`'s file, and its summary."""
  from segjax.weights import torchvision as tvw

  workdir = str(tmp_path_factory.mktemp("tv_import") / "imported")
  return workdir, tvw.import_weights(MASK_RCNN, tv_mask_rcnn[1], workdir)
