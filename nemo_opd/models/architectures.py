"""Supported Hugging Face decoder architectures, as data.

Each entry says how one ``config.json`` family maps onto megatron-core's ``GPTModel`` beyond the
fields every Llama-like model shares (see :mod:`nemo_opd.models.hf_import`). Adding a family that
ModelOpt's importer already knows (``modelopt.torch.export.plugins.mcore_common``) is one entry.
"""

from __future__ import annotations

import dataclasses

__all__ = ["ArchitectureTraits", "ARCHITECTURES", "architecture_traits"]


@dataclasses.dataclass(frozen=True)
class ArchitectureTraits:
    """How an HF architecture differs from plain Llama."""

    qk_layernorm: bool = False
    """RMSNorm on per-head queries and keys (Qwen3)."""

    qkv_bias_field: str | None = None
    """HF config field saying whether q/k/v projections have a bias (``attention_bias``), or None
    when the family never has one."""

    default_qkv_bias: bool = False
    """Bias on q/k/v when the config does not say (Qwen2 always has one)."""

    moe: bool = False
    """Mixture-of-experts MLPs (``num_experts``, ``num_experts_per_tok``,
    ``moe_intermediate_size``, ``decoder_sparse_step``, ``mlp_only_layers``, ``norm_topk_prob``;
    no shared experts), built with megatron-core's MoE layers."""


ARCHITECTURES: dict[str, ArchitectureTraits] = {
    "LlamaForCausalLM": ArchitectureTraits(qkv_bias_field="attention_bias"),
    "Qwen2ForCausalLM": ArchitectureTraits(default_qkv_bias=True),
    "Qwen3ForCausalLM": ArchitectureTraits(qk_layernorm=True, qkv_bias_field="attention_bias"),
    "Qwen3MoeForCausalLM": ArchitectureTraits(qk_layernorm=True, qkv_bias_field="attention_bias",
                                              moe=True),
}


def architecture_traits(architecture: str) -> ArchitectureTraits:
    """Traits of ``architecture``; raises ``ValueError`` listing the supported ones."""
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(
            f"unsupported architecture {architecture!r}: no mapping onto megatron-core's "
            f"GPTModel here or in ModelOpt's importer; supported: {supported}"
        ) from None
