"""Pretrained weights from other frameworks, converted to segjax's variables and checkpoints.

`segjax.weights.torchvision`: torchvision's `maskrcnn_resnet50_fpn` and its ImageNet ResNets,
from `.pth`/`.pt` (torch), `.safetensors` or `.npz` files the user downloaded; also the
command `python -m segjax.weights.torchvision` that writes a workdir to fine-tune from.
"""
