"""HF -> megatron GPTModel import against the HF model's own logits, the tiny-model factory, and
bad model directories / layouts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from multirank import run_ranks

from nemo_opd.models.hf_import import load_hf_gpt, read_hf_config
from nemo_opd.runtime import ParallelConfig

SEQ = 16


def _hf_logits(model_dir: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(ids).logits


def _full_logits(model, ids: torch.Tensor, tp_group) -> torch.Tensor:
    """Megatron forward, vocab shards gathered over ``tp_group`` into ``[b, s, V]``."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        logits = model(ids, positions, attention_mask=None)
        return gather_from_tensor_model_parallel_region(logits, group=tp_group).float()


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(0))


def _import_at_tp2_with_tp1_teacher(model_dirs: dict[str, str]) -> dict[str, dict[str, float]]:
    """Global layout TP=2 (student); a TP=1 fp32 and a TP=1 bf16 copy built on their own groups."""
    from megatron.core import parallel_state

    from nemo_opd.runtime import distributed_runtime, model_process_groups

    errors = {}
    with distributed_runtime(ParallelConfig(tensor_model_parallel_size=2)):
        tp1_groups = model_process_groups(ParallelConfig(1))
        for family, model_dir in model_dirs.items():
            ids = _ids(read_hf_config(model_dir).vocab_size)
            reference = _hf_logits(model_dir, ids)
            student = load_hf_gpt(model_dir, ParallelConfig(2))
            teacher = load_hf_gpt(model_dir, ParallelConfig(1), pg_collection=tp1_groups)
            teacher_bf16 = load_hf_gpt(model_dir, ParallelConfig(1), dtype=torch.bfloat16,
                                       pg_collection=tp1_groups)
            assert student.output_layer.weight.shape[0] * 2 == teacher.output_layer.weight.shape[0]
            assert teacher_bf16.output_layer.weight.dtype == torch.bfloat16
            tp2_group = parallel_state.get_tensor_model_parallel_group()
            errors[family] = {
                "tp2": _relative_error(_full_logits(student, ids, tp2_group), reference),
                "tp1": _relative_error(_full_logits(teacher, ids, tp1_groups.tp), reference),
                "tp1_bf16": _relative_error(_full_logits(teacher_bf16, ids, tp1_groups.tp),
                                            reference),
            }
    return errors


def _import_as_single_process(model_dirs: dict[str, str]) -> dict[str, float]:
    """A plain `python script.py` (no torchrun variables): a world of one at TP=1."""
    import torch.distributed as dist

    from nemo_opd.runtime import distributed_runtime

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(var, None)
    errors = {}
    with distributed_runtime() as runtime:
        assert (runtime.rank, runtime.world_size, runtime.backend) == (0, 1, "gloo")
        for family, model_dir in model_dirs.items():
            ids = _ids(read_hf_config(model_dir).vocab_size)
            model = load_hf_gpt(model_dir)
            errors[family] = _relative_error(_full_logits(model, ids, dist.group.WORLD),
                                             _hf_logits(model_dir, ids))
    assert not dist.is_initialized()
    return errors


@pytest.mark.multirank
def test_import_matches_hf_logits_at_tp2_and_tp1_teacher_in_one_job(tiny_model_dirs):
    results = run_ranks(_import_at_tp2_with_tp1_teacher, world_size=2, model_dirs=tiny_model_dirs)
    for errors in results:
        for family in ("llama", "qwen3"):
            assert errors[family]["tp2"] < 1e-5, (family, errors[family])
            assert errors[family]["tp1"] < 1e-5, (family, errors[family])
            assert errors[family]["tp1_bf16"] < 5e-2, (family, errors[family])


@pytest.mark.multirank
def test_import_matches_hf_logits_single_process(tiny_model_dirs):
    (errors,) = run_ranks(_import_as_single_process, world_size=1, model_dirs=tiny_model_dirs)
    assert errors["llama"] < 1e-5 and errors["qwen3"] < 1e-5, errors


def test_tiny_factory_writes_a_loadable_hf_directory(tiny_model_dirs, tiny_tokenizer):
    from transformers import AutoTokenizer

    for family, arch in (("llama", "LlamaForCausalLM"), ("qwen3", "Qwen3ForCausalLM")):
        model_dir = Path(tiny_model_dirs[family])
        assert (model_dir / "model.safetensors").is_file()
        config = read_hf_config(model_dir)
        assert config.architecture == arch
        assert config.vocab_size % 128 == 0 and config.vocab_size >= len(tiny_tokenizer)
        assert config.qk_layernorm == (family == "qwen3")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        text = "question: what is 12 plus 30? answer: 42"
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


# ---------------------------------------------------------------------------------- bad input


def _config_only_dir(tmp_path: Path, source_dir: str, **overrides) -> Path:
    """A model directory holding only config.json: loading any weight would fail differently."""
    raw = json.loads((Path(source_dir) / "config.json").read_text())
    raw.update(overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_missing_directory_or_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_gpt(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_hf_gpt(tmp_path)


def test_unsupported_architecture_lists_supported(tmp_path, tiny_model_dirs):
    model_dir = _config_only_dir(tmp_path, tiny_model_dirs["llama"],
                                 architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError,
                       match=r"unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        load_hf_gpt(model_dir)


@pytest.mark.parametrize(
    ("overrides", "tp", "message"),
    [
        ({"num_attention_heads": 6, "num_key_value_heads": 2}, 4,
         r"num_attention_heads = 6 is not divisible by tensor_model_parallel_size = 4"),
        ({"num_key_value_heads": 1}, 2, r"num_key_value_heads = 1 is not divisible by .* = 2"),
        ({"intermediate_size": 129}, 2, r"intermediate_size = 129 is not divisible by .* = 2"),
    ],
)
def test_layout_that_does_not_fit_fails_before_weights(tmp_path, tiny_model_dirs, overrides, tp,
                                                        message):
    model_dir = _config_only_dir(tmp_path, tiny_model_dirs["qwen3"], **overrides)
    with pytest.raises(ValueError, match=message):
        load_hf_gpt(model_dir, ParallelConfig(tensor_model_parallel_size=tp))


def test_unsupported_rope_scaling(tmp_path, tiny_model_dirs):
    model_dir = _config_only_dir(tmp_path, tiny_model_dirs["llama"], rope_parameters=None,
                                 rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="RoPE scaling .* not supported"):
        read_hf_config(model_dir)


def test_moe_families_modelopt_does_not_map_are_refused_by_name(tmp_path, tiny_model_dirs):
    model_dir = _config_only_dir(tmp_path, tiny_model_dirs["qwen3"],
                                 architectures=["MixtralForCausalLM"], num_local_experts=8)
    with pytest.raises(ValueError, match=r"unsupported architecture 'MixtralForCausalLM'.*"
                                         r"Qwen3MoeForCausalLM"):
        load_hf_gpt(model_dir)


@pytest.mark.parametrize(("overrides", "sliding_layers"), [
    # transformers < 5 configs: no layer_types, Qwen2's rule decides.
    ({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
      "layer_types": None}, "[1]"),
    ({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8}, "[0]"),
])
def test_sliding_window_attention_is_refused_not_ignored(tmp_path, tiny_model_dirs, overrides,
                                                         sliding_layers):
    model_dir = _config_only_dir(tmp_path, tiny_model_dirs["qwen3"], **overrides)
    with pytest.raises(ValueError, match=rf"sliding-window attention \(window 8\) on layers "
                                         rf"\{sliding_layers[:-1]}\]"):
        load_hf_gpt(model_dir)


def test_sliding_window_fields_that_slide_no_layer_are_accepted(tmp_path, tiny_model_dirs):
    # Qwen2/Qwen3 write use_sliding_window=false or max_window_layers >= num_hidden_layers in
    # their released configs: full attention everywhere.
    for overrides in ({"use_sliding_window": False, "sliding_window": 8, "layer_types": None},
                      {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2,
                       "layer_types": None}):
        model_dir = _config_only_dir(tmp_path / str(len(overrides)), tiny_model_dirs["qwen3"],
                                     **overrides)
        assert read_hf_config(model_dir).num_layers == 2
