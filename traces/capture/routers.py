"""Each supported architecture's MoE layers: where the router is, and what it chose.

transformers (>= 5) implements every supported model's router as a module of its own, called
once per MoE layer and forward pass, that returns the experts it routed each token to and their
gate weights after the architecture's own rule (softmax then top-k for Mixtral, OLMoE and
Qwen, with Qwen's and OLMoE's ``norm_topk_prob``; DeepSeek-V2's greedy or group-limited greedy
top-k times ``routed_scaling_factor``; DeepSeek-V3's sigmoid scores with the correction bias,
group-limited choice, normalisation and scaling; GPT-OSS's top-k of the logits then softmax
over the k; Switch's top-1 with an expert capacity). The recorder reads exactly those outputs,
so a trace holds what the model computed, never a re-derivation.

Two things are normalised here: experts are put in rank order (descending gate weight, ties
in the router's order; DeepSeek's top-k is unsorted), and Switch's capacity drops (a token
over its expert's capacity goes to no expert) become an empty expert list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from traces.capture import CaptureError
from traces.errors import ConfigError

#: Output forms of router modules: ``topk`` returns ``(logits, weights[N,k], experts[N,k])``;
#: ``switch`` returns ``(one_hot[..., E] after capacity, probability[..., 1], logits)``.
TOPK, SWITCH = "topk", "switch"


@dataclass(frozen=True)
class Arch:
    """How one transformers model type lays out its MoE layers.

    Attributes:
        model_type: the ``config.model_type`` it applies to.
        label: the architecture's name for messages.
        router_attr: attribute of the MoE block holding the router module.
        output: the router's output form (:data:`TOPK` or :data:`SWITCH`).
        shared_attr: attribute of the MoE block holding the shared expert(s), if any.
        shared_count_key: config key with the number of shared experts fused in that module
            (None: one).
    """

    model_type: str
    label: str
    router_attr: str = "gate"
    output: str = TOPK
    shared_attr: str | None = None
    shared_count_key: str | None = None

    @property
    def dynamic_top_k(self) -> bool:
        """True where a token may be routed to fewer than top_k experts (Switch's capacity)."""
        return self.output == SWITCH


ARCHS: dict[str, Arch] = {
    a.model_type: a
    for a in [
        Arch("mixtral", "Mixtral"),
        Arch("qwen2_moe", "Qwen2-MoE", shared_attr="shared_expert"),
        Arch("qwen3_moe", "Qwen3-MoE"),
        Arch("olmoe", "OLMoE"),
        Arch(
            "deepseek_v2",
            "DeepSeek-V2",
            shared_attr="shared_experts",
            shared_count_key="n_shared_experts",
        ),
        Arch(
            "deepseek_v3",
            "DeepSeek-V3",
            shared_attr="shared_experts",
            shared_count_key="n_shared_experts",
        ),
        Arch("gpt_oss", "GPT-OSS", router_attr="router"),
        Arch("switch_transformers", "Switch Transformers", router_attr="router", output=SWITCH),
    ]
}


def get_arch(model_type: str, where: str) -> Arch:
    """The :class:`Arch` of ``model_type``; ConfigError listing the supported ones."""
    arch = ARCHS.get(model_type)
    if arch is None:
        raise ConfigError(
            f"{where}: model type {model_type!r} is not supported by moesim capture (expected "
            f"one of {', '.join(sorted(ARCHS))})"
        )
    return arch


@dataclass
class MoeLayer:
    """One MoE layer of a loaded model.

    Attributes:
        index: the trace's layer id (MoE layers counted from 0, encoder before decoder).
        name: module path of the MoE block, e.g. ``model.layers.3.mlp``.
        block, router, experts: the MoE block, its router and its routed experts.
        shared: the shared-expert module, or None.
        model_layer: the model's own layer number (label; decoder layers of an encoder-decoder
            model are numbered after the encoder's).
        stack: ``"decoder"`` or ``"encoder"`` (lookahead never crosses stacks).
        num_experts: routed experts; top_k: experts per token (None: dynamic, Switch).
    """

    index: int
    name: str
    block: torch.nn.Module
    router: torch.nn.Module
    experts: torch.nn.Module
    shared: torch.nn.Module | None
    model_layer: int
    stack: str
    num_experts: int
    top_k: int | None


_LAYER_NUM = re.compile(r"\.(\d+)(?:\.|$)")


def find_moe_layers(model: torch.nn.Module, arch: Arch, where: str) -> list[MoeLayer]:
    """The MoE layers of ``model`` in forward order (ConfigError when there are none).

    A module is an MoE block when it holds a ``router_attr`` child and an ``experts`` child.
    """
    found = []
    for name, module in model.named_modules():
        router = getattr(module, arch.router_attr, None)
        experts = getattr(module, "experts", None)
        if not isinstance(router, torch.nn.Module) or not isinstance(experts, torch.nn.Module):
            continue
        if not type(router).__name__.lower().endswith("router"):
            continue
        found.append((name, module, router, experts))
    if not found:
        raise ConfigError(
            f"{where}: found no {arch.label} MoE layers (modules with a '{arch.router_attr}' "
            f"router and 'experts'); is this a {arch.label} checkpoint?"
        )
    stacks = [_stack(name) for name, *_ in found]
    encoder_blocks = _stack_depth(model, "encoder") if "encoder" in stacks else 0
    layers = []
    for i, ((name, block, router, experts), stack) in enumerate(zip(found, stacks, strict=True)):
        num = _layer_number(name)
        if stack == "decoder":
            num += encoder_blocks
        n_exp = getattr(router, "num_experts", None)
        top_k = None if arch.dynamic_top_k else getattr(router, "top_k", None)
        if not isinstance(n_exp, int) or (not arch.dynamic_top_k and not isinstance(top_k, int)):
            raise ConfigError(
                f"{where}: router {name}.{arch.router_attr} lacks 'num_experts'/'top_k' "
                f"(unsupported transformers version?)"
            )
        shared = getattr(block, arch.shared_attr, None) if arch.shared_attr else None
        layers.append(
            MoeLayer(
                index=i,
                name=name,
                block=block,
                router=router,
                experts=experts,
                shared=shared if isinstance(shared, torch.nn.Module) else None,
                model_layer=num,
                stack=stack,
                num_experts=n_exp,
                top_k=top_k,
            )
        )
    return layers


def _stack(name: str) -> str:
    return "encoder" if name.startswith("encoder.") or ".encoder." in name else "decoder"


def _layer_number(name: str) -> int:
    """The first list index in a module path (``model.layers.3.mlp`` -> 3); 0 if none."""
    m = _LAYER_NUM.search("." + name)
    return int(m.group(1)) if m else 0


def _stack_depth(model: torch.nn.Module, stack: str) -> int:
    """Number of blocks of an encoder-decoder model's ``stack`` (0 when there is none)."""
    sub = getattr(model, stack, None)
    blocks = getattr(sub, "block", None) or getattr(sub, "layers", None)
    return len(blocks) if blocks is not None else 0


def read_choice(arch: Arch, output, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts and gate weights a router's ``output`` holds, per token, in rank order.

    Returns ``(experts, weights)``: ``int64[N, k]`` and ``float32[N, k]`` on the router's
    device, one row per token of the forward pass (batch-major); an expert id of -1 marks a
    slot with no expert (a token dropped by Switch's capacity limit). No device sync.
    """
    if not isinstance(output, tuple) or len(output) != 3:
        raise CaptureError(
            f"{where}: router returned {type(output).__name__}, expected a tuple of 3 tensors "
            "(unsupported transformers version?)"
        )
    if arch.output == TOPK:
        _, weights, experts = output
        experts = experts.reshape(-1, experts.shape[-1]).long()
        weights = weights.reshape(-1, weights.shape[-1]).float()
    else:
        one_hot, prob, _ = output
        one_hot = one_hot.reshape(-1, one_hot.shape[-1])
        kept = one_hot.sum(dim=-1, keepdim=True) > 0
        experts = torch.where(kept, one_hot.argmax(dim=-1, keepdim=True), -1).long()
        weights = prob.reshape(-1, 1).float()
    if experts.shape != weights.shape:
        raise CaptureError(
            f"{where}: router returned experts {tuple(experts.shape)} and weights "
            f"{tuple(weights.shape)}, expected the same shape"
        )
    weights, order = torch.sort(weights, dim=-1, descending=True, stable=True)
    return experts.gather(-1, order), weights


def predict(arch: Arch, router: torch.nn.Module, hidden: torch.Tensor, where: str) -> torch.Tensor:
    """Experts ``router`` would pick for ``hidden`` (``[N, hidden]``), in rank order.

    ``int64[N, k]``. Used for gate lookahead: top-k routers run their own rule; Switch's
    router is read without its capacity limit (its top-1 of the logits), since a prediction
    does not know which other tokens compete for the expert.
    """
    output = router(hidden)
    if arch.output == SWITCH:
        if not isinstance(output, tuple) or len(output) != 3:
            raise CaptureError(f"{where}: router returned {type(output).__name__}, expected 3")
        logits = output[2]
        return logits.reshape(-1, logits.shape[-1]).argmax(dim=-1, keepdim=True).long()
    return read_choice(arch, output, where)[0]
