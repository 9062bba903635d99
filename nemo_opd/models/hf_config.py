"""What an HF ``config.json`` says about a decoder, read without touching a weight.

:func:`read_hf_config` turns ``config.json`` into an :class:`HFModelConfig` and refuses, naming
the field, what megatron-core cannot reproduce exactly: an unmapped architecture, a RoPE scaling
megatron does not implement, sliding-window attention. :func:`check_parallel_fits` says whether a
layout shards the model. Both run before any model is built (and in the memory planner, which
never imports a weight).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from nemo_opd.models.architectures import architecture_traits
from nemo_opd.runtime import ParallelConfig

__all__ = ["HFModelConfig", "read_hf_config", "check_parallel_fits"]

# megatron's llama3 RoPE scaling hard-codes these (RotaryEmbedding._apply_scaling).
_MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}


@dataclasses.dataclass(frozen=True)
class HFModelConfig:
    """The fields of an HF ``config.json`` that shape a megatron ``GPTModel``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    """Width of the dense MLPs (``intermediate_size``)."""
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling_factor: float | None
    tie_word_embeddings: bool
    max_position_embeddings: int
    qkv_bias: bool
    qk_layernorm: bool
    num_experts: int = 0
    """Routed experts of each MoE layer; 0 for a dense model."""
    experts_per_token: int = 0
    """Experts each token is routed to (``num_experts_per_tok``, megatron's router top-k)."""
    moe_ffn_hidden_size: int = 0
    """Width of each expert's gated MLP (``moe_intermediate_size``)."""
    moe_layers: tuple[int, ...] = ()
    """0-based indices of the MoE layers; the others have the dense MLP. HF's rule: layer ``i``
    is sparse unless it is in ``mlp_only_layers``, when ``(i + 1) % decoder_sparse_step == 0``."""
    norm_topk_prob: bool = True
    """Renormalise the top-k routing probabilities to sum to 1 (else they stay softmax over all
    experts)."""

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    def padded_vocab_size(self, tensor_model_parallel_size: int) -> int:
        """Rows of the embedding and output layer at ``tensor_model_parallel_size``: the
        vocabulary rounded up to a multiple of TP (megatron's padding with
        ``make_vocab_size_divisible_by=1``). The extra rows are never a token: their logits are
        masked (:mod:`nemo_opd.models.vocab`)."""
        tp = tensor_model_parallel_size
        return -(-self.vocab_size // tp) * tp


def _rope(raw: dict, config_path: Path) -> tuple[float, float | None]:
    # transformers <5 writes rope_theta + rope_scaling; 5.x writes one rope_parameters dict.
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or params
    theta = float(raw.get("rope_theta", params.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "llama3" and all(
        float(scaling.get(k, v)) == v for k, v in _MEGATRON_LLAMA3_ROPE.items()
    ):
        return theta, float(scaling["factor"])
    raise ValueError(
        f"{config_path}: RoPE scaling {scaling} is not supported; supported: none, or 'llama3' "
        f"with {_MEGATRON_LLAMA3_ROPE} (what megatron-core implements)"
    )


def _sliding_window_layers(raw: dict, num_layers: int) -> list[int]:
    """Layers HF runs with sliding-window attention: ``layer_types`` when written
    (transformers 5), else Qwen2/Qwen3's rule (``use_sliding_window`` and a layer index at
    least ``max_window_layers``)."""
    if raw.get("layer_types"):
        return [i for i, kind in enumerate(raw["layer_types"]) if kind == "sliding_attention"]
    if not raw.get("use_sliding_window") or raw.get("sliding_window") is None:
        return []
    first = int(raw.get("max_window_layers") or 0)
    return list(range(first, num_layers))


def _check_no_sliding_window(raw: dict, num_layers: int, config_path: Path) -> None:
    layers = _sliding_window_layers(raw, num_layers)
    if layers:
        raise ValueError(
            f"{config_path}: sliding-window attention (window {raw.get('sliding_window')}) on "
            f"layers {layers} is not supported: megatron-core's local attention drops the "
            "padding mask when a window is set, so the logits would silently differ from HF's "
            "on inputs longer than the window. If no input is longer than the window, set "
            "use_sliding_window=false (and remove 'sliding_attention' from layer_types) in a "
            "copy of config.json")


def _moe_fields(raw: dict, num_layers: int, config_path: Path) -> dict:
    experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
    if raw.get("shared_expert_intermediate_size") or raw.get("n_shared_experts"):
        raise ValueError(f"{config_path}: shared experts are not supported")
    step = int(raw.get("decoder_sparse_step") or 1)
    dense_only = {int(i) for i in raw.get("mlp_only_layers") or ()}
    try:
        return dict(
            num_experts=experts,
            experts_per_token=int(raw["num_experts_per_tok"]),
            moe_ffn_hidden_size=int(raw["moe_intermediate_size"]),
            moe_layers=tuple(i for i in range(num_layers)
                             if i not in dense_only and (i + 1) % step == 0),
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        )
    except KeyError as err:
        raise ValueError(f"{config_path}: MoE field {err.args[0]!r} is missing") from None


def read_hf_config(model_dir: str | Path) -> HFModelConfig:
    """Parse ``model_dir/config.json``; raises before any weight is touched if it cannot be used."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; expected a Hugging Face model "
                                "directory written by save_pretrained")
    raw = json.loads(config_path.read_text())
    architectures = raw.get("architectures") or []
    if len(architectures) != 1:
        raise ValueError(f"{config_path}: expected exactly one entry in 'architectures', "
                         f"got {architectures!r}")
    traits = architecture_traits(architectures[0])
    heads = int(raw["num_attention_heads"])
    num_layers = int(raw["num_hidden_layers"])
    rope_theta, rope_scaling_factor = _rope(raw, config_path)
    _check_no_sliding_window(raw, num_layers, config_path)
    qkv_bias = traits.default_qkv_bias
    if traits.qkv_bias_field is not None:
        qkv_bias = bool(raw.get(traits.qkv_bias_field, qkv_bias))
    return HFModelConfig(
        architecture=architectures[0],
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        ffn_hidden_size=int(raw["intermediate_size"]),
        num_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling_factor=rope_scaling_factor,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        qkv_bias=qkv_bias,
        qk_layernorm=traits.qk_layernorm,
        **(_moe_fields(raw, num_layers, config_path) if traits.moe else {}),
    )


def check_parallel_fits(config: HFModelConfig, parallel: ParallelConfig) -> None:
    """Raise ``ValueError`` naming the value and the constraint if ``parallel`` cannot shard it.

    The vocabulary need not divide TP: it is padded (:meth:`HFModelConfig.padded_vocab_size`).
    Experts are split by TP and then by EP, as in megatron-core's default expert layout."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    ep = parallel.expert_model_parallel_size
    divisible = [("num_attention_heads", config.num_attention_heads, "tensor", tp),
                 ("num_key_value_heads", config.num_key_value_heads, "tensor", tp),
                 ("num_hidden_layers", config.num_layers, "pipeline", pp)]
    if len(config.moe_layers) < config.num_layers:  # some layer has the dense MLP
        divisible.append(("intermediate_size", config.ffn_hidden_size, "tensor", tp))
    if config.is_moe:
        divisible += [("num_experts", config.num_experts, "expert", ep),
                      ("moe_intermediate_size", config.moe_ffn_hidden_size, "tensor", tp)]
    problems = [f"{name} = {value} is not divisible by {kind}_model_parallel_size = {size}"
                for name, value, kind, size in divisible if value % size]
    if ep > 1 and not config.is_moe:
        problems.append(f"expert_model_parallel_size = {ep} needs an MoE model; "
                        f"{config.architecture} is dense")
    if problems:
        raise ValueError(f"{config.architecture}: parallel layout does not fit the model: "
                         + "; ".join(problems))
