"""Segmentation models, selected by name from a config through one explicit dict."""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models import ensemble
from segjax.models.ensemble import Ensemble
from segjax.models.mask_rcnn import MaskRCNN
from segjax.models.unet import UNet
from segjax.models.unet_resnet import ResNetUNet

MODELS = {"unet": UNet, "unet_resnet": ResNetUNet, "mask_rcnn": MaskRCNN}


def model_class(name: str) -> type:
  """The module class of `config.model.name`; its `task` ("semantic" or "instance") picks the
  training and prediction functions (`segjax.train.tasks`)."""
  if name not in MODELS:
    raise ConfigError(f"Unknown model {name!r}; known models: {sorted(MODELS)}.")
  return MODELS[name]


def _build(cls, kwargs: dict, where: str, base: nn.Module | None = None) -> nn.Module:
  """`cls(**kwargs)` (or `base.clone(**kwargs)`), building nested submodule sections too."""
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  fields = {k: f for k, f in fields.items() if k not in ("parent", "name")}
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ConfigError(
      f"Model {where} has no attribute(s) {unknown}; accepted keys: {sorted(fields)}."
    )
  for key, value in kwargs.items():
    field = fields[key]
    default = (
      field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    )
    if isinstance(default, nn.Module) and hasattr(value, "items"):
      # A section such as config.model.rpn updates that submodule's defaults.
      kwargs[key] = _build(type(default), dict(value.items()), f"{where}.{key}", default)
    elif key == "dtype" and isinstance(value, str):
      kwargs[key] = jnp.dtype(value)
    elif isinstance(value, list):
      kwargs[key] = tuple(value)
  return base.clone(**kwargs) if base is not None else cls(**kwargs)


def create_model(model_config: Any):
  """Builds the model named `model_config.name` from the other keys of `model_config`.

  Args:
    model_config: an ml_collections ConfigDict (or any mapping) with `name` and the module's
      attributes, e.g. for "unet": num_classes, depth, base_width, norm, dropout_rate,
      upsampling and optionally dtype (a string such as "bfloat16"). A section for a
      submodule attribute updates that submodule's defaults, e.g. for "mask_rcnn":
      `backbone.depth`, `rpn.anchor_sizes`, `roi_heads.num_classes`; for "unet_resnet":
      `backbone.depth`, `backbone.norm`. Keys left out take the
      module's defaults.

  Raises:
    ValueError: for an unknown model name or a key the model does not have.
  """
  kwargs = dict(model_config.items())
  name = kwargs.pop("name", None)
  return _build(model_class(name), kwargs, repr(name))


def build_model(config: Any) -> nn.Module:
  """The model of a training config: `create_model(config.model)`, computing in
  `config.model.dtype` (default float32), and `config.ensemble_size` copies of it
  (`segjax.models.ensemble.of`) if set above 1, each trained on its own slice of the batch
  if `config.ensemble_split_batch`.

  Raises:
    ConfigError: for a top-level `config.dtype` (its place is `config.model.dtype`), and as
      `create_model` and `ensemble.of` do.
  """
  if config.get("dtype") is not None:
    raise ConfigError(
      f"config.dtype={config.dtype!r}: the computation dtype is config.model.dtype now "
      f"(e.g. --config.model.dtype={config.dtype})."
    )
  return ensemble.of(
    create_model(config.model.to_dict()),
    config.get("ensemble_size", 1),
    split_batch=config.get("ensemble_split_batch", False),
  )


__all__ = [
  "MODELS",
  "Ensemble",
  "MaskRCNN",
  "ResNetUNet",
  "UNet",
  "build_model",
  "create_model",
  "model_class",
]
