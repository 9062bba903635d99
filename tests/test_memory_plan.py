"""The memory planner (nemo_opd.launch.memory): parameter counts and plans against figures
computed by hand below (independently of the planner's code), the published sizes of the seeds'
models (docs/model_configs), the recipe's pre-submission check refusing a layout over budget
from config.json alone, the CLI, and docs/scaling.md against the planner."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_opd.config import (
    DataConfig,
    DistillConfig,
    ModelConfig,
    OptimConfig,
    QuantConfig,
    RunConfig,
)
from nemo_opd.launch import executors
from nemo_opd.launch.executors import (
    docker_executor,
    executor_gpu_memory_gib,
    local_executor,
    slurm_executor,
)
from nemo_opd.launch.memory import (
    GIB,
    RUNTIME_RESERVE_GIB,
    MemoryBudgetError,
    _recipe_module,
    check_memory_fits,
    layer_activation_bytes,
    main,
    plan_memory,
    read_model_shape,
)
from nemo_opd.launch.recipe import apply_overrides, built_arguments
from nemo_opd.rollout.engine import SamplingParams
from nemo_opd.runtime import ParallelConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "docs/model_configs"

# A tiny Llama: V=1000, h=64, L=4, a=4 heads, g=2 KV heads, d=16, f=128, untied.
TINY_DENSE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 64,
              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "tie_word_embeddings": False}
# By hand: embedding + output 2·1000·64 = 128000; per layer q 64·64 + k 64·32 + v 64·32 +
# o 64·64 = 12288, MLP 3·64·128 = 24576, two norms 128 -> 36992; 4 layers 147968; final norm 64.
TINY_DENSE_PARAMS = 128_000 + 4 * 36_992 + 64  # 276032
TINY_DENSE_QUANTIZED_PER_LAYER = 12_288 + 24_576  # 36864

# A tiny Qwen3-MoE: 8 experts of width 32, top-2, every 2nd layer sparse but layer 3 dense:
# MoE layers are those with (i + 1) % 2 == 0 and i not in [3] -> only layer 1.
TINY_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 1000, "hidden_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "intermediate_size": 128, "moe_intermediate_size": 32,
            "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 2,
            "mlp_only_layers": [3], "tie_word_embeddings": False}
# By hand: attention 12288 per layer; norms 2·64 + q/k norms 2·16 = 160. Dense layers 0, 2, 3:
# 12288 + 24576 + 160 = 37024 each. MoE layer 1: experts 8·3·64·32 = 49152, router 64·8 = 512:
# 12288 + 49152 + 512 + 160 = 62112. Plus embedding + output 128000, final norm 64.
TINY_MOE_PARAMS = 128_000 + 3 * 37_024 + 62_112 + 64  # 301248
TINY_MOE_ACTIVE = TINY_MOE_PARAMS - (8 - 2) * 3 * 64 * 32  # 264384


def _model_dir(root: Path, name: str, config: dict) -> Path:
    """An HF model directory holding config.json and nothing else: no weight file at all."""
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def _copy_config(root: Path, name: str) -> Path:
    return _model_dir(root, name, json.loads((CONFIGS / name / "config.json").read_text()))


def _cfg(student: Path, teacher: Path | str = "", **sections) -> RunConfig:
    """bf16 student and teacher, TP=1, INT4, 2 rows of prompt 8 + response 8 tokens, λ=1."""
    model = dict(student=str(student), teacher=str(teacher), student_dtype="bfloat16",
                 teacher_dtype="bfloat16")
    return RunConfig(
        model=ModelConfig(**{**model, **sections.pop("model", {})}),
        data=DataConfig(train_files=("unused.jsonl",), max_prompt_length=8,
                        max_response_length=8),
        quant=QuantConfig(**{"format": "int4", **sections.pop("quant", {})}),
        distill=DistillConfig(**sections.pop("distill", {})),
        sampling=SamplingParams(max_new_tokens=8),
        optim=OptimConfig(**{"micro_batch_size": 2, **sections.pop("optim", {})}), **sections)


def _items(plan) -> dict[str, float]:
    return {item.name: item.bytes for item in plan.items}


@pytest.fixture(scope="module")
def recipe():
    """recipes/onpolicy_qat.py, loaded once per process by the planner's CLI loader (the CLI
    tests below reuse the same module, so its presets are registered once)."""
    return _recipe_module(ROOT / "recipes/onpolicy_qat.py")


# ------------------------------------------------------------------------------ model shapes


def test_tiny_dense_and_moe_parameter_counts_by_hand(tmp_path):
    dense = read_model_shape(_model_dir(tmp_path, "dense", TINY_DENSE))
    assert dense.head_dim == 16 and not dense.is_moe
    assert dense.total_params() == dense.active_params() == TINY_DENSE_PARAMS == 276_032
    moe = read_model_shape(_model_dir(tmp_path, "moe", TINY_MOE))
    assert moe.moe_layers == (1,) and moe.qk_layernorm
    assert moe.total_params() == TINY_MOE_PARAMS == 301_248
    assert moe.active_params() == TINY_MOE_ACTIVE == 264_384
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts.
    renamed = {k: v for k, v in TINY_MOE.items() if k != "num_experts"}
    assert read_model_shape(_model_dir(tmp_path, "moe5", {**renamed, "num_local_experts": 8})
                            ).total_params() == TINY_MOE_PARAMS


@pytest.mark.parametrize(("name", "total", "active"), [
    ("Qwen3-4B", 4.0e9, None),                # model card: 4.0B
    ("Qwen3-30B-A3B", 30.5e9, 3.3e9),         # model card: 30.5B total, 3.3B activated
    ("Llama-3.1-8B-Instruct", 8.03e9, None),  # 8.03B
    ("Llama-3.3-70B-Instruct", 70.6e9, None),  # 70.6B
])
def test_published_sizes(name, total, active):
    shape = read_model_shape(CONFIGS / name)
    assert shape.total_params() == pytest.approx(total, rel=0.01)
    assert shape.active_params() == pytest.approx(active or total, rel=0.02)


def test_unusable_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        read_model_shape(tmp_path)
    with pytest.raises(FileNotFoundError, match="model directory .*nowhere does not exist"):
        read_model_shape(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"gpt2/config\.json: unsupported architecture "
                                         r"'GPT2LMHeadModel'"):
        read_model_shape(_model_dir(tmp_path, "gpt2", {"architectures": ["GPT2LMHeadModel"]}))
    no_layers = {k: v for k, v in TINY_DENSE.items() if k != "num_hidden_layers"}
    with pytest.raises(ValueError, match=r"broken/config\.json: field 'num_hidden_layers' is "
                                         "missing"):
        read_model_shape(_model_dir(tmp_path, "broken", no_layers))
    with pytest.raises(ValueError, match="ModelShape.ffn_hidden_size must be >= 1, got 0"):
        read_model_shape(_model_dir(tmp_path, "zero", {**TINY_DENSE, "intermediate_size": 0}))
    moe = _model_dir(tmp_path, "moe", TINY_MOE)
    with pytest.raises(ValueError, match="an MoE student .* cannot be planned"):
        plan_memory(_cfg(moe), 1)


# --------------------------------------------------------------------------------- formulas


def test_activation_formulas_by_hand(tmp_path):
    """Korthikanti et al. Table 2 at s=16, b=2, h=64, a=4, 16-bit activations."""
    shape = read_model_shape(_model_dir(tmp_path, "dense", TINY_DENSE))
    sbh = 16 * 2 * 64

    def layer(tp: int, sp: bool, scores: bool) -> float:
        return layer_activation_bytes(shape, 16, 2, ParallelConfig(tp, sequence_parallel=sp),
                                      scores=scores, dtype_bytes=2)

    assert layer(1, False, True) == sbh * (34 + 5 * 4 * 16 / 64) == 79_872  # sbh(34 + 5as/h)
    assert layer(1, False, False) == sbh * 34
    assert layer(2, False, True) == sbh * (10 + 24 / 2) + 5 * 4 * 16 * 16 * 2 / 2 == 50_176
    assert layer(2, True, True) == sbh * 34 / 2 + 5 * 4 * 16 * 16 * 2 / 2 == 39_936
    assert layer_activation_bytes(shape, 16, 2, ParallelConfig(), scores=False,
                                  dtype_bytes=4) == 2 * sbh * 34  # fp32 counts twice


def test_dense_plan_by_hand(tmp_path):
    """Every line of a self-distillation plan: bf16, TP=1, DP=2 (distributed optimizer), INT4
    block 128, 2 rows x (8 + 8) tokens, on-policy, loss="full", no recompute, flash attention."""
    student = _model_dir(tmp_path, "dense", TINY_DENSE)
    plan = plan_memory(_cfg(student), 2)
    quantized = 4 * TINY_DENSE_QUANTIZED_PER_LAYER  # 147456
    layer = 16 * 2 * 64 * 34  # s·b·h·34 (TP=1, scores dropped with flash attention)
    logits = 2 * 16 * 1000 * 2  # [rows, tokens, V] x 2 B
    workspace = 6 * 4 * 2 * 16 * 1000  # six fp32 chunk buffers, smaller than 2^25 elements here
    expected = {
        "student weights": TINY_DENSE_PARAMS * 2,
        "gradients (fp32 grad buffer)": TINY_DENSE_PARAMS * 4,
        "master weights + Adam moments (fp32)": TINY_DENSE_PARAMS * 12 / 2,
        "teacher weights (original weights: self-distillation)": TINY_DENSE_PARAMS * 2,
        "ModelOpt quantizer state (amax)": quantized * 4 / 128,
        "quantized weight copy (quantize once per rollout)": quantized * 2,
        "KV cache": 2 * 4 * 16 * 2 * 2 * 16 * 2,  # K,V x layers x tokens x rows x g x d x 2 B
        "prefill working set (1 layer)": 8 * 2 * 64 * 34,  # the 8 prompt tokens
        "teacher logits + top-k workspace + 1 layer": logits + workspace + layer,
        "activations (recompute none, flash attention)": 4 * layer,
        "fake-quant weights kept for backward": quantized * 2,  # one Q(W) per layer, all kept
        "logits: student + loss gradient + teacher logits": 2 * logits + logits + workspace,
    }
    items = _items(plan)
    assert {k: items[k] for k in expected} == pytest.approx(expected)
    resident = sum(expected[k] for k in list(expected)[:5])
    student_pass = sum(expected[k] for k in list(expected)[-3:])
    tensors = resident + student_pass  # the student pass is the largest phase here
    assert plan.peak_bytes == pytest.approx(tensors * 1.05 + RUNTIME_RESERVE_GIB * GIB)
    assert "the only pipeline stage: student TP=1 PP=1 DP=2" in plan.rank

    # LoRA r=4: adapters r·(4h + ((a + 2g)·d + a·d + 3f)) = 4·(256 + 128 + 64 + 384) per layer.
    lora = 4 * 4 * (4 * 64 + (4 + 4) * 16 + 4 * 16 + 3 * 128)
    items = _items(plan_memory(_cfg(student, quant={"lora": True, "lora_r": 4}), 2))
    assert items["student weights"] == (TINY_DENSE_PARAMS + lora) * 2
    assert items["gradients (fp32 grad buffer)"] == lora * 4
    assert items["master weights + Adam moments (fp32)"] == lora * 12 / 2


def test_recompute_pipeline_and_teacher_layouts_by_hand(tmp_path):
    dense = _model_dir(tmp_path, "dense", TINY_DENSE)
    moe = _model_dir(tmp_path, "moe", TINY_MOE)
    layer, checkpoint = 16 * 2 * 64 * 34, 16 * 2 * 64 * 2  # full layer; a layer input, 2 B
    full = _cfg(dense, model={"recompute_granularity": "full", "recompute_num_layers": 2})
    items = _items(plan_memory(full, 1))
    # uniform: 2 groups' inputs stored, one group of 2 layers rebuilt (and its 2 Q(W)) in backward
    assert items["activations (recompute full, flash attention)"] == 2 * checkpoint + 2 * layer
    assert items["fake-quant weights kept for backward"] == 2 * TINY_DENSE_QUANTIZED_PER_LAYER * 2
    block = _cfg(dense, model={"recompute_granularity": "full", "recompute_method": "block",
                               "recompute_num_layers": 1})
    # block: layer 0 recomputed (its input stored), layers 1-3 store everything, +1 rebuilt
    assert _items(plan_memory(block, 1))["activations (recompute full, flash attention)"] == \
        checkpoint + 3 * layer + layer

    # PP=2 (off-policy: the rollout engine needs PP=1), 4 micro batches: the first stage holds
    # min(2, 4) = 2 in flight of its 2 layers, the last stage 1 plus the logits; the worst of
    # the two is reported.
    piped = _cfg(dense, model={"student_parallel": ParallelConfig(1, 2),
                               "teacher_parallel": ParallelConfig(1, 2)},
                 optim={"grad_accumulation": 4}, distill={"lmbda": 0.0})
    plan = plan_memory(piped, 2)
    first = "first pipeline stage of 2" in plan.rank
    assert _items(plan)["activations (recompute none, flash attention)"] == \
        (2 if first else 1) * 2 * layer

    # An MoE teacher at TP=2 x PP=2 beside a TP=1 x PP=2 student (loss="topk", off-policy): its
    # first stage holds layer 0 (dense) and layer 1 (MoE) and the embedding, per TP rank:
    # (12288 + 24576)/2 + 160 + (12288 + 49152)/2 + 160 + 512 + 1000·64/2 = 81984 params; the last
    # (layers 2, 3, final norm, output) 2·18592 + 64 + 32000 = 69248.
    cfg = _cfg(dense, moe, distill={"loss": "topk", "lmbda": 0.0},
               model={"student_parallel": ParallelConfig(1, 2),
                      "teacher_parallel": ParallelConfig(2, 2)})
    plan = plan_memory(cfg, 4)
    assert "last pipeline stage of 2: student TP=1 PP=2 DP=2, teacher TP=2 PP=2" in plan.rank
    items = _items(plan)
    assert items["teacher weights"] == 81_984 * 2
    # The teacher's TP group spans 2 student data-parallel ranks: it scores 2 x 2 rows at once.
    assert items["teacher logits + top-k workspace + 1 layer"] == \
        4 * 16 * 500 * 2 + 6 * 4 * 4 * 16 * 500 + 16 * 4 * 64 * (10 + 24 / 2)
    assert items["logits: student + loss gradient + teacher top-64"] == \
        2 * (2 * 16 * 1000 * 2) + 2 * 16 * (12 * 64 + 4) + 6 * 4 * 2 * 16 * 1000


def test_moe_teacher_expert_parallelism_by_hand(tmp_path):
    """Experts are split by TP x EP on each rank, attention by TP, router and norms replicated:
    at the same TP, EP=2 holds half the expert bytes of EP=1; nothing else changes."""
    dense = _model_dir(tmp_path, "dense", TINY_DENSE)
    moe = _model_dir(tmp_path, "moe", TINY_MOE)

    def teacher(tp: int, ep: int, world: int):
        return plan_memory(_cfg(dense, moe, distill={"loss": "topk"}, model={
            "student_parallel": ParallelConfig(tp),
            "teacher_parallel": ParallelConfig(tp, expert_model_parallel_size=ep)}), world)

    # TP=1: the whole teacher (301248 params); EP=2 keeps 4 of the 8 experts of layer 1:
    # 301248 - 8·3·64·32/2 = 276672.
    ep1, ep2 = teacher(1, 1, 2), teacher(1, 2, 2)
    assert _items(ep1)["teacher weights"] == TINY_MOE_PARAMS * 2
    assert _items(ep2)["teacher weights"] == (TINY_MOE_PARAMS - 24_576) * 2 == 276_672 * 2
    assert "teacher TP=1 PP=1 EP=2;" in ep2.rank
    same = {k: v for k, v in _items(ep1).items() if k != "teacher weights"
            and not k.startswith("allocator")}
    assert same == {k: v for k, v in _items(ep2).items() if k in same}
    # TP=2: per rank, dense layers 0, 2, 3 (12288 + 24576)/2 + 160 = 18592 each; MoE layer 1
    # 12288/2 + 49152/(2·ep) + 512 + 160; embedding + output 2·1000·64/2; final norm 64.
    experts_tp2 = 49_152 / 2
    for ep in (1, 2):
        expected = 3 * 18_592 + 6_144 + experts_tp2 / ep + 672 + 64_000 + 64
        assert _items(teacher(2, ep, 4))["teacher weights"] == expected * 2
    assert expected == 138_944

    # Qwen3-30B-A3B at TP=2: 48 layers x 128 experts x 3·2048·768 split by TP, then by EP.
    student, big = CONFIGS / "Qwen3-4B", CONFIGS / "Qwen3-30B-A3B"
    experts_per_rank = 48 * 128 * 3 * 2048 * 768 / 2  # 14.5B parameters at EP=1

    def qwen(ep: int) -> float:
        return _items(plan_memory(_cfg(student, big, distill={"loss": "topk"}, model={
            "student_parallel": ParallelConfig(2),
            "teacher_parallel": ParallelConfig(2, expert_model_parallel_size=ep)}), 8)
        )["teacher weights"]

    assert qwen(1) - qwen(2) == pytest.approx(experts_per_rank / 2 * 2)  # 13.5 GiB of bf16
    assert qwen(2) - qwen(4) == pytest.approx(experts_per_rank / 4 * 2)


def test_padded_vocabulary_rows_by_hand(tmp_path):
    """V = 1001 at TP=2: the embedding, output layer and logits hold 1002 rows, 501 per rank."""
    odd = _model_dir(tmp_path, "odd", {**TINY_DENSE, "vocab_size": 1001})
    layout = ParallelConfig(2)
    plan = plan_memory(_cfg(odd, model={"student_parallel": layout,
                                        "teacher_parallel": layout}), 2)
    items = _items(plan)
    # 2 x 1002·64/2 + 4 layers x ((12288 + 24576)/2 + 128) + final norm 64 = 138432.
    assert items["student weights"] == 138_432 * 2
    elements = 2 * 16 * 501  # [rows, tokens, 1002/2]
    assert items["logits: student + loss gradient + teacher logits"] == \
        3 * elements * 2 + 6 * 4 * elements
    assert "[2, 16, 1002/2] x 2 B" in {i.detail for i in plan.items}


def test_layouts_that_cannot_shard_a_model_are_refused(tmp_path):
    dense = _model_dir(tmp_path, "dense", TINY_DENSE)
    moe = _model_dir(tmp_path, "moe", TINY_MOE)

    def cfg(teacher: Path, student_tp: int = 1, **teacher_layout):
        return _cfg(dense, teacher, distill={"loss": "topk"}, model={
            "student_parallel": ParallelConfig(student_tp),
            "teacher_parallel": ParallelConfig(**teacher_layout)})

    with pytest.raises(ValueError, match=r"model\.teacher_parallel does not fit .*moe: .*"
                                         r"num_experts = 8 is not divisible by "
                                         r"expert_model_parallel_size = 3"):
        plan_memory(cfg(moe, expert_model_parallel_size=3), 3)
    with pytest.raises(ValueError, match="expert_model_parallel_size = 4 must divide the "
                                         "data-parallel size 2"):
        plan_memory(cfg(moe, expert_model_parallel_size=4), 2)
    with pytest.raises(ValueError, match="expert_model_parallel_size = 2 needs an MoE model; "
                                         "LlamaForCausalLM is dense"):
        plan_memory(cfg(_model_dir(tmp_path, "dense2", TINY_DENSE),
                        expert_model_parallel_size=2), 2)
    with pytest.raises(ValueError, match=r"model\.student_parallel does not fit .*dense: .*"
                                         "num_attention_heads = 4 is not divisible by "
                                         "tensor_model_parallel_size = 3"):
        plan_memory(cfg(moe, student_tp=3, tensor_model_parallel_size=3), 3)
    assert plan_memory(cfg(moe, expert_model_parallel_size=2), 2).peak_bytes > 0
    assert plan_memory(cfg(moe, expert_model_parallel_size=8), 8).peak_bytes > 0


def test_expert_parallelism_brings_a_moe_teacher_under_budget():
    """Qwen3-30B-A3B beside a TP=1 Qwen3-4B on 8 x 80 GiB: the whole teacher (57 GiB) is
    refused, naming EP among the remedies; its experts over EP=8 fit."""
    def cfg(ep: int) -> RunConfig:
        return _cfg(CONFIGS / "Qwen3-4B", CONFIGS / "Qwen3-30B-A3B", distill={"loss": "topk"},
                    model={"teacher_parallel": ParallelConfig(expert_model_parallel_size=ep)},
                    optim={"micro_batch_size": 4})

    with pytest.raises(MemoryBudgetError, match=r"teacher weights 56\.9 GiB \(raise "
                                                r"model\.teacher_parallel\.tensor_model_"
                                                r"parallel_size or expert_model_parallel_size"):
        check_memory_fits(cfg(1), 8, 80.0)
    plan = check_memory_fits(cfg(8), 8, 80.0)
    assert plan is not None and "teacher TP=1 PP=1 EP=8" in plan.rank
    # 30.5B - 7/8 of the 29.0B expert parameters = 5.16B on each rank.
    assert _items(plan)["teacher weights"] / 2 == pytest.approx(
        30.532e9 - 48 * 128 * 3 * 2048 * 768 * 7 / 8, rel=1e-4)


# ---------------------------------------------------------------- pre-submission check (recipe)


def test_executors_say_when_gpus_are_targeted(tmp_path, monkeypatch):
    monkeypatch.setattr(executors.shutil, "which", lambda name: None)  # no nvidia-smi: CPU
    assert executor_gpu_memory_gib(None) is None
    assert executor_gpu_memory_gib(local_executor(2)) is None
    assert executor_gpu_memory_gib(local_executor(2, gpu_memory_gib=40.0)) == 40.0
    slurm = dict(account="a", container_image="/c.sqsh", job_dir=str(tmp_path))
    assert executor_gpu_memory_gib(slurm_executor(**slurm)) == 80.0
    assert executor_gpu_memory_gib(slurm_executor(**slurm, gpu_memory_gib=141.0)) == 141.0
    assert executor_gpu_memory_gib(slurm_executor(**slurm, gpu_memory_gib=0)) is None
    assert executor_gpu_memory_gib(docker_executor(container_image="x")) == 80.0
    assert executor_gpu_memory_gib(docker_executor(container_image="x", num_gpus=0)) is None
    with pytest.raises(ValueError, match="gpu_memory_gib must be a number of GiB >= 0"):
        slurm_executor(**slurm, gpu_memory_gib=-5.0)


def test_recipe_refuses_a_layout_over_budget_before_any_weight_loads(recipe, tmp_path):
    """The qwen3_4b_int4 preset on 8 GPUs of 40 GiB: refused from config.json alone (the model
    directory holds no weight file at all); the same layout on 80 GiB passes, plan printed."""
    student = _copy_config(tmp_path, "Qwen3-4B")
    task = recipe.qwen3_4b_int4()
    apply_overrides(task, [f"model.student={student}"])
    args = built_arguments(task)
    with pytest.raises(MemoryBudgetError) as refused:
        recipe.check(args, local_executor(8, gpu_memory_gib=40.0))
    message = str(refused.value)
    assert re.search(r"estimated peak memory per GPU \d+\.\d GiB exceeds the GPU's 40\.0 GiB "
                     r"\(run\.executor\.gpu_memory_gib\); largest: gradients \(fp32 grad "
                     r"buffer\) 15\.0 GiB \(quant\.lora=true; raise model\.student_parallel\."
                     r"tensor_model_parallel_size", message)
    assert "| resident | student weights | 7.49 |" in message  # the breakdown
    assert "DOES NOT FIT" in message
    assert sorted(p.name for p in student.iterdir()) == ["config.json"]


def test_recipe_prints_a_fitting_plan_and_skips_cpu_runs(recipe, tmp_path, capsys, monkeypatch):
    student = _copy_config(tmp_path, "Qwen3-4B")
    task = recipe.qwen3_4b_int4()
    apply_overrides(task, [f"model.student={student}"])
    args = built_arguments(task)
    recipe.check(args, local_executor(8, gpu_memory_gib=80.0))
    out = capsys.readouterr().out
    assert "Memory per GPU, the only pipeline stage: student TP=1 PP=1 DP=8" in out
    assert re.search(r"GPU memory 80\.0 GiB: fits, \d+\.\d GiB to spare", out)
    # CPU ranks (no nvidia-smi): nothing is planned, even for a layout over any budget.
    monkeypatch.setattr(executors.shutil, "which", lambda name: None)
    recipe.check(args, local_executor(1))
    assert capsys.readouterr().out == ""
    # A model directory this machine cannot read (a cluster path): skipped with a warning.
    with pytest.warns(UserWarning, match="memory plan skipped: model directory .*elsewhere "
                                         "does not exist"):
        assert check_memory_fits(dataclasses.replace(
            _cfg(student), model=ModelConfig(student=str(tmp_path / "elsewhere"))), 8,
            80.0) is None


def test_presets_fit_h100_on_one_node(recipe, tmp_path, monkeypatch, capsys):
    """Every real-model preset passes the check on one 8 x H100-80GB node; the size-distillation
    presets' docstrings state the planner's peak."""
    monkeypatch.setattr(executors.shutil, "which", lambda name: None)
    node = slurm_executor(account="a", container_image="/c.sqsh", job_dir=str(tmp_path),
                          gpus_per_node=8)
    for preset, student, teacher in (
            ("qwen3_4b_int4", "Qwen3-4B", None),
            ("llama31_8b_mxfp4", "Llama-3.1-8B-Instruct", None),
            ("qwen3_4b_from_qwen3_30b_a3b", "Qwen3-4B", "Qwen3-30B-A3B"),
            ("llama31_8b_from_llama33_70b", "Llama-3.1-8B-Instruct", "Llama-3.3-70B-Instruct")):
        task = getattr(recipe, preset)()
        apply_overrides(task, [f"model.student={CONFIGS / student}"]
                        + ([f"model.teacher={CONFIGS / teacher}"] if teacher else []))
        recipe.check(built_arguments(task), node)  # raises if the plan exceeds 80 GiB
        out = capsys.readouterr().out
        assert "GPU memory 80.0 GiB: fits" in out, preset
        if teacher:
            stated = re.search(r"The memory planner: (\d+\.\d) GiB per GPU",
                               " ".join(getattr(recipe, preset).__doc__.split()))
            assert stated and f"= {stated[1]} GiB per GPU" in out, (preset, out)


def test_nemo_run_refuses_before_submission(tmp_path):
    """As users type it: a local 8-GPU launch on 40 GiB GPUs stops at the check, exit 1."""
    student = _copy_config(tmp_path, "Qwen3-4B")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEMORUN_HOME": str(tmp_path / "home"),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [str(bin_dir / "nemo"), "run", "recipes/onpolicy_qat.py", "--factory", "qwen3_4b_int4",
         f"model.student={student}", f"output_dir={tmp_path / 'never'}", "run.executor=local",
         "run.executor.nproc_per_node=8", "run.executor.gpu_memory_gib=40"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert re.search(r"Error: estimated peak memory per GPU \d+\.\d GiB exceeds the GPU's "
                     r"40\.0 GiB", proc.stdout) and "DOES NOT FIT" in proc.stdout
    assert not (tmp_path / "never").exists()
    assert sorted(p.name for p in student.iterdir()) == ["config.json"]


# ------------------------------------------------------------------------------ CLI and docs


def test_cli_prints_the_plan_and_says_whether_it_fits(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["--factory", "qwen3_4b_int4", f"model.student={CONFIGS / 'Qwen3-4B'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| phase | memory | GiB | how |" in out and "fits" in out
    assert main([*args, "--gpu-memory-gib", "40"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main([*args, "--no-flash-attention"]) == 0
    assert "activations (recompute none)" in capsys.readouterr().out


def test_docs_scaling_table_is_what_the_planner_says(capsys, monkeypatch):
    """Each command in docs/scaling.md's regeneration block (continuation lines joined) gives
    the peak and the verdict of the summary table's row of the same number."""
    monkeypatch.chdir(ROOT)
    text = (ROOT / "docs/scaling.md").read_text()
    block = text.split("### Regenerate the table", 1)[1]
    commands = [shlex.split(line.split("nemo_opd.launch.memory", 1)[1])
                for line in block.replace("\\\n", " ").splitlines()
                if "python -m nemo_opd.launch.memory" in line]
    rows = re.findall(r"^\| \d+ \|.*\| (\d+\.\d) \| (fits|does not fit) \|$", text, re.M)
    assert commands and len(commands) == len(rows)
    for command, (peak, verdict) in zip(commands, rows, strict=True):
        code = main(command)
        out = capsys.readouterr().out
        printed = re.search(r"= (\d+\.\d) GiB per GPU", out)[1]
        assert (printed, code) == (peak, 0 if verdict == "fits" else 1), command

