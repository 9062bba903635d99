"""Mixture-of-experts teachers: Qwen3-MoE imported into megatron-core's MoE layers against HF's
own logits at TP=1, TP=2 and expert-parallel 2; bad MoE layouts refused before any weight."""

from __future__ import annotations

import pytest
import torch
from multirank import run_ranks

from nemo_opd.models.hf_config import check_parallel_fits, read_hf_config
from nemo_opd.runtime import ParallelConfig

SEQ = 24


def _hf_logits(model_dir: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float64, experts_implementation="eager")(ids).logits


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def _import_in_three_layouts(model_dir: str, unnormalised_dir: str) -> dict[str, float]:
    """Global (student) layout TP=1 on 2 ranks; the MoE model at TP=1 (global groups), at TP=2
    and at EP=2 (each on its own groups), every one against HF's float64 logits; and a model
    without ``norm_topk_prob`` (every layer MoE) at TP=1."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from nemo_opd.models.hf_import import load_hf_gpt
    from nemo_opd.runtime import distributed_runtime, model_process_groups

    config = read_hf_config(model_dir)
    ids = torch.randint(0, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    references = {d: _hf_logits(d, ids) for d in (model_dir, unnormalised_dir)}
    positions = torch.arange(SEQ).expand_as(ids)
    errors = {}
    with distributed_runtime(ParallelConfig()):
        for name, parallel, directory in (
                ("tp1", None, model_dir), ("tp2", ParallelConfig(2), model_dir),
                ("ep2", ParallelConfig(expert_model_parallel_size=2), model_dir),
                ("unnormalised", None, unnormalised_dir), ("ep2_bf16", ParallelConfig(
                    expert_model_parallel_size=2), model_dir)):
            groups = None if parallel is None else model_process_groups(parallel)
            dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
            model = load_hf_gpt(directory, parallel, pg_collection=groups, quantizable=False,
                                dtype=dtype)
            model.eval()
            with torch.no_grad():
                logits = model(ids, positions, attention_mask=None)
            tp_group = groups.tp if groups is not None else None
            if tp_group is not None and tp_group.size() > 1:
                logits = gather_from_tensor_model_parallel_region(logits, group=tp_group)
            errors[name] = _relative_error(logits, references[directory])
            errors[f"{name}_local_experts"] = len(model.decoder.layers[0].mlp.experts.local_experts)
    return errors


@pytest.fixture(scope="module")
def unnormalised_moe_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """Every layer MoE, routing weights not renormalised over the top-k (norm_topk_prob=False)."""
    from nemo_opd.models.tiny import MOE_FAMILY, TinyModelSpec, make_tiny_hf_model

    spec = TinyModelSpec(norm_topk_prob=False)
    return str(make_tiny_hf_model(tmp_path_factory.mktemp("moe_unnormalised") / "m", MOE_FAMILY,
                                  spec, seed=6, tokenizer=tiny_tokenizer))


@pytest.mark.multirank
def test_moe_import_matches_hf_at_tp1_tp2_and_ep2(tiny_moe_model_dir, unnormalised_moe_dir):
    config = read_hf_config(tiny_moe_model_dir)
    assert config.is_moe and config.moe_layers == (0, 2) and config.num_experts == 4
    unnormalised = read_hf_config(unnormalised_moe_dir)
    assert unnormalised.moe_layers == (0, 1) and not unnormalised.norm_topk_prob
    for errors in run_ranks(_import_in_three_layouts, world_size=2,
                            model_dir=tiny_moe_model_dir, unnormalised_dir=unnormalised_moe_dir):
        for layout in ("tp1", "tp2", "ep2", "unnormalised"):
            assert errors[layout] < 1e-5, errors
        assert errors["ep2_bf16"] < 5e-2, errors  # the presets' teacher dtype (router in fp32)
        assert errors["tp1_local_experts"] == errors["tp2_local_experts"] == 4, errors
        assert errors["ep2_local_experts"] == 2, errors


@pytest.mark.parametrize("parallel, message", [
    (ParallelConfig(expert_model_parallel_size=3), "num_experts = 4 is not divisible by expert"),
    (ParallelConfig(4), "moe_intermediate_size = 6 is not divisible by tensor"),
])
def test_moe_layout_that_does_not_fit_is_refused(tiny_moe_model_dir, parallel, message):
    import dataclasses

    config = dataclasses.replace(read_hf_config(tiny_moe_model_dir), moe_ffn_hidden_size=6)
    with pytest.raises(ValueError, match=message):
        check_parallel_fits(config, parallel)


def test_expert_parallelism_on_a_dense_model_is_refused(tiny_model_dirs):
    with pytest.raises(ValueError, match="expert_model_parallel_size = 2 needs an MoE model"):
        check_parallel_fits(read_hf_config(tiny_model_dirs["qwen3"]),
                            ParallelConfig(expert_model_parallel_size=2))
