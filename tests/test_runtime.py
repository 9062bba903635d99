"""Runtime: layout checks, the CPU RNG tracker, and TP=1 == TP=2 for a seeded random model."""

from __future__ import annotations

import pytest
import torch
from multirank import run_ranks

from nemo_opd.runtime import ParallelConfig


def test_parallel_config_rejects_nonpositive_sizes():
    with pytest.raises(ValueError, match="tensor_model_parallel_size must be a positive integer"):
        ParallelConfig(tensor_model_parallel_size=0)
    with pytest.raises(ValueError, match="pipeline_model_parallel_size"):
        ParallelConfig(pipeline_model_parallel_size=-1)


def test_layout_that_does_not_divide_world_is_rejected_before_any_group(monkeypatch):
    from nemo_opd.runtime import initialize_runtime

    # WORLD_SIZE=2 with no second rank: reaching init_process_group would block, so returning an
    # error proves the check runs first.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"world size 2 is not divisible by .*\(3\)"):
        initialize_runtime(ParallelConfig(tensor_model_parallel_size=3))


def test_cpu_rng_tracker_forks_like_cuda_tracker():
    from nemo_opd.runtime.cpu_backend import CpuRNGStatesTracker

    tracker = CpuRNGStatesTracker()
    tracker.add("stream", 5)
    torch.manual_seed(123)
    expected_outer = torch.Generator().manual_seed(123)
    reference = torch.Generator().manual_seed(5)
    with tracker.fork("stream"):
        first = torch.rand(4)
    outer = torch.rand(2)
    with tracker.fork("stream"):
        second = torch.rand(4)
    torch.testing.assert_close(first, torch.rand(4, generator=reference), rtol=0, atol=0)
    torch.testing.assert_close(second, torch.rand(4, generator=reference), rtol=0, atol=0)
    torch.testing.assert_close(outer, torch.rand(2, generator=expected_outer), rtol=0, atol=0)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("other", 5)
    with pytest.raises(KeyError, match="never added"):
        with tracker.fork("missing"):
            pass


def _loss_and_grad_norm(model, groups) -> tuple[float, float]:
    """Loss and gradient norm the trainer's way: megatron DDP (fp32 main grads) and
    finalize_model_grads, which sums the q/k-norm gradients each TP rank holds in part."""
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True), model, pg_collection=groups)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, dims=1)
    positions = torch.arange(12).expand(2, 12)
    # GPTModel(labels=...) computes its loss on megatron's *global* TP group (0.16's
    # vocab_parallel_cross_entropy takes no group), so gather the logits on the model's own group.
    logits = model(ids, positions, attention_mask=None)
    logits = gather_from_tensor_model_parallel_region(logits, group=groups.tp)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    finalize_model_grads([ddp], pg_collection=groups)
    sharded = torch.zeros(1, dtype=torch.float64)
    replicated = torch.zeros(1, dtype=torch.float64)
    for param in model.parameters():
        square = param.main_grad.double().pow(2).sum()
        if getattr(param, "tensor_model_parallel", False):
            sharded += square
        else:
            replicated += square
    dist.all_reduce(sharded, group=groups.tp)
    return loss.item(), (sharded + replicated).sqrt().item()


def _tp_equivalence_body(model_dir: str) -> dict[str, tuple[float, float]]:
    from megatron.core.process_groups_config import ProcessGroupCollection

    from nemo_opd.models.hf_import import build_gpt_model, read_hf_config
    from nemo_opd.runtime import distributed_runtime, model_process_groups, seed_all

    config = read_hf_config(model_dir)
    with distributed_runtime(ParallelConfig(tensor_model_parallel_size=2), seed=7):
        seed_all(7)
        tp2 = build_gpt_model(config, ParallelConfig(2))
        tp1_groups = model_process_groups(ParallelConfig(1))
        seed_all(7)
        tp1 = build_gpt_model(config, ParallelConfig(1), pg_collection=tp1_groups)
        return {
            "tp2": _loss_and_grad_norm(tp2, ProcessGroupCollection.use_mpu_process_groups()),
            "tp1": _loss_and_grad_norm(tp1, tp1_groups),
        }


@pytest.mark.multirank
def test_seeded_model_same_loss_and_grad_norm_at_tp1_and_tp2(tiny_model_dirs):
    results = run_ranks(_tp_equivalence_body, world_size=2, model_dir=tiny_model_dirs["qwen3"])
    for rank_result in results:
        (loss2, norm2), (loss1, norm1) = rank_result["tp2"], rank_result["tp1"]
        assert loss2 == pytest.approx(loss1, rel=1e-6)
        assert norm2 == pytest.approx(norm1, rel=1e-6)
    assert results[0] == results[1]
