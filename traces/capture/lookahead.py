"""Gate lookahead: the experts later layers' gates would pick from an earlier hidden state.

Speculative expert loading (mixtral-offloading), Pre-gated MoE and HOBBIT apply the gate of
layer ``l + j`` to the hidden state that enters layer ``l``'s gate, to start fetching layer
``l + j``'s experts ``j`` layers ahead. With ``--lookahead H`` the recorder does the same for
``j = 1..H`` at every MoE layer and token: layer ``l + j``'s router module runs on layer
``l``'s router input (exactly what the model fed layer ``l``'s router, already normalised by
layer ``l``'s norm) and its choice becomes the ``pred_h{j}`` entry of the row (token,
layer ``l + j``). Rows of the first ``j`` MoE layers of a stack have no ``pred_h{j}`` entry
(null). Lookahead never crosses from an encoder to a decoder (their tokens differ).
"""

from __future__ import annotations

import torch

from traces.capture.routers import Arch, MoeLayer, predict


def targets(layers: list[MoeLayer], horizon: int) -> list[list[tuple[int, MoeLayer]]]:
    """For each layer, the ``(j, layer l + j)`` pairs it predicts, ``j = 1..horizon``."""
    out = []
    for i, layer in enumerate(layers):
        ahead = []
        for j in range(1, horizon + 1):
            if i + j < len(layers) and layers[i + j].stack == layer.stack:
                ahead.append((j, layers[i + j]))
        out.append(ahead)
    return out


def lookahead(
    arch: Arch, hidden: torch.Tensor, ahead: list[tuple[int, MoeLayer]]
) -> dict[int, torch.Tensor]:
    """``{j: experts[N, k]}`` that the routers of ``ahead`` pick for ``hidden`` (no sync).

    ``hidden`` is the router input of the current layer, any shape ending in the hidden size.
    """
    if not ahead:
        return {}
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = {}
    with torch.no_grad():
        for j, layer in ahead:
            device = next(layer.router.parameters()).device  # layers may sit on other GPUs
            out[j] = predict(arch, layer.router, flat.to(device), layer.name).to(hidden.device)
    return out
