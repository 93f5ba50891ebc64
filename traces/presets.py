"""Model presets: the MoE shapes and expert sizes of models the field studies.

Expert bytes are computed from the model's own configuration: a gated (SwiGLU) expert holds
three ``hidden x ffn`` matrices, a plain (ReLU/GELU) one two; bytes = params x bytes per element.
"""

from __future__ import annotations

from dataclasses import dataclass

from traces.errors import ConfigError

DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "float8": 1.0, "int8": 1.0,
                "mxfp4": 0.53125, "int4": 0.5}  # fmt: skip


@dataclass(frozen=True)
class ModelPreset:
    """Shape of an MoE model as the simulator needs it.

    Attributes:
        name: short preset name (``moesim synth --model NAME``).
        hf_id: the Hugging Face model id it describes.
        num_layers: MoE layers (dense layers are not counted).
        experts: routed experts per MoE layer.
        top_k: routed experts per token.
        hidden: model (residual) width.
        ffn: intermediate width of one routed expert.
        gated: True for SwiGLU experts (3 matrices), False for 2-matrix experts.
        shared_experts: always-active shared experts per layer (size ``shared_ffn`` each).
        shared_ffn: intermediate width of one shared expert.
        dtype: weight dtype for byte sizes.
    """

    name: str
    hf_id: str
    num_layers: int
    experts: int
    top_k: int
    hidden: int
    ffn: int
    gated: bool = True
    shared_experts: int = 0
    shared_ffn: int = 0
    dtype: str = "bfloat16"

    @property
    def expert_params(self) -> int:
        return (3 if self.gated else 2) * self.hidden * self.ffn

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert's weights in ``dtype``."""
        return int(self.expert_params * DTYPE_BYTES[self.dtype])

    @property
    def shared_expert_bytes(self) -> int:
        return int((3 if self.gated else 2) * self.hidden * self.shared_ffn
                   * DTYPE_BYTES[self.dtype])  # fmt: skip

    @property
    def expert_flops_per_token(self) -> float:
        """Floating-point operations of one routed expert on one token (2 per multiply-add)."""
        return 2.0 * self.expert_params

    @property
    def total_experts(self) -> int:
        return self.num_layers * self.experts


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        ModelPreset("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", 32, 8, 2, 4096, 14336),
        ModelPreset(
            "deepseek-v2-lite",
            "deepseek-ai/DeepSeek-V2-Lite",
            26,
            64,
            6,
            2048,
            1408,
            shared_experts=2,
            shared_ffn=1408,
        ),
        ModelPreset(
            "qwen1.5-moe-a2.7b",
            "Qwen/Qwen1.5-MoE-A2.7B",
            24,
            60,
            4,
            2048,
            1408,
            shared_experts=4,
            shared_ffn=1408,
        ),
        ModelPreset("olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924", 16, 64, 8, 2048, 1024),
        ModelPreset(
            "switch-base-128", "google/switch-base-128", 12, 128, 1, 768, 3072, gated=False
        ),
        ModelPreset(
            "flame-moe-290m",
            "CMU-FLAME/FLAME-MoE-290M",
            8,
            64,
            6,
            512,
            1408,
            shared_experts=2,
            shared_ffn=1408,
        ),
        ModelPreset(
            "deepseek-v3",
            "deepseek-ai/DeepSeek-V3",
            58,
            256,
            8,
            7168,
            2048,
            shared_experts=1,
            shared_ffn=2048,
            dtype="float8",
        ),
        ModelPreset("gpt-oss-20b", "openai/gpt-oss-20b", 24, 32, 4, 2880, 2880, dtype="mxfp4"),
    ]  # fmt: skip
}


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name`` (case-insensitive); ConfigError listing the known ones."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}': expected one of {', '.join(PRESETS)}")
    return PRESETS[key]
