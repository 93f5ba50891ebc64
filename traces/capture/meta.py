"""The trace metadata of a captured model, read off the loaded model itself.

Layers, experts per layer and top-k come from the routers; expert sizes from the actual
parameter tensors of the routed experts (shape x element size, so quantised or mixed-precision
checkpoints count what they really hold); shared experts from the MoE blocks.
"""

from __future__ import annotations

import torch

from traces.capture.routers import Arch, MoeLayer
from traces.format import TraceMeta


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (element size x count, as stored)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return int(sum(t.numel() * t.element_size() for t in tensors))


def expert_bytes(layer: MoeLayer) -> int:
    """Bytes of one routed expert of ``layer``.

    Experts held as separate modules (Switch: a ModuleDict) count the first one; experts fused
    into stacked tensors (``gate_up_proj[E, ...]``, ``down_proj[E, ...]``, biases, quantised
    blocks and scales) count the total divided by the number of experts.
    """
    experts = layer.experts
    children = list(experts.children())
    if isinstance(experts, torch.nn.ModuleDict | torch.nn.ModuleList) and children:
        return module_bytes(children[0])
    return max(1, module_bytes(experts) // layer.num_experts)


def shared_experts(layer: MoeLayer, arch: Arch, config) -> tuple[int, int]:
    """``(count, bytes of one)`` of the layer's shared experts; ``(0, 0)`` where none.

    DeepSeek fuses its ``n_shared_experts`` shared experts into one MLP: its bytes are split
    evenly. Qwen2-MoE has one shared expert (its sigmoid gate, a ``hidden x 1`` vector, is not
    counted).
    """
    if layer.shared is None:
        return 0, 0
    count = int(getattr(config, arch.shared_count_key, 1) or 1) if arch.shared_count_key else 1
    return count, module_bytes(layer.shared) // count


def weight_dtype(layers: list[MoeLayer], config) -> str:
    """The routed experts' weight dtype as stored: the dtype of the largest expert tensor
    (``"bfloat16"``; float8 types as ``"float8"``), or the checkpoint's quantisation method
    (``"mxfp4"``, ...) where that tensor holds packed integers."""
    largest = max(layers[0].experts.parameters(), key=lambda t: t.numel(), default=None)
    if largest is None:
        return "bfloat16"
    name = str(largest.dtype).removeprefix("torch.")
    if name.startswith("float8"):
        return "float8"
    if largest.dtype.is_floating_point:
        return name
    quant = getattr(config, "quantization_config", None)
    method = (
        quant.get("quant_method")
        if isinstance(quant, dict)
        else getattr(quant, "quant_method", None)
    )
    return str(getattr(method, "value", method)) if method else name


def build_meta(
    name: str, config, arch: Arch, layers: list[MoeLayer], *, source: str, extra: dict
) -> TraceMeta:
    """The :class:`TraceMeta` of a capture of ``layers`` (metadata validated)."""
    shared = [shared_experts(layer, arch, config) for layer in layers]
    tops = {layer.top_k for layer in layers}
    meta = TraceMeta(
        model=name,
        num_layers=len(layers),
        experts_per_layer=[layer.num_experts for layer in layers],
        top_k=None if arch.dynamic_top_k or len(tops) != 1 else tops.pop(),
        expert_bytes=[expert_bytes(layer) for layer in layers],
        shared_experts=[count for count, _ in shared],
        shared_expert_bytes=max((b for _, b in shared), default=0),
        dtype=weight_dtype(layers, config),
        source=source,
        layer_ids=[layer.model_layer for layer in layers],
        steps="native",
        extra={
            "architecture": arch.model_type,
            "moe_modules": [layer.name for layer in layers],
            **(
                {"layer_stacks": [layer.stack for layer in layers]}
                if len({layer.stack for layer in layers}) > 1
                else {}
            ),
            **extra,
        },
    )
    meta.validate(name)
    return meta
