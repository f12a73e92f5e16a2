"""`segjax.export`: the serialized inference function, loaded by a process that imports only
jax and numpy, gives the Predictor's jitted outputs for any batch size, for both model kinds."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_predict import predictor, trained  # The same models, built once per worker.

from segjax.export import export_predictor
from segjax.predict import Predictor
from tests.markers import long_test
from tests.trained_models import XDIST_GROUP

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.xdist_group(XDIST_GROUP)

# Runs the exported file on each .npy batch; fails if anything but jax and numpy was loaded.
LOAD_AND_CALL = """
import sys
import jax
import numpy as np
exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
outputs = {}
for i, path in enumerate(sys.argv[3:]):
  for key, value in exported.call(np.load(path)).items():
    outputs[f"{i}/{key}"] = np.asarray(value)
np.savez(sys.argv[2], **outputs)
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"segjax", "flax", "tensorflow"})
assert not loaded, loaded
"""


def _run(args):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  proc = subprocess.run(
    [sys.executable, *args],
    cwd=REPO,
    env=env,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout
  return proc.stdout


def _call_elsewhere(path, batches, tmp_path):
  """The exported function at `path` on each batch, run in a fresh jax-only process."""
  names = []
  for i, batch in enumerate(batches):
    names.append(str(tmp_path / f"batch_{i}.npy"))
    np.save(names[-1], batch)
  _run(["-c", LOAD_AND_CALL, path, str(tmp_path / "out.npz"), *names])
  out = np.load(tmp_path / "out.npz")
  return [
    {k.split("/")[1]: out[k] for k in out.files if k.startswith(f"{i}/")}
    for i in range(len(batches))
  ]


def _batches(size, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (b, *size, 3), dtype=np.uint8) for b in (2, 3)]  # Symbolic B.


def _assert_same(got, want):
  assert got.keys() == want.keys()
  for key, value in want.items():
    value = np.asarray(value)
    assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
    if np.issubdtype(value.dtype, np.floating):  # Relative to the values' scale too (boxes).
      np.testing.assert_allclose(
        got[key], value, rtol=1e-5, atol=1e-5 * np.abs(value).max(initial=1e-1), err_msg=key
      )
    else:
      np.testing.assert_array_equal(got[key], value, err_msg=key)


@long_test  # In CI, export: test_export_fixes_the_batch_on_request_and_checks_the_size.
def test_exported_unet_from_the_command_line_equals_the_predictor(tmp_path_factory, tmp_path):
  config, workdir = trained("unet", tmp_path_factory)
  path = str(tmp_path / "unet.jax")
  out = _run(
    ["-m", "segjax.export", "--workdir", workdir, "--output", path, "--image_size", "32,48"]
  )
  assert "platforms ('cpu', 'cuda', 'tpu')" in out
  exported = jax.export.deserialize(open(path, "rb").read())
  assert str(exported.in_avals[0]) == "uint8[b,32,48,3]"
  predictor = Predictor.from_workdir(workdir)
  batches = _batches((32, 48))
  for got, images in zip(_call_elsewhere(path, batches, tmp_path), batches):
    sizes = np.full((len(images), 2), (32, 48), np.int32)
    want = jax.device_get(predictor.infer(predictor.variables, images, sizes))
    _assert_same(got, want)
    assert got["probs"].shape == (len(images), 32, 48, config.model.num_classes)


@long_test  # In CI, export: test_export_fixes_the_batch_on_request_and_checks_the_size.
def test_exported_mask_rcnn_equals_the_predictor(tmp_path_factory, tmp_path):
  config, _ = trained("mask_rcnn", tmp_path_factory)
  mask_rcnn = predictor("mask_rcnn", tmp_path_factory)  # Compiled for this batch already.
  # At the config's image_size, 64 x 64; CPU only (the U-Net test lowers for all three).
  exported = export_predictor(mask_rcnn, platforms=("cpu",))
  path = str(tmp_path / "mask_rcnn.jax")
  with open(path, "wb") as f:
    f.write(exported.serialize())
  assert str(exported.in_avals[0]) == "uint8[b,64,64,3]"
  # One batch of the Predictor's compiled size; the U-Net test shows B is symbolic.
  batches = [
    np.random.default_rng(1).integers(0, 256, (mask_rcnn.batch_size, 64, 64, 3), dtype=np.uint8)
  ]
  for got, images in zip(_call_elsewhere(path, batches, tmp_path), batches):
    sizes = np.full((len(images), 2), (64, 64), np.int32)
    want = jax.device_get(mask_rcnn.infer(mask_rcnn.variables, images, sizes))
    _assert_same(got, want)
    d = config.model.roi_heads.detections_per_image
    assert got["instance_masks"].shape == (len(images), d, 64, 64) and got["valid"].any()


def test_export_fixes_the_batch_on_request_and_checks_the_size(tmp_path_factory):
  _, workdir = trained("unet", tmp_path_factory)
  predictor = Predictor.from_workdir(workdir)
  exported = export_predictor(predictor, batch_size=2, platforms=("cpu",))
  assert str(exported.in_avals[0]) == "uint8[2,32,32,3]" and exported.platforms == ("cpu",)
  with pytest.raises(ValueError, match="multiples of 4"):
    export_predictor(predictor, image_size=(30, 32))


def test_export_holds_xla_convolutions_even_when_traced_for_onednn(tmp_path_factory):
  from segjax.kernels import onednn_conv
  from segjax.layers import conv

  if not onednn_conv.available():
    pytest.skip("oneDNN unavailable")
  _, workdir = trained("unet", tmp_path_factory)
  predictor = Predictor.from_workdir(workdir)
  assert (
    "segjax_onednn_conv"
    in predictor.infer.lower(
      predictor.variables, np.zeros((1, 32, 32, 3), np.uint8), np.full((1, 2), 32, np.int32)
    ).as_text()
  )
  with conv.cpu_convolutions("onednn"):
    exported = export_predictor(predictor, batch_size=1, platforms=("cpu",))
  text = exported.mlir_module()
  assert "convolution" in text and "segjax_onednn_conv" not in text
