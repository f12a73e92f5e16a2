"""torchvision weights in segjax: `maskrcnn_resnet50_fpn` and `maskrcnn_resnet50_fpn_v2` (COCO),
ResNet-18/34/50/101 (ImageNet).

  python -m segjax.weights.torchvision --arch maskrcnn_resnet50_fpn \
      --input maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --workdir workdirs/tv_coco

writes `DIR/config.json` (`model_config(arch)`) and an orbax checkpoint `DIR/checkpoints/0/`
laid out as the training loop writes it, so `evaluate.py` reads it and `train.py
--config.init_from=DIR` fine-tunes from it. Nothing is downloaded: the user fetches the files
(torchvision's documented weight URLs) and passes them as `--input`.

The mapping (`convert`) is one to one: segjax's R50-FPN Mask R-CNN has torchvision's parameter
tree, 307 tensors onto 95 "params" and 212 "batch_stats" leaves (v1), 363 tensors onto 225
"params" and 138 "batch_stats" leaves (v2, whose 46,359,409 parameters are segjax's "params"):
  * conv weights OIHW -> HWIO; linear weights transposed;
  * the box head's first fully connected layer (segjax `box_head/fc1`; torchvision v1 `fc6`,
    v2 `box_head.5` after four convs): its input is the `(C, 7, 7)` ROI flattened CHW in
    torchvision and `(7, 7, C)` flattened HWC here, so the rows are reordered;
  * the mask head's transposed conv `(I, O, 2, 2)` -> `(2, 2, I, O)` flipped in both spatial
    axes (`segjax.layers.upconv`: output pixel `(2i + a, 2j + b)` reads `kernel[1 - a, 1 - b]`);
  * v1's BatchNorm / FrozenBatchNorm2d weight, bias, running_mean, running_var -> segjax's
    `FrozenBatchNorm` scale, bias, mean, var, all four in "batch_stats" (never trained);
  * v2's trainable BatchNorm (backbone, FPN, box and mask heads: norm="bn") -> flax BatchNorm:
    weight, bias -> "params" scale, bias; running_mean, running_var -> "batch_stats" mean, var.
    A torchvision `Conv2dNormActivation` `i` is segjax's bias-free conv `NAME` (`i.0`) and
    its norm `NAME_norm` (`i.1`); v2's second RPN conv is `rpn/conv2` (`conv.1.0`).
Dropped explicitly, and reported: `num_batches_tracked` (BatchNorm's step counter, meaningless
frozen) and, for the ImageNet classifiers, the `fc.*` classifier. Any other key of the file that
maps nowhere, or segjax leaf that no key fills, or shape that disagrees, is a ValueError naming
the keys. Key names of older torchvision files (`rpn.head.conv.weight`,
`fpn.inner_blocks.0.weight`, `mask_head.mask_fcn1.weight`: files saved before torchvision 0.13)
are read as torchvision's own loading hooks read them.

Classes: torchvision's COCO models have 91 outputs, background 0 and the COCO category ids as
labels (10 ids unused, named "N/A"), i.e. segjax `roi_heads.num_classes=90`; `model_config`
records the names and ids (`dataset.class_names`, `dataset.category_ids`: label l is category
id l), which the COCO data, its evaluation and `segjax.predict` read in place of the annotation
file's contiguous labels 1..80 (`segjax.data.coco`). The ImageNet ResNets fill the backbone
of an otherwise freshly initialised Mask R-CNN (its other variables: `config.seed`'s init).

The Mask R-CNN configs (`DETECTION_ARCHS`: v2 sets `backbone.norm`, `fpn.norm`,
`roi_heads.norm` to "bn", `rpn.num_convs=2`, `roi_heads.box_conv_dims=(256,) * 4`,
`fc_dims=(1024,)`) set `model.conventions = "torchvision"` (torchvision's anchors, ROIAlign,
small-box filtering and mask pasting; `segjax.models.mask_rcnn.CONVENTIONS`). What still
differs is outside the model: the data pipeline's resizing and padding.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# Each detection arch's `config.model` sections over the COCO config's (module defaults else).
DETECTION_ARCHS = {
  "maskrcnn_resnet50_fpn": dict(backbone=dict(depth=50, norm="frozen_bn")),
  # BatchNorm (trainable, as torchvision's) in the backbone, FPN and heads; the RPN head's
  # two convs; the box head's four convs and one fc (FastRCNNConvFCHead "4conv1fc").
  "maskrcnn_resnet50_fpn_v2": dict(
    backbone=dict(depth=50, norm="bn"),
    fpn=dict(norm="bn"),
    rpn=dict(num_convs=2),
    roi_heads=dict(box_conv_dims=(256,) * 4, fc_dims=(1024,), norm="bn"),
  ),
}
CLASSIFIER_ARCHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
ARCHS = (*DETECTION_ARCHS, *CLASSIFIER_ARCHS)

# torchvision `_COCO_CATEGORIES`: the name of label l, which is COCO category id l.
COCO_CATEGORIES = (
  "background",
  "person",
  "bicycle",
  "car",
  "motorcycle",
  "airplane",
  "bus",
  "train",
  "truck",
  "boat",
  "traffic light",
  "fire hydrant",
  "N/A",
  "stop sign",
  "parking meter",
  "bench",
  "bird",
  "cat",
  "dog",
  "horse",
  "sheep",
  "cow",
  "elephant",
  "bear",
  "zebra",
  "giraffe",
  "N/A",
  "backpack",
  "umbrella",
  "N/A",
  "N/A",
  "handbag",
  "tie",
  "suitcase",
  "frisbee",
  "skis",
  "snowboard",
  "sports ball",
  "kite",
  "baseball bat",
  "baseball glove",
  "skateboard",
  "surfboard",
  "tennis racket",
  "bottle",
  "N/A",
  "wine glass",
  "cup",
  "fork",
  "knife",
  "spoon",
  "bowl",
  "banana",
  "apple",
  "sandwich",
  "orange",
  "broccoli",
  "carrot",
  "hot dog",
  "pizza",
  "donut",
  "cake",
  "chair",
  "couch",
  "potted plant",
  "bed",
  "N/A",
  "dining table",
  "N/A",
  "N/A",
  "toilet",
  "N/A",
  "tv",
  "laptop",
  "mouse",
  "remote",
  "keyboard",
  "cell phone",
  "microwave",
  "oven",
  "toaster",
  "sink",
  "refrigerator",
  "N/A",
  "book",
  "clock",
  "vase",
  "scissors",
  "teddy bear",
  "hair drier",
  "toothbrush",
)
COCO_NUM_CLASSES = len(COCO_CATEGORIES) - 1  # 90: torchvision's num_classes=91 less background

# Older torchvision key names, renamed as the modules' `_load_from_state_dict` hooks rename them.
LEGACY_KEYS = (
  (
    r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.(weight|bias)$",
    lambda m: f"backbone.fpn.{m[1]}_blocks.{m[2]}.0.{m[3]}",
  ),
  (r"^rpn\.head\.conv\.(weight|bias)$", lambda m: f"rpn.head.conv.0.0.{m[1]}"),
  (
    r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$",
    lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}",
  ),
)
BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _check_arch(arch: str) -> None:
  if arch not in ARCHS:
    raise ValueError(f"Unknown arch {arch!r}; known: {list(ARCHS)}.")


def _coco_config() -> ml_collections.ConfigDict:
  """configs/mask_rcnn_r50_fpn_coco.py's config, from any working directory."""
  try:
    from configs import mask_rcnn_r50_fpn_coco
  except ImportError:  # Run from outside the repository root: load the file by its path.
    path = pathlib.Path(__file__).resolve().parents[2] / "configs" / "mask_rcnn_r50_fpn_coco.py"
    spec = importlib.util.spec_from_file_location("mask_rcnn_r50_fpn_coco", path)
    mask_rcnn_r50_fpn_coco = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mask_rcnn_r50_fpn_coco)
  return mask_rcnn_r50_fpn_coco.get_config()


def model_config(arch: str, num_classes: int | None = None) -> ml_collections.ConfigDict:
  """The training config (COCO, detectron2 1x recipe) whose model `convert(..., arch)` fills.

  Args:
    arch: one of `ARCHS`.
    num_classes: segjax's K (`roi_heads.num_classes`, background excluded). Default: 90 for
      the Mask R-CNNs (torchvision's 91 COCO labels, names and category ids recorded), 80 for
      the ImageNet ResNets (the COCO config's contiguous labels).
  """
  _check_arch(arch)
  config = _coco_config()
  if arch in DETECTION_ARCHS:
    k = COCO_NUM_CLASSES if num_classes is None else int(num_classes)
    sections = DETECTION_ARCHS[arch]
    for name, fields in sections.items():
      config.model[name] = ml_collections.ConfigDict(fields)
    # torchvision's anchors, ROIAlign, small-box filtering, mask pasting (models/mask_rcnn.py).
    config.model.conventions = "torchvision"
    config.model.roi_heads = ml_collections.ConfigDict(
      dict(sections.get("roi_heads", {}), num_classes=k)
    )
    if k == COCO_NUM_CLASSES:
      config.dataset.class_names = COCO_CATEGORIES
      config.dataset.category_ids = tuple(range(1, k + 1))
  else:
    config.model.backbone = ml_collections.ConfigDict(
      dict(depth=CLASSIFIER_ARCHS[arch], norm="frozen_bn")
    )
    if num_classes is not None:
      config.model.roi_heads.num_classes = int(num_classes)
  return config


def _torch_key(path: tuple[str, ...], body: str, box_convs: int = 0) -> tuple[str, str]:
  """(torchvision key, kind) of a segjax variable path (collection dropped); kind is how the
  array converts (`_convert_array`): "kernel", "fc6", "upconv" or "vector". `box_convs`: the
  box head's conv count (torchvision `FastRCNNConvFCHead` when positive, else `TwoMLPHead`).

  A conv with a norm is torchvision's `Conv2dNormActivation` `i`: segjax `{name}` -> `i.0`,
  `{name}_norm` -> `i.1`."""
  *module, leaf = path
  top = module[0] if module else ""
  if top == "backbone":
    names = {
      "stem_conv": "conv1",
      "stem_norm": "bn1",
      "shortcut": "downsample.0",
      "shortcut_norm": "downsample.1",
    }
    if len(module) == 2:
      name = names[module[1]]
    else:
      stage, block = re.fullmatch(r"res(\d)_(\d+)", module[1]).groups()
      layer = names.get(module[2]) or re.sub(r"^norm", "bn", module[2])
      name = f"layer{int(stage) - 1}.{block}.{layer}"
    prefix = body + name
  elif top == "fpn":
    kind, level, norm = re.fullmatch(r"(lateral|output)_(\d)(_norm)?", module[1]).groups()
    blocks = {"lateral": "inner_blocks", "output": "layer_blocks"}[kind]
    prefix = f"backbone.fpn.{blocks}.{int(level) - 2}.{int(bool(norm))}"
  elif top == "rpn":
    conv = re.fullmatch(r"conv(\d*)", module[1])
    prefix = "rpn.head." + (
      f"conv.{int(conv[1] or 1) - 1}.0"
      if conv
      else {"objectness_logits": "cls_logits", "anchor_deltas": "bbox_pred"}[module[1]]
    )
  elif module[:2] == ["roi_heads", "box_head"]:
    conv = re.fullmatch(r"conv(\d+)(_norm)?", module[2])
    fc = re.fullmatch(r"fc(\d+)", module[2])
    if conv:
      prefix = f"roi_heads.box_head.{int(conv[1]) - 1}.{int(bool(conv[2]))}"
    elif fc and box_convs:  # Sequential: convs, Flatten, then (Linear, ReLU) pairs.
      prefix = f"roi_heads.box_head.{box_convs + 1 + 2 * (int(fc[1]) - 1)}"
    elif fc:
      prefix = f"roi_heads.box_head.fc{int(fc[1]) + 5}"
    else:
      prefix = (
        "roi_heads.box_predictor." + {"cls_score": "cls_score", "bbox_pred": "bbox_pred"}[module[2]]
      )
  elif module[:2] == ["roi_heads", "mask_head"]:
    fcn = re.fullmatch(r"mask_fcn(\d+)(_norm)?", module[2])
    prefix = (
      f"roi_heads.mask_head.{int(fcn[1]) - 1}.{int(bool(fcn[2]))}"
      if fcn
      else "roi_heads.mask_predictor."
      + {"deconv": "conv5_mask", "predictor": "mask_fcn_logits"}[module[2]]
    )
  else:
    raise KeyError(path)
  if leaf in BN_LEAVES:  # FrozenBatchNorm or BatchNorm; their "bias" is the norm's bias too.
    return f"{prefix}.{BN_LEAVES[leaf]}", "vector"
  if leaf == "bias":
    return f"{prefix}.bias", "vector"
  kind = {"fc1": "fc6", "deconv": "upconv"}.get(module[-1], "kernel")
  return f"{prefix}.weight", kind


def _convert_array(
  value: np.ndarray, kind: str, shape: tuple[int, ...], pooled: tuple[int, int, int]
) -> np.ndarray | None:
  """`value` in torch layout to segjax's layout of `shape`, or None where they cannot agree.

  `pooled` is the box head's `(h, w, C)` ROI, which fc6 reads flattened.
  """
  if kind == "kernel" and value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  elif kind == "kernel" and value.ndim == 2:
    value = value.T
  elif kind == "upconv" and value.ndim == 4:
    value = value.transpose(2, 3, 0, 1)[::-1, ::-1]  # (I, O, a, b) -> kernel[1 - a, 1 - b]
  elif kind == "fc6" and value.shape == (shape[-1], int(np.prod(pooled))):
    h, w, c = pooled
    value = value.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)
  return np.ascontiguousarray(value) if value.shape == tuple(shape) else None


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a `.pth`/`.pt` (torch, `weights_only`), `.safetensors` or `.npz` file, as
  float32 (floating) or their own dtype (integers) NumPy arrays by key."""
  ext = os.path.splitext(path)[1].lower()
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Weights file {path} does not exist.")
  if ext == ".npz":
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if ext == ".safetensors":
    from safetensors.numpy import load_file  # Optional: pip install segjax[torch]

    return load_file(path)
  if ext not in (".pth", ".pt"):
    raise ValueError(
      f"{path}: unknown weights format {ext!r}; expected .pth, .pt, .safetensors or .npz."
    )
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"Reading {path} needs torch: pip install 'segjax[torch]' (or convert "
      "the file to .safetensors or .npz where torch is installed)."
    ) from e
  data = torch.load(path, map_location="cpu", weights_only=True)
  # Training scripts (torchvision's references among them) wrap the state dict.
  for wrapper in ("model", "state_dict"):
    if isinstance(data, Mapping) and isinstance(data.get(wrapper), Mapping):
      data = data[wrapper]
  if not isinstance(data, Mapping):
    raise ValueError(f"{path} holds a {type(data).__name__}, not a state dict.")
  out = {}
  for key, value in data.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(
        f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
        "pass a model's state_dict."
      )
    value = value.detach().cpu()
    out[key] = (value.float() if value.is_floating_point() else value).numpy()
  return out


def normalize_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Current torchvision key names: a `module.` prefix (DataParallel) on every key removed,
  older names (`LEGACY_KEYS`) renamed. Raises ValueError when two keys end up the same."""
  keys = list(state_dict)
  strip = bool(keys) and all(k.startswith("module.") for k in keys)
  out: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    new = key[len("module.") :] if strip else key
    for pattern, rename in LEGACY_KEYS:
      if m := re.match(pattern, new):
        new = rename(m)
    if new in out:
      raise ValueError(f"Key {key!r} duplicates {new!r} (old and new torchvision names).")
    out[new] = value
  return out


def dropped_keys(keys, arch: str) -> list[str]:
  """Keys deliberately left out: BatchNorm step counters and the ImageNet classifier."""
  classifier = arch in CLASSIFIER_ARCHS
  return sorted(
    k
    for k in keys
    if k.endswith("num_batches_tracked") or (classifier and re.fullmatch(r"fc\.(weight|bias)", k))
  )


def detection_arch_of(state_dict: Mapping[str, np.ndarray]) -> str | None:
  """The Mask R-CNN arch whose box head a state dict's keys show, or None."""
  keys = normalize_keys(state_dict)
  if "roi_heads.box_head.fc6.weight" in keys:
    return "maskrcnn_resnet50_fpn"
  if "roi_heads.box_head.5.weight" in keys:
    return "maskrcnn_resnet50_fpn_v2"
  return None


def num_classes_in(state_dict: Mapping[str, np.ndarray]) -> int | None:
  """segjax's K of a torchvision detection state dict: class-score rows less background."""
  w = normalize_keys(state_dict).get("roi_heads.box_predictor.cls_score.weight")
  return None if w is None else int(w.shape[0]) - 1


def abstract_variables(config: ml_collections.ConfigDict):
  """(model, shapes of its variables) for `config.model`, without computing anything."""
  from segjax.models import create_model

  model = create_model(config.model)
  init = functools.partial(model.init, train=False, method=type(model).initialize)
  # Variable shapes do not depend on the image size.
  return model, jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def convert_with_config(
  state_dict: Mapping[str, np.ndarray], arch: str, num_classes: int | None = None
):
  """(variables, config, dropped keys): `convert` with the config it built and the keys it
  left out on purpose (`dropped_keys`)."""
  from flax import traverse_util

  _check_arch(arch)
  state_dict = normalize_keys(state_dict)
  if arch in DETECTION_ARCHS and num_classes is None:
    num_classes = num_classes_in(state_dict)
  config = model_config(arch, num_classes)
  model, abstract = abstract_variables(config)
  targets = traverse_util.flatten_dict(abstract)
  if arch in CLASSIFIER_ARCHS:
    targets = {p: t for p, t in targets.items() if p[1] == "backbone"}
  body = "backbone.body." if arch in DETECTION_ARCHS else ""
  r, box_convs = model.roi_heads.box_resolution, model.roi_heads.box_conv_dims
  pooled = (r, r, box_convs[-1] if box_convs else model.fpn.out_channels)  # What fc1 reads.
  dropped = dropped_keys(state_dict, arch)
  out, used, missing, wrong, unmapped = {}, set(), [], [], []
  for path, target in targets.items():
    try:
      key, kind = _torch_key(path[1:], body, len(box_convs))
    except (KeyError, AttributeError):
      unmapped.append("/".join(path))
      continue
    if key not in state_dict:
      missing.append(f"{key} (for {'/'.join(path)})")
      continue
    used.add(key)
    value = np.asarray(state_dict[key], np.float32)
    array = _convert_array(value, kind, target.shape, pooled)
    if array is None:
      wrong.append(f"{key} {tuple(value.shape)} -> {'/'.join(path)} {tuple(target.shape)}")
      continue
    out[path] = array.astype(target.dtype)
  unused = sorted(set(state_dict) - used - set(dropped))
  problems = [
    f"{what}: {items}"
    for what, items in (
      ("keys missing from the file", missing),
      ("keys of the file that map nowhere", unused),
      ("shapes that disagree", wrong),
      ("segjax variables with no torchvision name", unmapped),
    )
    if items
  ]
  if problems:
    hint = (
      " (a different class count? pass num_classes)" if any("predictor" in w for w in wrong) else ""
    )
    if (guess := detection_arch_of(state_dict)) not in (None, arch):
      hint = f" (its keys are those of {guess!r})"
    raise ValueError(f"Cannot convert these weights as {arch!r}{hint}: " + "; ".join(problems))
  return traverse_util.unflatten_dict(out), config, dropped


def convert(
  state_dict: Mapping[str, np.ndarray], arch: str, num_classes: int | None = None
) -> dict:
  """`{"params": ..., "batch_stats": ...}` NumPy trees of `model_config(arch, K)`'s model from a
  torchvision state dict (see the module docstring for the mapping).

  Every segjax variable is filled (for the ImageNet ResNets: every variable under "backbone",
  the only subtree returned), every tensor of the file is used exactly once except
  `dropped_keys`. K defaults to the file's (`num_classes_in`).

  Raises:
    ValueError: naming missing, unused or misshapen keys.
  """
  return convert_with_config(state_dict, arch, num_classes)[0]


def import_weights(
  arch: str, input_path: str, workdir: str, num_classes: int | None = None
) -> dict:
  """Writes `workdir/config.json` and the checkpoint `workdir/checkpoints/0/` of a fresh train
  state (`create_train_state`, `config.seed`) holding the converted variables. Returns a
  summary: arch, input, num_classes, imported and fresh leaf counts, dropped keys."""
  from flax import traverse_util

  from segjax.models import build_model
  from segjax.train import checkpoint
  from segjax.train.state import TrainState, create_train_state

  variables, config, dropped = convert_with_config(read_state_dict(input_path), arch, num_classes)
  manager = checkpoint.checkpoint_manager(workdir, save_every_steps=config.checkpoint_every_steps)
  with manager:
    if manager.latest_step() is not None:
      raise FileExistsError(
        f"{workdir} already has a checkpoint (step "
        f"{manager.latest_step()}); import into a new directory."
      )
    model = build_model(config)
    sample = jnp.zeros((1, 64, 64, 3), jnp.float32)  # Variable shapes ignore the image size.
    init = jax.jit(functools.partial(create_train_state, model, config, sample_input=sample))
    rng = jax.random.key(config.seed)
    state = jax.eval_shape(init, rng)
    fresh = {c: traverse_util.flatten_dict(getattr(state, c)) for c in ("params", "batch_stats")}
    imported = {
      (c, *p): v
      for c, tree in variables.items()
      for p, v in traverse_util.flatten_dict(tree).items()
    }
    if len(imported) < sum(len(f) for f in fresh.values()):
      state = init(rng)  # Only what the file lacks needs initialising (compiles the model).
      fresh = {c: traverse_util.flatten_dict(getattr(state, c)) for c in fresh}
    for (collection, *path), value in imported.items():
      fresh[collection][tuple(path)] = jnp.asarray(value)
    params, batch_stats = (traverse_util.unflatten_dict(fresh[c]) for c in fresh)
    # A fresh optimizer state, as `create_train_state` builds it, on the imported parameters.
    state = TrainState.create(
      apply_fn=model.apply, params=params, batch_stats=batch_stats, tx=state.tx
    )
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    checkpoint.save(manager, 0, state, force=True)
  total = sum(len(f) for f in fresh.values())
  summary = {
    "arch": arch,
    "input": os.path.abspath(input_path),
    "num_classes": config.model.roi_heads.num_classes,
    "imported_leaves": len(imported),
    "fresh_leaves": total - len(imported),
    "dropped_keys": dropped,
  }
  with open(os.path.join(workdir, "import.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_enum("arch", None, list(ARCHS), "torchvision architecture of the file.")
  flags.DEFINE_string("input", None, "Weights file: .pth/.pt (needs torch), .safetensors, .npz.")
  flags.DEFINE_string("workdir", None, "New directory for config.json and checkpoints/0/.")
  flags.DEFINE_integer(
    "num_classes",
    None,
    "segjax's roi_heads.num_classes (background "
    "excluded); default: the file's (90 for torchvision's COCO model).",
  )
  flags.mark_flags_as_required(["arch", "input", "workdir"])


def main(argv) -> None:
  from absl import flags

  from segjax import cli

  del argv
  cli.quiet_logging()
  f = flags.FLAGS
  summary = import_weights(f.arch, f.input, f.workdir, f.num_classes)
  print(
    f"Imported {summary['imported_leaves']} variables of {f.arch} from {f.input} into "
    f"{f.workdir}/checkpoints/0 ({summary['fresh_leaves']} freshly initialised, "
    f"roi_heads.num_classes={summary['num_classes']}).",
    flush=True,
  )
  if summary["dropped_keys"]:
    print(f"Left out of the file on purpose: {summary['dropped_keys']}", flush=True)
  print(
    f"Fine-tune: python train.py --config CONFIG --workdir NEW_DIR --config.init_from={f.workdir}",
    flush=True,
  )


if __name__ == "__main__":
  from segjax import cli

  _define_flags()
  cli.run(main)
