"""Tests for segjax/data/scan_instances.py: the count distribution and the command."""

import subprocess
import sys

import numpy as np
import pytest

from segjax.data import scan_instances
from tests.coco_fixture import write_coco

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory):
  return write_coco(tmp_path_factory.mktemp("coco_data"))


def test_summary_percentiles_and_suggestion():
  counts = np.concatenate([np.full(990, 3), np.arange(10) + 20])  # 1000 images, max 29.
  summary = scan_instances.summarize(counts)
  assert summary["images"] == 1000 and summary["max"] == 29
  assert summary["p50"] == 3 and summary["p99"] == np.percentile(counts, 99)
  assert summary["p99.9"] == pytest.approx(np.percentile(counts, 99.9))
  assert summary["suggested_max_instances"] == 32 and summary["truncated_at_suggested"] == 0
  small = scan_instances.summarize([1, 2, 2, 3])
  assert small["suggested_max_instances"] == 8
  with pytest.raises(ValueError, match="No images"):
    scan_instances.summarize([])


def test_counts_follow_the_source(coco_data):
  counts = scan_instances.coco_instance_counts(coco_data.annotation_file)
  np.testing.assert_array_equal(counts, [5, 2, 3, 0])  # Image ids 5, 7, 42, 100.
  shapes = scan_instances.shapes_instance_counts(num_examples=20, max_shapes=3)
  assert shapes.min() >= 1 and shapes.max() <= 3


def test_command_prints_the_distribution(coco_data):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "segjax.data.scan_instances",
      f"--annotation_file={coco_data.annotation_file}",
    ],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert "images: 4" in out and "max 5" in out and "p99.9:" in out
  assert "suggested max_instances: 8 (truncates 0 images)" in out
