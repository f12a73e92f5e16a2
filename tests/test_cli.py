"""Every failure of an entry point exits non-zero, promptly, naming its cause (segjax/cli.py).

Each test runs an entry point in a subprocess of its own session and asserts: a non-zero exit
within `EXIT_SECONDS` of the error, one `PROGRAM: error: CAUSE` line on stderr, and no process
left in the session. Where data must be slow for the failure to bite, reads are slowed down
in the subprocess (`slow_reads`): a tf.data iterator with reads in flight, alive at
interpreter shutdown, never exits (the failure these tests guard against).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests.markers import long_test

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_SECONDS = 60
START_SECONDS = 240  # Imports and compiles, on a loaded 2-core machine.
TINY_FOLDER = [
  "--config",
  "configs/unet_folder.py:2",
  "--config.image_size=(32,32)",
  "--config.model.depth=2",
  "--config.model.base_width=8",
  "--config.batch_size=2",
  "--config.eval_batch_size=2",
  "--config.num_train_steps=30",
  "--config.warmup_steps=1",
  "--config.log_every_steps=2",
  "--config.eval_every_steps=1000",
  "--config.checkpoint_every_steps=1000",
]
TINY_SHAPES = ["--config", "configs/unet_shapes.py:tiny"]


class Exited:
  def __init__(self, returncode, stdout, stderr, after_error):
    self.returncode, self.stdout, self.stderr = returncode, stdout, stderr
    self.after_error = after_error  # Seconds from the first error output to the exit.

  def cause(self, program="train.py") -> str:
    lines = [line for line in self.stderr.splitlines() if line.startswith(f"{program}: error: ")]
    assert len(lines) == 1, self.stderr[-3000:]
    return lines[0]


def run(args, *, slow_reads=False, patch="", on_line=None, env=None) -> Exited:
  """Runs `python ARGS` in REPO in a new session; `patch` (Python) runs before the entry
  point's module; `on_line(line, proc)` sees each line of stdout; `env` adds variables."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **(env or {})}
  if slow_reads:
    patch += textwrap.dedent("""
      import time
      from segjax.data import folder
      _read = folder.read_image
      def _slow_read(path):
        time.sleep(0.3)
        return _read(path)
      folder.read_image = _slow_read
    """)
  if patch:
    script, rest = args[0], args[1:]
    code = (
      f"import runpy, sys\nsys.argv = [{script!r}] + sys.argv[1:]\n{patch}\n"
      f"runpy.run_path({script!r}, run_name='__main__')"
    )
    args = ["-c", code, *rest]
  proc = subprocess.Popen(
    [sys.executable, *args],
    cwd=REPO,
    env=env,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    start_new_session=True,
  )
  stderr_lines, error_time = [], []

  def read_stderr():  # In a thread: stdout is read meanwhile.
    for line in proc.stderr:
      if not error_time and re.search(r"error|Error|Traceback", line):
        error_time.append(time.monotonic())
      stderr_lines.append(line)

  reader = threading.Thread(target=read_stderr, daemon=True)
  reader.start()
  stdout_lines = []
  deadline = time.monotonic() + START_SECONDS
  try:
    for line in proc.stdout:
      stdout_lines.append(line)
      if on_line:
        on_line(line, proc)
    while proc.poll() is None:
      limit = error_time[0] + EXIT_SECONDS if error_time else deadline
      if time.monotonic() > limit:
        pytest.fail(
          f"still running {EXIT_SECONDS} s after the error (or "
          f"{START_SECONDS} s after the start):\n{''.join(stderr_lines)[-3000:]}"
        )
      time.sleep(0.2)
    reader.join(EXIT_SECONDS)
    exited = time.monotonic()
  finally:
    _kill_session(proc)
  with pytest.raises(ProcessLookupError):  # No process left in the session.
    os.killpg(proc.pid, 0)
  after = exited - error_time[0] if error_time else 0.0
  return Exited(proc.returncode, "".join(stdout_lines), "".join(stderr_lines), after)


def _kill_session(proc):
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    return
  proc.wait()


def write_folder(data_dir, *, train=24, validation=4, size=(40, 48)):
  """A folder data set of noise images and 2-class masks."""
  rng = np.random.default_rng(0)
  for split, count in (("train", train), ("validation", validation)):
    for sub in ("images", "masks"):
      os.makedirs(os.path.join(data_dir, split, sub), exist_ok=True)
    for i in range(count):
      Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8)).save(
        os.path.join(data_dir, split, "images", f"im{i:03d}.png")
      )
      Image.fromarray(rng.integers(0, 2, size, np.uint8)).save(
        os.path.join(data_dir, split, "masks", f"im{i:03d}.png")
      )
  return str(data_dir)


def truncate(path):
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  return str(path)


def corrupt(path):
  """Zeroes the middle of a PNG: its header and end look fine, decoding fails."""
  data = bytearray(open(path, "rb").read())
  middle = len(data) // 2
  data[middle - 64 : middle + 64] = bytes(128)
  with open(path, "wb") as f:
    f.write(bytes(data))
  return str(path)


def assert_failed(exited, cause_pattern, program="train.py", code=1):
  assert exited.returncode == code, exited.stderr[-3000:]
  assert re.search(cause_pattern, exited.cause(program)), exited.cause(program)
  assert exited.after_error < EXIT_SECONDS


@pytest.mark.parametrize(
  "override, cause",
  [
    ("--config.warmup_steps=1000", r"config.warmup_steps=1000 must be in"),
    ("--config.image_size=30", r"image_size=\(30, 30\) must be divisible"),
  ],
)
def test_config_error_is_one_line_without_traceback(tmp_path, override, cause):
  exited = run(["train.py", *TINY_SHAPES, "--workdir", str(tmp_path / "w"), override])
  assert_failed(exited, rf"train.py: error: config: {cause}")
  assert "Traceback" not in exited.stderr
  assert not os.path.exists(tmp_path / "w")


def test_missing_data_dir_exits(tmp_path):
  exited = run(
    [
      "train.py",
      *TINY_FOLDER,
      "--workdir",
      str(tmp_path / "w"),
      f"--config.dataset.data_dir={tmp_path / 'nowhere'}",
    ]
  )
  assert_failed(exited, r"FileNotFoundError: .*nowhere")


def test_truncated_image_is_named_before_compiling(tmp_path):
  data_dir = write_folder(tmp_path / "data")
  bad = truncate(os.path.join(data_dir, "train", "images", "im005.png"))
  exited = run(
    [
      "train.py",
      *TINY_FOLDER,
      "--workdir",
      str(tmp_path / "w"),
      f"--config.dataset.data_dir={data_dir}",
    ]
  )
  assert_failed(exited, rf"1 of 24 image/mask pairs are unusable: {re.escape(bad)}: truncated")
  assert "compiles" not in exited.stdout
  assert not os.path.exists(tmp_path / "w")


def test_bad_image_in_first_batch_exits_naming_the_file(tmp_path):
  data_dir = write_folder(tmp_path / "data")
  bad = corrupt(os.path.join(data_dir, "train", "images", "im005.png"))
  exited = run(
    [
      "train.py",
      *TINY_FOLDER,
      "--workdir",
      str(tmp_path / "w"),
      f"--config.dataset.data_dir={data_dir}",
    ],
    slow_reads=True,
  )
  assert_failed(exited, rf"training data: Cannot read image {re.escape(bad)}")


@long_test  # In CI, bad images: test_bad_image_in_first_batch_exits_naming_the_file.
def test_bad_image_mid_run_exits_keeping_checkpoints(tmp_path):
  data_dir = write_folder(tmp_path / "data")
  bad = corrupt(os.path.join(data_dir, "train", "images", "im020.png"))
  workdir = tmp_path / "w"
  # Sorted order, no shuffling: image 20 is read at step 11, after the checkpoint at step 4.
  exited = run(
    [
      "train.py",
      *TINY_FOLDER,
      "--workdir",
      str(workdir),
      f"--config.dataset.data_dir={data_dir}",
      "--config.dataset.shuffle_buffer=1",
      "--config.checkpoint_every_steps=4",
    ],
    slow_reads=True,
  )
  assert_failed(exited, rf"Cannot read image {re.escape(bad)}")
  assert "step 8/30" in exited.stdout
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved and saved[-1] == 8
  assert all(os.path.exists(workdir / "checkpoints" / str(s) / "commit_success.txt") for s in saved)


def test_bad_image_in_evaluation_exits(tmp_path):
  data_dir = write_folder(tmp_path / "data")
  bad = corrupt(os.path.join(data_dir, "validation", "images", "im002.png"))
  exited = run(
    [
      "train.py",
      *TINY_FOLDER,
      "--workdir",
      str(tmp_path / "w"),
      f"--config.dataset.data_dir={data_dir}",
      "--config.num_train_steps=2",
      "--config.eval_every_steps=2",
    ],
    slow_reads=True,
  )
  assert_failed(exited, rf"evaluation data: Cannot read image {re.escape(bad)}")


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
  """(data_dir, workdir): the tiny folder U-Net trained for 2 steps, checkpointed at step 2."""
  root = tmp_path_factory.mktemp("trained")
  data_dir = write_folder(root / "data")
  workdir = root / "w"
  exited = run(
    [
      "train.py",
      *TINY_FOLDER,
      "--workdir",
      str(workdir),
      f"--config.dataset.data_dir={data_dir}",
      "--config.num_train_steps=2",
    ]
  )
  assert exited.returncode == 0, exited.stderr[-3000:]
  return data_dir, workdir


@pytest.mark.xdist_group("cli_trained_folder")
def test_corrupt_checkpoint_exits(trained_folder, tmp_path):
  data_dir, trained = trained_folder
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  os.remove(workdir / "checkpoints" / "2" / "state" / "manifest.ocdbt")
  exited = run(
    [
      "train.py",
      *TINY_FOLDER,
      "--workdir",
      str(workdir),
      f"--config.dataset.data_dir={data_dir}",
      "--config.num_train_steps=4",
    ]
  )
  assert_failed(exited, r"error: \w+")


@pytest.mark.xdist_group("cli_trained_folder")
def test_evaluate_bad_image_exits(trained_folder, tmp_path):
  data_dir, workdir = trained_folder
  data_dir = shutil.copytree(data_dir, tmp_path / "data")
  bad = corrupt(os.path.join(data_dir, "validation", "images", "im001.png"))
  exited = run(
    [
      "evaluate.py",
      *TINY_FOLDER,
      "--workdir",
      str(workdir),
      f"--config.dataset.data_dir={data_dir}",
    ],
    slow_reads=True,
  )
  assert_failed(
    exited, rf"evaluation data: Cannot read image {re.escape(bad)}", program="evaluate.py"
  )


@pytest.mark.xdist_group("cli_trained_folder")
def test_evaluate_prints_metrics_it_cannot_write(trained_folder, tmp_path):
  data_dir, trained = trained_folder
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  os.makedirs(workdir / "eval_metrics.json")  # Not writable as a file.
  exited = run(
    [
      "evaluate.py",
      *TINY_FOLDER,
      "--workdir",
      str(workdir),
      f"--config.dataset.data_dir={data_dir}",
    ]
  )
  assert_failed(exited, r"Cannot write .*eval_metrics.json .*the metrics: \{", "evaluate.py")
  assert "mean_iou:" in exited.stdout


def test_evaluate_without_checkpoint_exits(tmp_path):
  exited = run(["evaluate.py", *TINY_SHAPES, "--workdir", str(tmp_path / "typo")])
  assert_failed(exited, r"No checkpoint in .*typo", program="evaluate.py")
  assert not os.path.exists(tmp_path / "typo")


def test_failed_save_exits(tmp_path):
  patch = textwrap.dedent("""
    from segjax.train import checkpoint
    def _full_disk(self, directory, args):
      raise OSError(28, "No space left on device", str(directory))
    checkpoint.TFIteratorHandler.save = _full_disk
  """)
  args = [
    "train.py",
    *TINY_SHAPES,
    "--workdir",
    str(tmp_path),
    "--config.checkpoint_every_steps=5",
    "--config.eval_every_steps=1000",
  ]
  exited = run(args, patch=patch)
  assert_failed(exited, r"No space left on device")
  assert "step 10/20" not in exited.stdout  # Stopped at the failing save, not later.
  checkpoints = os.listdir(tmp_path / "checkpoints")
  assert all(d.isdigit() for d in checkpoints), checkpoints  # Nothing half-written left.
  assert run(args).returncode == 0  # The next start runs.


@long_test  # In CI, SIGTERM: tests/train/test_loop.py::test_sigterm_saves_checkpoint_before_exit.
def test_sigterm_while_compiling_saves_and_exits(tmp_path):
  def terminate_when_compiling(line, proc):
    if "the first step compiles" in line:
      proc.send_signal(signal.SIGTERM)

  exited = run(
    [
      "train.py",
      *TINY_SHAPES,
      "--workdir",
      str(tmp_path),
      "--config.num_train_steps=100000",
      "--config.eval_every_steps=100000",
      "--config.checkpoint_every_steps=100000",
    ],
    on_line=terminate_when_compiling,
    env={"JAX_ENABLE_COMPILATION_CACHE": "false"},
  )  # Really compiling: step 1.
  assert exited.returncode == 143, exited.stderr[-3000:]
  assert re.search(r"terminated: SIGTERM: stopped at step 1; checkpoint saved", exited.cause())
  assert os.listdir(tmp_path / "checkpoints") == ["1"]


def test_help_explains_overrides_and_lists_the_configs_keys_and_values():
  exited = run(["train.py", *TINY_SHAPES, "--config.model.depth=3", "--help"])
  assert exited.returncode == 0, exited.stderr[-3000:]
  out = exited.stdout
  assert "--config.KEY=VALUE" in out and "--workdir" in out  # The override rule, the flags.
  from configs import unet_shapes
  from segjax.cli import config_lines

  config = unet_shapes.get_config("tiny")
  config.model.depth = 3
  lines = config_lines(config)
  assert "  --config.model.depth=3" in lines and "  --config.dataset.name='shapes'" in lines
  assert all(line in out.splitlines() for line in lines)
