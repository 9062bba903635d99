"""Quantized student in megatron distributed checkpoints: save at TP=2, restore at TP=2 (identical
logits) and at TP=1 (equal logits: ModelOpt's GLU-split bug fixed), and bad input."""

from __future__ import annotations

import pytest
import torch
from multirank import run_ranks

SEQ = 16
FORMATS = ["int4", "fp8", "nvfp4"]


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(0))
    return ids, torch.arange(SEQ).expand_as(ids)


def _logits(model) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    ids, positions = _inputs()
    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(model(ids, positions, attention_mask=None))


def _save(model_dir: str, checkpoint_root: str) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from modelopt.torch.opt.plugins.megatron import _MegatronMLP

    from nemo_opd.models import load_hf_gpt
    from nemo_opd.models.checkpoint import save_model_checkpoint
    from nemo_opd.quant.student import quantize_student
    from nemo_opd.runtime import ParallelConfig, distributed_runtime

    unfixed_sharded_state_dict = _MegatronMLP.sharded_state_dict
    ids, positions = _inputs()
    out = {}
    with distributed_runtime(ParallelConfig(tensor_model_parallel_size=2)):
        for fmt in FORMATS:
            model = load_hf_gpt(model_dir, ParallelConfig(2))
            quantize_student(model, fmt, lambda m: m(ids, positions, attention_mask=None))
            save_model_checkpoint(model, f"{checkpoint_root}/{fmt}")
            out[fmt] = _logits(model)
            if fmt == "int4":  # ModelOpt's own method leaves fc1's blockwise amax un-split
                mlp = model.decoder.layers[0].mlp
                key = "mlp.linear_fc1.weight_quantizer._amax"
                out["fixed_splits"] = isinstance(mlp.sharded_state_dict("mlp.")[key],
                                                 ShardedTensorFactory)
                out["unfixed_splits"] = isinstance(unfixed_sharded_state_dict(mlp, "mlp.")[key],
                                                   ShardedTensorFactory)
    return out


def _restore(model_dir: str, checkpoint_root: str, tp: int) -> dict:
    from nemo_opd.models.checkpoint import load_model_checkpoint
    from nemo_opd.models.hf_import import build_gpt_model, read_hf_config
    from nemo_opd.quant.student import enabled_quantizers
    from nemo_opd.runtime import ParallelConfig, distributed_runtime

    out = {}
    with distributed_runtime(ParallelConfig(tensor_model_parallel_size=tp)):
        for fmt in FORMATS:
            model = build_gpt_model(read_hf_config(model_dir), ParallelConfig(tp))
            model = load_model_checkpoint(model, f"{checkpoint_root}/{fmt}")
            assert enabled_quantizers(model)["weight"], fmt
            out[fmt] = _logits(model)
    return out


@pytest.mark.multirank
def test_save_tp2_restore_tp2_and_tp1(tiny_quant_model_dir, tmp_path):
    saved = run_ranks(_save, world_size=2, model_dir=tiny_quant_model_dir,
                      checkpoint_root=str(tmp_path))[0]
    assert saved["fixed_splits"] and not saved["unfixed_splits"]
    same_tp = run_ranks(_restore, world_size=2, model_dir=tiny_quant_model_dir,
                        checkpoint_root=str(tmp_path), tp=2)
    (tp1,) = run_ranks(_restore, world_size=1, model_dir=tiny_quant_model_dir,
                       checkpoint_root=str(tmp_path), tp=1)
    for fmt in FORMATS:
        for rank in same_tp:
            torch.testing.assert_close(rank[fmt], saved[fmt], rtol=0, atol=0)
        error = ((tp1[fmt] - saved[fmt]).abs().max() / saved[fmt].abs().max()).item()
        # Unfixed ModelOpt: INT4 restores ~4-8 % off. Summation order alone gives ~1e-6.
        assert error < 1e-5, (fmt, error)


def test_restore_from_a_directory_that_is_no_checkpoint(tmp_path):
    from nemo_opd.models.checkpoint import load_model_checkpoint

    with pytest.raises(FileNotFoundError, match="not a megatron distributed checkpoint"):
        load_model_checkpoint(torch.nn.Linear(2, 2), tmp_path)
