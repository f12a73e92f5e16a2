"""A fresh run whose backbone has parts that never train (frozen batch norm, `freeze_at` > 0)
needs an `init_from` that fills them (segjax/train/init_from.py `check_frozen_backbone`, which
segjax/train/loop.py calls before compiling anything); resuming a workdir does not."""

import jax
import jax.numpy as jnp
import pytest

from configs import mask_rcnn_shapes
from segjax.errors import ConfigError
from segjax.models import build_model
from segjax.train import checkpoint, init_from, loop, parallel, tasks
from segjax.train.state import initial_state

KEYS = ("model.backbone.norm", "model.backbone.freeze_at", "init_from")


class Reached(Exception):
  """Raised where the loop would build the train step: everything before it passed."""


class Compiling(Exception):
  """Raised where the loop would compile and run the fresh state's initializer."""


def tiny_config(**backbone):
  config = mask_rcnn_shapes.get_config("tiny")
  config.model.backbone.update(backbone)
  return config


def zero_state(config):
  """(model, a train state of zeros) without compiling the initializer."""
  model = build_model(config)
  _, abstract = initial_state(config, model, parallel.make_mesh())
  return model, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)


def save(workdir, config, state, data_iterator=None):
  manager = checkpoint.checkpoint_manager(workdir, save_every_steps=1)
  checkpoint.save(manager, 0, state, data_iterator, force=True)
  manager.wait_until_finished()
  manager.close()


@pytest.fixture
def no_step(monkeypatch):
  """The loop raises `Compiling` instead of initialising a fresh state, and `Reached` instead
  of building the train step."""
  initial_state = loop.initial_state

  def checked_initial_state(config, model, mesh):
    _, abstract = initial_state(config, model, mesh)

    def init():
      raise Compiling

    return init, abstract

  def step_runner(*args, **kwargs):
    raise Reached

  monkeypatch.setattr(loop, "initial_state", checked_initial_state)
  monkeypatch.setattr(loop, "StepRunner", step_runner)


@pytest.mark.parametrize(
  "backbone, named",
  [
    (dict(norm="frozen_bn", freeze_at=0), "model.backbone.norm='frozen_bn'"),
    (dict(norm="bn", freeze_at=2), "model.backbone.freeze_at=2"),
  ],
)
def test_fresh_run_without_init_from_fails_before_compiling(tmp_path, no_step, backbone, named):
  workdir = str(tmp_path / "run")
  with pytest.raises(ConfigError) as error:
    loop.train_and_evaluate(tiny_config(**backbone), workdir)
  message = str(error.value)
  assert named in message
  for key in KEYS:
    assert key in message
  assert "segjax.weights.torchvision --arch resnet18" in message  # The fix, for this depth.
  assert checkpoint.checkpoint_manager(workdir, save_every_steps=1).latest_step() is None


def test_trainable_backbone_needs_no_init_from(tmp_path, no_step):
  config = tiny_config(norm="gn", freeze_at=0)
  with pytest.raises(Compiling):  # Past the check, on to initialising the fresh state.
    loop.train_and_evaluate(config, str(tmp_path / "run"))


def test_resuming_a_workdir_needs_no_init_from(tmp_path, no_step):
  config = tiny_config(norm="frozen_bn", freeze_at=2)
  workdir = str(tmp_path / "run")
  _, state = zero_state(config)
  train_ds = tasks.get_task(config).train_dataset(config, local_batch_size=config.batch_size)
  save(workdir, config, state, iter(train_ds))
  with pytest.raises(Reached):  # Restored the workdir's checkpoint, then went on.
    loop.train_and_evaluate(config, workdir)


def test_init_from_must_fill_every_frozen_variable(tmp_path, capsys):
  # A GroupNorm backbone's checkpoint has the conv kernels but no batch-norm vectors.
  source = tiny_config(norm="gn", freeze_at=0)
  _, source_state = zero_state(source)
  save(str(tmp_path / "gn"), source, source_state)
  config = tiny_config(norm="frozen_bn", freeze_at=2)
  config.init_from = str(tmp_path / "gn")
  model, state = zero_state(config)
  frozen = init_from.frozen_variables(
    model, {"params": state.params, "batch_stats": state.batch_stats}
  )
  # FrozenBatchNorm's vectors of every block; the stem's and res2's convs.
  assert "batch_stats/backbone/res5_1/norm2/var" in frozen
  assert "params/backbone/res2_1/conv2/kernel" in frozen
  assert not any(name.startswith("params/backbone/res3") for name in frozen)
  with pytest.raises(ConfigError, match="fills only 5 of those") as error:
    init_from.check_frozen_backbone(config, model, state)
  for key in KEYS:
    assert key in str(error.value)
  assert "would stay at their initialisation" in str(error.value)
  # Checked from the shapes alone: what loading would then do.
  summary = init_from.load_pretrained(config.init_from, state)[1]
  assert [n for n in frozen if n in summary["loaded"]] == [n for n in frozen if "kernel" in n]

  # The same architecture's checkpoint fills them all.
  save(str(tmp_path / "same"), config, state)
  config.init_from = str(tmp_path / "same")
  init_from.check_frozen_backbone(config, model, state)
  loaded = init_from.maybe_load_pretrained(config, state)
  assert "Initialised from" in capsys.readouterr().out
  assert jax.tree.structure(loaded.params) == jax.tree.structure(state.params)


def test_fresh_run_with_an_init_from_missing_frozen_variables_fails_before_compiling(
  tmp_path, no_step
):
  source = tiny_config(norm="gn", freeze_at=0)
  save(str(tmp_path / "gn"), source, zero_state(source)[1])
  config = tiny_config(norm="frozen_bn", freeze_at=2)
  config.init_from = str(tmp_path / "gn")
  with pytest.raises(ConfigError, match="fills only 5 of those"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
