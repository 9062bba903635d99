"""megatron-core ``GPTModel``\\ s from Hugging Face checkpoint directories.

``load_hf_gpt(model_dir, parallel=..., dtype=...)`` reads ``config.json``, checks that the
parallel layout fits the model (before any weight is read), builds a ``GPTModel`` with the
matching ``TransformerConfig`` (megatron's MoE layers for an MoE model) and fills it with
ModelOpt's HF importer, which slices each checkpoint tensor for this rank's TP / EP shard
(:class:`nemo_opd.models.vocab.PaddedVocabImporter`: the same importer, with the vocabulary
rows padded to a multiple of TP).

On CPU the model uses megatron's local layer spec with every fusion off and
``use_cpu_initialization=True``; with CUDA and Transformer Engine installed a model to quantize
(the student) uses the layer spec megatron-core provides for ModelOpt (``get_gpt_modelopt_spec``)
and a frozen one (the teacher) megatron's full Transformer Engine spec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_opd.models.attention import SDPAttention
from nemo_opd.models.hf_config import HFModelConfig, check_parallel_fits, read_hf_config
from nemo_opd.models.vocab import PaddedVocabImporter, mask_padded_vocab
from nemo_opd.runtime import ParallelConfig, model_parallel_layout

__all__ = [
    "HFModelConfig",
    "read_hf_config",
    "RecomputeConfig",
    "check_parallel_features",
    "check_parallel_fits",
    "transformer_config",
    "build_gpt_model",
    "load_hf_gpt",
]

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class RecomputeConfig:
    """Activation recompute of a model that trains (megatron-core's three fields)."""

    granularity: str = "none"
    """"none", "selective" (the attention core) or "full" (whole layers)."""
    method: str = "uniform"
    """With "full": "uniform" or "block"."""
    num_layers: int = 1
    """With "full": layers per group ("uniform") or recomputed layers per stage ("block")."""

    def megatron_fields(self, layers_per_stage: int) -> dict:
        """The ``TransformerConfig`` keyword arguments; raises when they cannot apply."""
        if self.granularity == "none":
            return {}
        if self.granularity == "selective":
            return {"recompute_granularity": "selective"}
        if self.num_layers > layers_per_stage:
            raise ValueError(f"recompute_num_layers = {self.num_layers} exceeds the "
                             f"{layers_per_stage} layers of each pipeline stage")
        return {"recompute_granularity": "full", "recompute_method": self.method,
                "recompute_num_layers": self.num_layers}


def check_parallel_features(parallel: ParallelConfig) -> None:
    """Raise ``ValueError`` when ``parallel`` asks for a feature this machine cannot run."""
    if parallel.sequence_parallel and not torch.cuda.is_available():
        raise ValueError("ParallelConfig.sequence_parallel = True needs CUDA: megatron-core's "
                         "sequence-parallel layers use fused CUDA kernels (apex / Transformer "
                         "Engine); set sequence_parallel=false on CPU")


def transformer_config(config: HFModelConfig, parallel: ParallelConfig,
                       dtype: torch.dtype = torch.float32,
                       recompute: RecomputeConfig | None = None) -> TransformerConfig:
    """The megatron ``TransformerConfig`` equivalent of ``config`` at ``parallel``/``dtype``,
    with ``recompute`` for a model that trains."""
    check_parallel_fits(config, parallel)
    check_parallel_features(parallel)
    recompute_fields = (recompute or RecomputeConfig()).megatron_fields(
        config.num_layers // parallel.pipeline_model_parallel_size)
    on_gpu = torch.cuda.is_available()
    moe_fields = _moe_fields(config, parallel) if config.is_moe else {}
    return TransformerConfig(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_key_value_heads,
        kv_channels=config.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=config.qkv_bias,
        qk_layernorm=config.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        # Activations travel between pipeline stages in the parameters' dtype.
        pipeline_dtype=dtype if parallel.pipeline_model_parallel_size > 1 else None,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Weights drawn as full master tensors on CPU, then sliced: same model at any TP size.
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # Fused kernels are CUDA-only; on GPU megatron's defaults stand.
        **({} if on_gpu else dict(
            gradient_accumulation_fusion=False,
            masked_softmax_fusion=False,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
        )),
        **recompute_fields,
        **moe_fields,
    )


def _moe_fields(config: HFModelConfig, parallel: ParallelConfig) -> dict:
    """megatron's MoE fields for ``config``: dropless top-k routing in fp32 like HF's, no load
    balancing loss (MoE models here are frozen teachers), experts as a ``SequentialMLP`` of
    plain linears (what ModelOpt's importer maps), the all-to-all token dispatcher (the
    all-gather one reduce-scatters, which gloo lacks)."""
    return dict(
        num_moe_experts=config.num_experts,
        moe_router_topk=config.experts_per_token,
        moe_ffn_hidden_size=config.moe_ffn_hidden_size,
        moe_layer_freq=[int(i in config.moe_layers) for i in range(config.num_layers)],
        # Softmax over all experts then top-k (HF's norm_topk_prob=False); else softmax over the
        # top-k logits, which equals HF's renormalised top-k probabilities.
        moe_router_pre_softmax=not config.norm_topk_prob,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.tensor_model_parallel_size,
    )


def _layer_spec(config: TransformerConfig, quantizable: bool,
                pg_collection: ProcessGroupCollection | None
                ) -> ModuleSpec | TransformerBlockSubmodules:
    """Local spec on CPU. With CUDA and Transformer Engine: ModelOpt's TE-compatible spec for a
    model ModelOpt will quantize (plain linears it can swap), megatron's full TE spec (fused
    norm + linear) for one it will not (a frozen teacher). Without TE the local spec runs on
    GPU too: the ModelOpt spec imports without TE and fails only when a layer is built (seen on
    an H100 without TE), so TE itself is what is asked for. An MoE model gets megatron's
    per-layer block spec (MoE and dense layers as ``moe_layer_freq`` says) for this rank's
    pipeline stage."""
    use_te = (torch.cuda.is_available()
              and importlib.util.find_spec("transformer_engine") is not None)
    if config.num_moe_experts:
        pp_rank = None if pg_collection is None else pg_collection.pp.rank()
        block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                           normalization="RMSNorm", pp_rank=pp_rank)
        if not use_te:
            for layer in block.layer_specs:
                _use_sdpa(layer)
        return block
    if use_te:
        if not quantizable:
            return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
        from megatron.core.post_training.modelopt.gpt.model_specs import get_gpt_modelopt_spec

        return get_gpt_modelopt_spec(config, remap_te_layernorm=True)
    return _use_sdpa(get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm,
                                              normalization="RMSNorm"))


def _use_sdpa(layer: ModuleSpec) -> ModuleSpec:
    """The local spec's core attention through PyTorch's SDPA (:mod:`nemo_opd.models.attention`:
    fused kernels, GQA without repeated KV heads); in place, returned for chaining."""
    layer.submodules.self_attention.submodules.core_attention = SDPAttention
    return layer


def _pipeline_stage(pg_collection: ProcessGroupCollection | None) -> tuple[bool, bool]:
    """``(first stage, last stage)`` of this rank in the model's pipeline."""
    if pg_collection is None:
        return (parallel_state.is_pipeline_first_stage(ignore_virtual=True),
                parallel_state.is_pipeline_last_stage(ignore_virtual=True))
    rank, size = pg_collection.pp.rank(), pg_collection.pp.size()
    return rank == 0, rank == size - 1


def build_gpt_model(config: HFModelConfig, parallel: ParallelConfig | None = None, *,
                    dtype: torch.dtype = torch.float32,
                    pg_collection: ProcessGroupCollection | None = None,
                    recompute: RecomputeConfig | None = None,
                    quantizable: bool = True, vocab_rows: int | None = None) -> GPTModel:
    """A randomly initialised ``GPTModel`` shaped like ``config`` (vocab-parallel logits).

    ``pg_collection`` gives the model its own process groups (a teacher whose layout differs from
    the global one, see :func:`nemo_opd.runtime.model_process_groups`); ``parallel`` must then
    describe that layout. With pipeline parallelism this rank builds its own stage: the
    embedding on the first, the output layer (logits) on the last. ``quantizable=False``
    (a model ModelOpt will not touch) picks megatron's full Transformer Engine spec on GPU.
    ``vocab_rows`` sets the padded vocabulary (default: padded for this TP size); a shell that
    restores a checkpoint saved at another TP size needs that size's rows.
    """
    parallel = parallel or ParallelConfig()
    tconfig = transformer_config(config, parallel, dtype, recompute)
    pre_process, post_process = _pipeline_stage(pg_collection)
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=_layer_spec(tconfig, quantizable, pg_collection),
        vocab_size=vocab_rows or config.padded_vocab_size(parallel.tensor_model_parallel_size),
        max_sequence_length=config.max_position_embeddings,
        parallel_output=True,
        share_embeddings_and_output_weights=config.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(config.rope_theta),
        rope_scaling=config.rope_scaling_factor is not None,
        rope_scaling_factor=config.rope_scaling_factor or 8.0,
        pre_process=pre_process,
        post_process=post_process,
        pg_collection=pg_collection,
    )
    mask_padded_vocab(model, config.vocab_size)
    if torch.cuda.is_available():
        model.cuda()
    return model


def load_hf_gpt(model_dir: str | Path, parallel: ParallelConfig | None = None, *,
                dtype: torch.dtype = torch.float32,
                pg_collection: ProcessGroupCollection | None = None,
                recompute: RecomputeConfig | None = None,
                quantizable: bool = True) -> GPTModel:
    """Build a ``GPTModel`` and load the HF checkpoint in ``model_dir`` into it (this rank's shard).

    Raises ``FileNotFoundError``/``ValueError`` for a missing ``config.json``, an unsupported
    architecture or a layout that does not fit, before any weight is read.
    """
    config = read_hf_config(model_dir)
    model = build_gpt_model(config, parallel, dtype=dtype, pg_collection=pg_collection,
                            recompute=recompute, quantizable=quantizable)
    layout = (model_parallel_layout(pg_collection) if pg_collection is not None
              else contextlib.nullcontext())
    with layout:
        PaddedVocabImporter(model, str(model_dir), dtype=dtype).import_weights()
    logger.debug("loaded %s from %s (%s)", config.architecture, model_dir, dtype)
    return model

