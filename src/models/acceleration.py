"""Speed options applied to a built model from outside: ``torch.compile`` and channels-last.

Neither changes the state dict or the values (up to floating-point rounding), so checkpoints
written with and without them are interchangeable. The Lightning module applies them in
``configure_model`` (``module.compile_experts``, ``module.channels_last``); the benchmark
applies them to the models it times.
"""

from __future__ import annotations

import torch
from torch import nn

from src.models.anomalymoe import AnomalyMoE


def _to_channels_last(_module: nn.Module, args: tuple) -> tuple:
    image, *rest = args
    return (image.contiguous(memory_format=torch.channels_last), *rest)


def accelerate(
    net: AnomalyMoE, channels_last: bool = False, compile_experts: bool = False, compile_backend: str = "inductor"
) -> AnomalyMoE:
    """Apply the speed options to ``net`` in place (call once per model); returns ``net``.

    channels_last: the convolutional global experts' weights and inputs in channels-last
        memory format (faster convolutions on recent GPUs).
    compile_experts: ``torch.compile`` each patch and global expert with ``compile_backend``;
        dynamic shapes, since sparse dispatch gives each expert a varying number of images.
    """
    if channels_last:
        net.global_experts.to(memory_format=torch.channels_last)
        for expert in net.global_experts:
            expert.register_forward_pre_hook(_to_channels_last)
    if compile_experts:
        for expert in [*net.patch_experts, *net.global_experts]:
            expert.compile(dynamic=True, backend=compile_backend)  # in place: parameter names unchanged
    return net

