"""Memory per GPU of a distillation run, from ``config.json`` files alone, and the
pre-submission check that refuses a layout over the GPU's memory before any weight loads.

    python -m nemo_opd.launch.memory --factory qwen3_4b_int4 --world 8 \\
        model.student=docs/model_configs/Qwen3-4B [key=value ...] [--gpu-memory-gib 80]

prints the breakdown for a preset of ``recipes/onpolicy_qat.py`` with the same ``key=value``
overrides the recipe takes (exit status 1 when it does not fit). ``docs/scaling.md`` has the
tables for the seeds' setups. The recipe's ``check`` calls :func:`check_memory_fits` whenever
the executor targets GPUs (see :func:`nemo_opd.launch.executors.executor_gpu_memory_gib`).

What is counted (``s`` tokens per sequence, ``b`` rows per micro batch, ``h`` hidden size,
``a`` heads, ``t`` the model's TP size, ``V`` its vocabulary padded to a multiple of ``t`` (the
rows megatron builds, :meth:`HFModelConfig.padded_vocab_size`); bytes per element from the
dtypes). Models are read by :func:`nemo_opd.models.hf_config.read_hf_config`, and a layout that
cannot shard one (:func:`~nemo_opd.models.hf_config.check_parallel_fits`) is refused here too:

A training step passes through three phases one after another on every rank: **rollout** (the
student generates; only when the run has on-policy batches), **teacher** (teacher forward, no
grad) and **student** (student forward and backward through the loss). What a phase allocates is
freed before the next one (PyTorch's caching allocator reuses it), so

    peak = resident + max(rollout, teacher, student) + runtime (3 GiB) + fragmentation (5 %).

Resident, all run long:

* student weights: the rank's pipeline stage, TP-sharded linears, in ``model.student_dtype``
  (+ LoRA adapters, also in that dtype);
* gradients: megatron's DDP grad buffer, fp32 (``grad_reduce_in_fp32``): 4 B per trainable
  parameter (LoRA: the adapters only);
* master weights + Adam moments: fp32 master copy of 16-bit parameters and two fp32 moments,
  12 B per trainable parameter (8 B for fp32 parameters, which are their own master copy),
  divided by the student's data-parallel size with ``optim.use_distributed_optimizer`` (the
  grad buffer is not: the distributed optimizer reduce-scatters into a full-size buffer);
* teacher weights: its largest stage at its own layout, in ``model.teacher_dtype``; a
  self-distilled run loads the original weights a second time as the teacher. An MoE
  teacher's routed experts are split by TP × EP on each rank (megatron-core splits every
  expert by its expert-tensor-parallel size, TP, and the experts of a layer over the EP
  ranks, which come out of the data-parallel ranks); attention by TP; router and norms
  replicated;
* anchor weights: ``kl_anchored`` keeps a second, frozen quantized student;
* ModelOpt quantizer state: static block formats (INT4, INT4-AWQ, W4A8) keep one fp32 amax per
  weight block, 4/block B per quantized weight; MX and NVFP4 formats compute block scales on
  the fly and FP8 keeps one amax per tensor (counted as nothing).

Rollout (when any batch is on-policy; ``micro_batch_size × sampling.n`` rows):

* quantized weight copy: the rollout path quantizes the weights once per rollout and keeps one
  fake-quantized copy of every quantized linear (decoder q/k/v/o, gate/up, down; embeddings and
  the output layer stay unquantized) in the student dtype for the whole generation;
* KV cache: megatron's static inference context, K and V ``[s_roll, b, g/t, d]`` per layer of
  the stage, ``s_roll = max_prompt_length (+ seed_tokens for teacher_seeded) + max_new_tokens``;
  ``teacher_seeded`` also fills a teacher cache for the prefix, counted when larger (the two are
  not alive together);
* prefill working set: one layer's activations over the prompt (the ``selective`` form below),
  no grad. Prefill logits are the last token's only (megatron's static context).

Teacher (``distill.loss`` decides what survives it):

* teacher logits ``[b_t, s, V/t_t]`` in the teacher dtype, ``b_t = b · t_t/t_s`` when the
  teacher's TP group spans several student data-parallel ranks (it scores their batches in
  one forward), the fp32 chunk workspace (top-k, as below), and one layer's working set (for
  an MoE layer the dense formula stands in for the routed MLP: its ``k`` experts of width
  ``f_e`` per token are about a dense MLP, ``k·f_e = 3h`` for Qwen3-30B-A3B; EP moves tokens,
  balanced on average, not their count).

Student (forward, then backward):

* activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", Table 2, 16-bit activations, per layer and micro batch:
  ``s·b·h·(10 + 24/t + 5·a·s/(h·t))`` without sequence parallelism, ``s·b·h·(34/t +
  5·a·s/(h·t))`` with it (``s·b·h·(34 + 5·a·s/h)`` at t = 1); ``selective`` recompute drops the
  ``5·a·s/(h·t)`` term (softmax, its dropout mask and output: the ``s²`` storage); ``full``
  stores ``2·s·b·h`` (``/t`` with SP) per recomputed group's input, and during backward one
  group (``uniform``: ``recompute_num_layers`` layers) or one layer (``block``: the first
  ``recompute_num_layers`` layers of the stage are recomputed, the rest store everything) is
  rebuilt in full. **Flash attention**: on GPU Transformer Engine's fused attention never
  materialises the ``s × s`` scores, so with ``flash_attention=True`` (the default) the
  ``5·a·s/(h·t)`` term is dropped everywhere and ``none`` costs what ``selective`` costs. The
  formulas are GPT's (4h GeLU MLP, multi-head attention, dropout masks); for GQA + SwiGLU
  models without dropout (Qwen3, Llama 3: f ≈ 3.5–3.8 h) narrower K/V and no masks offset the
  wider gated MLP to within a few %. fp32 activations count twice (×bytes/2). Pipeline: the
  1F1B schedule keeps ``min(pp, grad_accumulation)`` micro batches in flight on the first stage,
  one on the last;
* fake-quant copies kept for backward: ModelOpt computes ``Q(W)`` in every forward and the
  linear's autograd saves ``Q(W)`` for the input gradient, so the fake-quantized weight of every
  quantized linear lives until that layer's backward: one copy of the stage's quantized weights
  per in-flight micro batch (this is not a transient of one layer); with ``full`` recompute only
  the layers being recomputed hold one (``block``: the non-recomputed layers per micro batch,
  plus one);
* logits: the student's ``[b, s, V/t]`` logits in its dtype, held to the end of the step, and
  the loss's gradient buffer of the same size (the token-chunked, vocab-parallel loss fills it
  during forward), plus the fp32 chunk workspace (6 buffers of ``min(2²⁵, b·s·V/t)``
  elements); ``loss="full"`` holds the teacher's logits (its dtype) through the student pass,
  ``"topk"`` its top-k log-probs and ids (12 B × k per token), ``"sampled"`` one fp32 log-prob
  per token; ``kl_anchored`` holds the anchor's logits.

Worst rank: the student's first and last pipeline stages are planned (embedding on the first,
output layer and logits on the last, both at PP = 1; tied embeddings keep a copy on each stage
at PP > 1) and the larger is reported; the teacher's largest stage and its logits are counted
on every rank (its stages need not sit with the student's).

Not modelled: an MoE *student* (nemo_opd trains dense students; MoE configs are read for
teachers), an uneven expert load under EP (the all-to-all's receive buffers of a rank whose
experts draw more than their share of tokens), context parallelism, CPU offload, LoRA's
``r``-wide activations, and evaluation/export (they run one model without a step in flight,
below the training peak).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import math
import sys
import warnings
from pathlib import Path
from typing import Any

from nemo_opd.config import RunConfig
from nemo_opd.models.hf_config import HFModelConfig, check_parallel_fits, read_hf_config
from nemo_opd.quant.formats import FORMATS
from nemo_opd.runtime import ParallelConfig

__all__ = [
    "GIB",
    "DTYPE_BYTES",
    "PHASES",
    "RUNTIME_RESERVE_GIB",
    "FRAGMENTATION",
    "MemoryBudgetError",
    "ModelShape",
    "MemoryItem",
    "MemoryPlan",
    "read_model_shape",
    "layer_activation_bytes",
    "plan_memory",
    "format_plan",
    "check_memory_fits",
    "main",
]

GIB = 2**30
"""Bytes per GiB (the unit of ``gpu_memory_gib`` and of the tables)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of each :data:`nemo_opd.config.DTYPES` entry."""
PHASES = ("resident", "rollout", "teacher", "student")
"""Resident memory, then the three phases of a step, which are never alive together."""
RUNTIME_RESERVE_GIB = 3.0
"""CUDA context, NCCL communicator buffers and cuBLAS workspaces: outside PyTorch's allocator."""
FRAGMENTATION = 0.05
"""Caching-allocator fragmentation, as a fraction of the estimated tensors."""
LOSS_CHUNK_ELEMENTS = 2**25
"""Elements of one ``[chunk, V/t]`` buffer of the token-chunked loss on CUDA."""
LOSS_CHUNK_BUFFERS = 6
"""fp32 chunk buffers the loss (or the teacher's top-k) keeps while it runs."""

class MemoryBudgetError(ValueError):
    """The estimated peak memory per GPU exceeds the GPU's memory."""


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only model that set its memory: the fields of
    :class:`nemo_opd.models.hf_config.HFModelConfig` the planner counts with, under the same
    names (:meth:`from_hf_config`).

    Every supported family has gated (SwiGLU) MLPs: gate, up and down projections of width
    ``ffn_hidden_size`` (``moe_ffn_hidden_size`` per expert in MoE layers)."""

    architecture: str
    """The single ``architectures`` entry of ``config.json``."""
    vocab_size: int
    """Tokens of the vocabulary ``V`` (the embedding and output layer hold
    :meth:`padded_vocab_size` rows)."""
    hidden_size: int
    """Model width ``h``."""
    num_layers: int
    """Decoder layers ``L``."""
    num_attention_heads: int
    """Query heads ``a``."""
    num_key_value_heads: int
    """Key/value heads ``g`` (grouped-query attention; ``a`` without it)."""
    head_dim: int
    """Per-head width ``d`` (``h / a`` unless ``config.json`` says otherwise)."""
    ffn_hidden_size: int
    """Dense MLP width ``f`` (``intermediate_size``)."""
    tie_word_embeddings: bool
    """The output layer reuses the embedding matrix."""
    qk_layernorm: bool
    """RMSNorm of width ``d`` on queries and keys (Qwen3): ``2·d`` more parameters per layer."""
    qkv_bias: bool
    """Biases on the q/k/v projections (Qwen2)."""
    num_experts: int = 0
    """Routed experts per MoE layer ``E``; 0 = dense model."""
    experts_per_token: int = 0
    """Experts each token is routed to ``k`` (``num_experts_per_tok``)."""
    moe_ffn_hidden_size: int = 0
    """Width of each expert's gated MLP ``f_e`` (``moe_intermediate_size``)."""
    moe_layers: tuple[int, ...] = ()
    """Indices of the MoE layers; the others have the dense MLP."""

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "ffn_hidden_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"ModelShape.{field} must be >= 1, got {getattr(self, field)}")
        if self.moe_layers and min(self.num_experts, self.experts_per_token,
                                   self.moe_ffn_hidden_size) < 1:
            raise ValueError(f"ModelShape: MoE layers {self.moe_layers} need num_experts, "
                             f"experts_per_token and moe_ffn_hidden_size >= 1, got "
                             f"{self.num_experts}, {self.experts_per_token}, "
                             f"{self.moe_ffn_hidden_size}")

    @classmethod
    def from_hf_config(cls, config: HFModelConfig) -> ModelShape:
        """The shape of a parsed ``config.json`` (every field has the same name there)."""
        return cls(**{field.name: getattr(config, field.name)
                      for field in dataclasses.fields(cls)})

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    def padded_vocab_size(self, tp: int) -> int:
        """Rows of the embedding and output layer at TP = ``tp``: ``V`` rounded up to a multiple
        of ``tp``, as :meth:`HFModelConfig.padded_vocab_size` builds the model."""
        return -(-self.vocab_size // tp) * tp

    def attention_weights(self) -> int:
        """q, k, v and o matrices of one layer: ``h·(a + 2g)·d + a·d·h``."""
        h, d = self.hidden_size, self.head_dim
        a, g = self.num_attention_heads, self.num_key_value_heads
        return h * (a + 2 * g) * d + a * d * h

    def mlp_weights(self, layer: int) -> int:
        """MLP matrices of ``layer``: ``3·h·f`` dense, ``E·3·h·f_e`` MoE (router excluded)."""
        if layer in self.moe_layers:
            return self.num_experts * 3 * self.hidden_size * self.moe_ffn_hidden_size
        return 3 * self.hidden_size * self.ffn_hidden_size

    def quantized_weights(self, layer: int, tp: int = 1, ep: int = 1) -> float:
        """Weights ModelOpt quantizes in ``layer`` (every decoder linear; not the router) on one
        rank of TP = ``tp`` and EP = ``ep``: attention and a dense MLP split by TP, the experts
        of an MoE layer by TP × EP (megatron splits each expert by its expert-tensor-parallel
        size, TP, and the experts over EP). ``tp = ep = 1``: the whole layer's."""
        attention = self.attention_weights()
        if layer in self.moe_layers:
            return attention / tp + self.mlp_weights(layer) / (tp * ep)
        return (attention + self.mlp_weights(layer)) / tp

    def layer_params(self, layer: int, tp: int = 1, ep: int = 1) -> float:
        """Parameters of ``layer`` on one rank of TP = ``tp`` and EP = ``ep``: linears (experts
        by TP × EP, see :meth:`quantized_weights`) and the q/k/v bias split; the two layer
        norms, the q/k norms and the MoE router replicated."""
        h, d = self.hidden_size, self.head_dim
        bias = (self.num_attention_heads + 2 * self.num_key_value_heads) * d if self.qkv_bias \
            else 0
        replicated = 2 * h + (2 * d if self.qk_layernorm else 0)
        if layer in self.moe_layers:
            replicated += h * self.num_experts
        return self.quantized_weights(layer, tp, ep) + bias / tp + replicated

    def lora_params(self, rank: int, tp: int) -> float:
        """LoRA adapters of one layer on one of ``tp`` ranks (``nemo_opd.quant.lora``: on
        linear_qkv, linear_proj, linear_fc1, linear_fc2; ``A [r, in]``, ``B [out, r]``; a
        column-parallel layer splits ``B``, a row-parallel one ``A``):
        ``r·(4h + ((a + 2g)·d + a·d + 3f)/t)``."""
        h, d = self.hidden_size, self.head_dim
        split = (self.num_attention_heads + 2 * self.num_key_value_heads) * d \
            + self.num_attention_heads * d + 3 * self.ffn_hidden_size
        return rank * (4 * h + split / tp)

    def total_params(self) -> int:
        """All parameters (embedding, output layer unless tied, layers, final norm)."""
        matrices = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return int(matrices + sum(self.layer_params(i) for i in range(self.num_layers))
                   + self.hidden_size)

    def active_params(self) -> int:
        """Parameters one token passes through: MoE layers count ``k`` of their ``E`` experts."""
        inactive = sum((self.num_experts - self.experts_per_token) * 3 * self.hidden_size
                       * self.moe_ffn_hidden_size for _ in self.moe_layers)
        return self.total_params() - inactive


def read_model_shape(model_dir: str | Path) -> ModelShape:
    """:class:`ModelShape` of ``model_dir/config.json``, parsed by
    :func:`nemo_opd.models.hf_config.read_hf_config` (the raw JSON: no weight, no transformers),
    so the planner reads exactly the families, fields and refusals the model builder does.

    Raises ``FileNotFoundError`` without the directory or its ``config.json`` and ``ValueError``
    naming the file (and the field) for an unusable one."""
    return ModelShape.from_hf_config(_read_config(model_dir))


def _read_config(model_dir: str | Path) -> HFModelConfig:
    path = Path(model_dir) / "config.json"
    try:
        return read_hf_config(model_dir)
    except KeyError as err:  # a field every config.json must have
        raise ValueError(f"{path}: field {err.args[0]!r} is missing") from None
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: {err}") from None


def layer_activation_bytes(shape: ModelShape, tokens: int, rows: int, parallel: ParallelConfig,
                           *, scores: bool, dtype_bytes: int) -> float:
    """Korthikanti et al.'s activations of one layer and micro batch (module docstring):
    ``s·b·h·(10 + 24/t)`` (``34·s·b·h/t`` with sequence parallelism), plus ``5·a·s²·b/t`` when
    the attention ``scores`` are stored; scaled by ``dtype_bytes / 2``."""
    s, b, h = tokens, rows, shape.hidden_size
    t = parallel.tensor_model_parallel_size
    linear = s * b * h * (34 / t if parallel.sequence_parallel else 10 + 24 / t)
    quadratic = 5 * shape.num_attention_heads * s * s * b / t if scores else 0
    return (linear + quadratic) * dtype_bytes / 2


@dataclasses.dataclass(frozen=True)
class MemoryItem:
    """One line of the breakdown."""

    name: str
    """What the memory holds."""
    phase: str
    """One of :data:`PHASES`."""
    bytes: float
    """Bytes on the planned rank."""
    detail: str
    """How it was counted (sizes, formula), for the table."""
    remedy: str = ""
    """The settings that shrink it, named as overrides; "" when none."""

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"MemoryItem.phase must be one of {PHASES}, got {self.phase!r}")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Memory per GPU on the planned (worst) rank."""

    rank: str
    """Which rank was planned and the layouts (the table's title)."""
    items: tuple[MemoryItem, ...]
    """The breakdown, resident items first."""

    def phase_bytes(self, phase: str) -> float:
        return sum(item.bytes for item in self.items if item.phase == phase)

    @property
    def peak_bytes(self) -> float:
        """Resident memory plus the largest phase."""
        return self.phase_bytes("resident") + max(self.phase_bytes(p) for p in PHASES[1:])

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


# ----------------------------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class _Stage:
    """One pipeline stage of a model on one rank."""

    name: str
    layers: range
    first: bool
    last: bool

    def params(self, shape: ModelShape, parallel: ParallelConfig) -> float:
        """Parameters on one rank: layers (experts split by TP × EP), the embedding (padded
        vocabulary rows, split by TP) on the first stage, the output layer (untied, or the tied
        copy at PP > 1) and the final norm on the last."""
        t, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
        matrix = shape.padded_vocab_size(t) * shape.hidden_size / t
        total = sum(shape.layer_params(i, t, parallel.expert_model_parallel_size)
                    for i in self.layers)
        if self.first:
            total += matrix
        if self.last:
            total += shape.hidden_size + (matrix if not shape.tie_word_embeddings or pp > 1
                                          else 0)
        return total

    def quantized(self, shape: ModelShape, parallel: ParallelConfig) -> float:
        return sum(shape.quantized_weights(i, parallel.tensor_model_parallel_size,
                                           parallel.expert_model_parallel_size)
                   for i in self.layers)


def _stages(shape: ModelShape, parallel: ParallelConfig) -> list[_Stage]:
    """The first and the last pipeline stage (one stage at PP = 1); ``ceil(L/pp)`` layers each
    (model build refuses a PP that does not divide the layers)."""
    pp = parallel.pipeline_model_parallel_size
    per_stage = math.ceil(shape.num_layers / pp)
    if pp == 1:
        return [_Stage("the only pipeline stage", range(shape.num_layers), True, True)]
    return [_Stage(f"first pipeline stage of {pp}", range(per_stage), True, False),
            _Stage(f"last pipeline stage of {pp}",
                   range(shape.num_layers - per_stage, shape.num_layers), False, True)]


def _gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


def _params(value: float) -> str:
    return f"{value / 1e9:.3f}B" if value >= 1e8 else f"{value / 1e6:.2f}M"


def _uses_rollouts(cfg: RunConfig) -> bool:
    """Whether any batch is a student rollout (nemo_opd.strategies): a mixture with an on-policy
    part, or any other strategy with λ > 0."""
    strategy = cfg.distill.strategy
    if strategy.name == "mixture":
        return strategy.mixture_weight < 1
    return cfg.distill.lmbda > 0


def _kv_cache_bytes(shape: ModelShape, layers: int, rows: int, tokens: int, tp: int,
                    dtype_bytes: int) -> float:
    """K and V ``[tokens, rows, g/t, d]`` for ``layers`` layers."""
    heads = math.ceil(shape.num_key_value_heads / tp)
    return 2 * layers * tokens * rows * heads * shape.head_dim * dtype_bytes


def _loss_workspace_bytes(logits_elements: float) -> float:
    """fp32 chunk buffers: :data:`LOSS_CHUNK_BUFFERS` of ``min(2²⁵, logits)`` elements."""
    return LOSS_CHUNK_BUFFERS * 4 * min(LOSS_CHUNK_ELEMENTS, logits_elements)


def _quantizer_state_bytes(fmt: str, quantized: float) -> float:
    spec = FORMATS.get(fmt)
    if spec is None or spec.dynamic_block or spec.weight_block_size is None:
        return 0.0
    return quantized * 4 / spec.weight_block_size


def _student_activations(cfg: RunConfig, shape: ModelShape, stage: _Stage, tokens: int,
                         rows: int, in_flight: int, flash: bool, granularity: str
                         ) -> tuple[float, int, str]:
    """``(activation bytes, fake-quant layers held, formula)`` of ``stage`` under
    ``granularity``, ``in_flight`` micro batches stored plus the recompute transient."""
    model, parallel = cfg.model, cfg.model.student_parallel
    nbytes = DTYPE_BYTES[model.student_dtype]
    t = parallel.tensor_model_parallel_size
    layers = len(stage.layers)
    full_layer = layer_activation_bytes(shape, tokens, rows, parallel, scores=not flash,
                                        dtype_bytes=nbytes)
    if granularity in ("none", "selective"):
        per_layer = layer_activation_bytes(
            shape, tokens, rows, parallel, scores=granularity == "none" and not flash,
            dtype_bytes=nbytes)
        return (in_flight * layers * per_layer, in_flight * layers,
                f"{in_flight} x {layers} layers x {_gib(per_layer)}")
    checkpoint = tokens * rows * shape.hidden_size * nbytes / (t if parallel.sequence_parallel
                                                                else 1)
    n = min(model.recompute_num_layers, layers)
    if model.recompute_method == "uniform":
        groups = math.ceil(layers / n)
        return (in_flight * groups * checkpoint + n * full_layer, n,
                f"{in_flight} x {groups} group inputs x {_gib(checkpoint)} + {n} layers "
                f"recomputed x {_gib(full_layer)}")
    stored = layers - n
    return (in_flight * (n * checkpoint + stored * full_layer) + (full_layer if n else 0),
            in_flight * stored + (1 if n else 0),
            f"{in_flight} x ({n} inputs x {_gib(checkpoint)} + {stored} layers x "
            f"{_gib(full_layer)}) + 1 layer recomputed")


def _plan_stage(cfg: RunConfig, world_size: int, student: ModelShape, teacher: ModelShape,
                stage: _Stage, flash: bool) -> MemoryPlan:
    """The plan of one student pipeline stage (the module docstring lists every item)."""
    model, optim, quant = cfg.model, cfg.optim, cfg.quant
    s_par, t_par = model.student_parallel, model.teacher_parallel
    s_tp, t_tp = s_par.tensor_model_parallel_size, t_par.tensor_model_parallel_size
    dp = s_par.data_parallel_size(world_size)
    s_bytes, t_bytes = DTYPE_BYTES[model.student_dtype], DTYPE_BYTES[model.teacher_dtype]
    strategy = cfg.distill.strategy
    seeded = strategy.seed_tokens if strategy.name == "teacher_seeded" else 0
    rollouts = _uses_rollouts(cfg)
    rows = optim.micro_batch_size * (cfg.sampling.n if rollouts else 1)
    tokens = (cfg.data.max_prompt_length + seeded
              + max(cfg.data.max_response_length, cfg.sampling.max_new_tokens))
    in_flight = min(s_par.pipeline_model_parallel_size, optim.grad_accumulation) \
        if stage.first else 1
    layers = len(stage.layers)
    quantized = stage.quantized(student, s_par) if quant.format != "none" else 0.0
    anchor = strategy.name == "kl_anchored" and strategy.anchor_weight > 0
    student_tp = "model.student_parallel.tensor_model_parallel_size"
    raise_student = f"raise {student_tp} or pipeline_model_parallel_size"
    items: list[MemoryItem] = []

    def add(name: str, phase: str, nbytes: float, detail: str, remedy: str = "") -> None:
        items.append(MemoryItem(name, phase, float(nbytes), detail, remedy))

    # Resident.
    weights = stage.params(student, s_par)
    lora = layers * student.lora_params(quant.lora_r, s_tp) if quant.lora else 0.0
    trainable = lora if quant.lora else weights
    add("student weights", "resident", (weights + lora) * s_bytes,
        f"{_params(weights)} params" + (f" + {_params(lora)} LoRA" if lora else "")
        + f" x {s_bytes} B ({model.student_dtype})", raise_student)
    add("gradients (fp32 grad buffer)", "resident", trainable * 4,
        f"{_params(trainable)} trainable x 4 B", f"quant.lora=true; {raise_student}")
    state = 8 if model.student_dtype == "float32" else 12
    shards = dp if optim.use_distributed_optimizer else 1
    add("master weights + Adam moments (fp32)", "resident", trainable * state / shards,
        f"{_params(trainable)} x {state} B / {shards} data-parallel shards",
        ("" if optim.use_distributed_optimizer else "optim.use_distributed_optimizer=true; ")
        + f"more data-parallel ranks; quant.lora=true; {raise_student}")
    teacher_params = max(s.params(teacher, t_par) for s in _stages(teacher, t_par))
    add("teacher weights" + (" (original weights: self-distillation)"
                             if model.self_distillation else ""),
        "resident", teacher_params * t_bytes,
        f"{_params(teacher_params)} params x {t_bytes} B ({model.teacher_dtype}), TP={t_tp} "
        f"PP={t_par.pipeline_model_parallel_size}"
        + (f" EP={t_par.expert_model_parallel_size}" if teacher.is_moe else ""),
        "raise model.teacher_parallel.tensor_model_parallel_size"
        + (" or expert_model_parallel_size" if teacher.is_moe else "")
        + " (with distill.loss=topk when it differs from the student's)")
    if anchor:
        add("anchor weights (kl_anchored)", "resident", weights * s_bytes,
            f"{_params(weights)} params x {s_bytes} B", raise_student)
    add("ModelOpt quantizer state (amax)", "resident",
        _quantizer_state_bytes(quant.format, quantized),
        f"{quant.format}: {_params(quantized)} quantized weights")

    # Rollout.
    if rollouts:
        add("quantized weight copy (quantize once per rollout)", "rollout", quantized * s_bytes,
            f"{_params(quantized)} quantized weights x {s_bytes} B", raise_student)
        roll_tokens = cfg.data.max_prompt_length + seeded + cfg.sampling.max_new_tokens
        kv = _kv_cache_bytes(student, layers, rows, roll_tokens, s_tp, s_bytes)
        detail = f"{layers} layers x {rows} rows x {roll_tokens} tokens"
        if seeded:
            teacher_layers = len(_stages(teacher, t_par)[-1].layers)
            prefix = cfg.data.max_prompt_length + seeded
            teacher_kv = _kv_cache_bytes(teacher, teacher_layers, rows, prefix, t_tp, t_bytes)
            if teacher_kv > kv:
                kv, detail = teacher_kv, f"teacher prefix: {teacher_layers} layers x {rows} " \
                                         f"rows x {prefix} tokens"
        add("KV cache", "rollout", kv, detail,
            "lower optim.micro_batch_size, sampling.n or sampling.max_new_tokens")
        add("prefill working set (1 layer)", "rollout",
            layer_activation_bytes(student, cfg.data.max_prompt_length + seeded, rows, s_par,
                                   scores=not flash, dtype_bytes=s_bytes),
            f"{rows} rows x {cfg.data.max_prompt_length + seeded} prompt tokens")

    # Teacher scoring.
    teacher_rows = rows * max(1, t_tp // s_tp)
    teacher_vocab = teacher.padded_vocab_size(t_tp)
    teacher_elements = teacher_rows * tokens * teacher_vocab / t_tp
    add("teacher logits + top-k workspace + 1 layer", "teacher",
        teacher_elements * t_bytes + _loss_workspace_bytes(teacher_elements)
        + layer_activation_bytes(teacher, tokens, teacher_rows, t_par, scores=not flash,
                                 dtype_bytes=t_bytes),
        f"[{teacher_rows}, {tokens}, {teacher_vocab}/{t_tp}] x {t_bytes} B",
        "lower optim.micro_batch_size; raise model.teacher_parallel.tensor_model_parallel_size")

    # Student pass.
    alternatives = {g: _student_activations(cfg, student, stage, tokens, rows, in_flight, flash,
                                            g)
                    for g in ("none", "selective", "full")}
    activations, held, formula = alternatives[model.recompute_granularity]
    others = ", ".join(f"{g}: {_gib(v[0])}" for g, v in alternatives.items()
                       if g != model.recompute_granularity)
    add(f"activations (recompute {model.recompute_granularity}"
        + (", flash attention" if flash else "") + ")", "student", activations,
        f"{formula} [{others}]",
        "model.recompute_granularity=full; model.student_parallel.sequence_parallel=true; "
        f"lower optim.micro_batch_size; raise {student_tp}")
    per_layer_quantized = quantized / layers if layers else 0.0
    add("fake-quant weights kept for backward", "student", held * per_layer_quantized * s_bytes,
        f"{held} layer copies x {_params(per_layer_quantized)} x {s_bytes} B",
        f"model.recompute_granularity=full; {raise_student}")
    if stage.last:
        student_vocab = student.padded_vocab_size(s_tp)
        elements = rows * tokens * student_vocab / s_tp
        logits, workspace = elements * s_bytes, _loss_workspace_bytes(elements)
        if cfg.distill.loss == "full":
            held_teacher = rows * tokens * teacher_vocab / t_tp * t_bytes
            kind = "teacher logits"
        elif cfg.distill.loss == "topk" or t_tp != s_tp:
            held_teacher = rows * tokens * (12 * cfg.distill.topk + 4)
            kind = f"teacher top-{cfg.distill.topk}"
        else:
            held_teacher = rows * tokens * 4
            kind = "teacher log-probs"
        add("logits: student + loss gradient + " + kind + (" + anchor" if anchor else ""),
            "student", logits * (3 if anchor else 2) + held_teacher + workspace,
            f"{3 if anchor else 2} x [{rows}, {tokens}, {student_vocab}/{s_tp}] x "
            f"{s_bytes} B + {kind} "
            f"{_gib(held_teacher)} + loss chunks {_gib(workspace)}",
            f"lower optim.micro_batch_size; raise {student_tp}"
            + ("; distill.loss=topk" if cfg.distill.loss == "full" else ""))

    tensors = sum(i.bytes for i in items if i.phase == "resident") \
        + max(sum(i.bytes for i in items if i.phase == p) for p in PHASES[1:])
    add("runtime: CUDA context, NCCL, cuBLAS workspaces", "resident", RUNTIME_RESERVE_GIB * GIB,
        "fixed estimate")
    add(f"allocator fragmentation ({FRAGMENTATION:.0%} of the above)", "resident",
        FRAGMENTATION * tensors, "estimate")
    rank = (f"{stage.name}: student TP={s_tp} PP={s_par.pipeline_model_parallel_size} "
            f"DP={dp}{' SP' if s_par.sequence_parallel else ''}, teacher TP={t_tp} "
            f"PP={t_par.pipeline_model_parallel_size}"
            + (f" EP={t_par.expert_model_parallel_size}" if teacher.is_moe else "")
            + f"; {rows} rows x {tokens} tokens per micro "
            f"batch, {in_flight} in flight")
    return MemoryPlan(rank, tuple(items))


def plan_memory(cfg: RunConfig, world_size: int, *, student: ModelShape | None = None,
                teacher: ModelShape | None = None, flash_attention: bool = True) -> MemoryPlan:
    """The memory plan of ``cfg`` on ``world_size`` ranks, for its worst rank (the module
    docstring lists what is counted). ``student``/``teacher`` default to the shapes read from
    ``cfg.model.student``/``teacher`` (the student's for self-distillation); nothing but
    ``config.json`` is read.

    Raises ``ValueError`` for an MoE student, a layout that cannot shard a model read here
    (:func:`nemo_opd.models.hf_config.check_parallel_fits`: heads, layers, MLP widths, experts
    by EP) or a world size the layouts do not divide."""
    model = cfg.model
    configs: dict[str, HFModelConfig] = {}
    if student is None:
        configs["student"] = _read_config(model.student)
        student = ModelShape.from_hf_config(configs["student"])
    if student.is_moe:
        raise ValueError(f"{model.student}: an MoE student ({student.architecture}) cannot "
                         "be planned: nemo_opd trains dense students (MoE configs are read for "
                         "teachers)")
    if teacher is None and model.self_distillation:
        teacher = student
        if "student" in configs:
            configs["teacher"] = configs["student"]
    elif teacher is None:
        configs["teacher"] = _read_config(model.teacher)
        teacher = ModelShape.from_hf_config(configs["teacher"])
    for role, config in configs.items():
        try:
            check_parallel_fits(config, getattr(model, f"{role}_parallel"))
        except ValueError as err:
            where = getattr(model, role) or model.student
            raise ValueError(f"model.{role}_parallel does not fit {where}: {err}") from None
    model.teacher_parallel.data_parallel_size(world_size)  # raises when it does not divide
    plans = [_plan_stage(cfg, world_size, student, teacher, stage, flash_attention)
             for stage in _stages(student, cfg.model.student_parallel)]
    return max(plans, key=lambda plan: plan.peak_bytes)


def format_plan(plan: MemoryPlan, gpu_memory_gib: float | None = None) -> str:
    """The breakdown as a Markdown table, the peak and, given the GPU's memory, the verdict."""
    lines = [f"Memory per GPU, {plan.rank}", "", "| phase | memory | GiB | how |",
             "|---|---|---:|---|"]
    for phase in PHASES:
        for item in (i for i in plan.items if i.phase == phase):
            lines.append(f"| {phase} | {item.name} | {item.bytes / GIB:.2f} | {item.detail} |")
    totals = {p: plan.phase_bytes(p) / GIB for p in PHASES}
    lines += ["", f"peak = resident {totals['resident']:.1f} + max(rollout "
                  f"{totals['rollout']:.1f}, teacher {totals['teacher']:.1f}, student "
                  f"{totals['student']:.1f}) = {plan.peak_gib:.1f} GiB per GPU"]
    if gpu_memory_gib is not None:
        left = gpu_memory_gib - plan.peak_gib
        lines.append(f"GPU memory {gpu_memory_gib:.1f} GiB: " + (
            f"fits, {left:.1f} GiB to spare" if left >= 0
            else f"DOES NOT FIT, {-left:.1f} GiB over"))
    return "\n".join(lines)


def _over_budget_message(plan: MemoryPlan, gpu_memory_gib: float) -> str:
    largest = sorted((i for i in plan.items if i.remedy), key=lambda i: -i.bytes)[:3]
    hints = "; ".join(f"{i.name} {i.bytes / GIB:.1f} GiB ({i.remedy})" for i in largest)
    return (f"estimated peak memory per GPU {plan.peak_gib:.1f} GiB exceeds the GPU's "
            f"{gpu_memory_gib:.1f} GiB (run.executor.gpu_memory_gib); largest: {hints}\n\n"
            + format_plan(plan, gpu_memory_gib))


def check_memory_fits(cfg: RunConfig, world_size: int, gpu_memory_gib: float | None
                      ) -> MemoryPlan | None:
    """Before submission: plan ``cfg`` on ``world_size`` GPUs of ``gpu_memory_gib`` GiB each.

    Returns the plan when it fits; None (nothing checked) when ``gpu_memory_gib`` is None (CPU
    ranks) or a model's ``config.json`` cannot be read from this machine (with a warning: the
    job's own input checks run where the files are). Raises :class:`MemoryBudgetError` with the
    breakdown, the over-budget figure and the settings to change when it does not fit."""
    if gpu_memory_gib is None:
        return None
    try:
        plan = plan_memory(cfg, world_size)
    except FileNotFoundError as err:
        warnings.warn(f"memory plan skipped: {err}", stacklevel=2)
        return None
    if plan.peak_gib > gpu_memory_gib:
        raise MemoryBudgetError(_over_budget_message(plan, gpu_memory_gib))
    return plan


# ---------------------------------------------------------------------------------------- CLI


@functools.cache
def _recipe_module(path: Path) -> Any:
    """``recipes/onpolicy_qat.py`` as a module (loaded once; its ``__main__`` does not run)."""
    spec = importlib.util.spec_from_file_location("_nemo_opd_memory_recipe", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    """``python -m nemo_opd.launch.memory``: print the plan of a recipe preset with overrides;
    returns 0 when it fits the GPU memory, 1 when it does not."""
    from nemo_opd.launch.recipe import apply_overrides, built_arguments, resolve_preset
    from nemo_opd.launch.verb import resolve_recipe

    parser = argparse.ArgumentParser(
        prog="python -m nemo_opd.launch.memory",
        description="Memory per GPU of a preset of recipes/onpolicy_qat.py (run from the "
                    "checkout; key=value overrides as the recipe takes them), from the models' "
                    "config.json files only.")
    parser.add_argument("--factory", "-f", default=None, help="preset (default: tiny)")
    parser.add_argument("--world", type=int, default=8,
                        help="GPUs in the job (default 8: one node); DP = world / (TP x PP)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0,
                        help="memory of one GPU in GiB (default 80: H100-80GB)")
    parser.add_argument("--no-flash-attention", action="store_true",
                        help="count the s x s attention scores (no fused attention)")
    args, overrides = parser.parse_known_args(argv)
    module = _recipe_module(resolve_recipe("onpolicy_qat"))
    task = resolve_preset(module.onpolicy_qat, args.factory, module.tiny)
    apply_overrides(task, overrides)
    kwargs = built_arguments(task)
    cfg = RunConfig(**{f.name: kwargs[f.name] for f in dataclasses.fields(RunConfig)
                       if f.name in kwargs})
    plan = plan_memory(cfg, args.world, flash_attention=not args.no_flash_attention)
    print(format_plan(plan, args.gpu_memory_gib))
    return 0 if plan.peak_gib <= args.gpu_memory_gib else 1


if __name__ == "__main__":
    sys.exit(main())
