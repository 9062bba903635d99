"""LoRA on the quantized student (nemo_opd.quant.lora): only adapters train, at TP=1 and TP=2 (same
adapters give the same logits before and after a step and after merging), merge_lora equals the
float64 W + (alpha/r) B A and re-calibrates the weight quantizers, and export merges and writes
the merged model with the codes the merged student uses."""

from __future__ import annotations

import zlib

import pytest
import torch
from multirank import run_ranks

SEQ = 16
LORA_FORMATS = ["int4", "nvfp4_w4a16"]  # per-block amax; per-tensor (TP-synchronised) amax
ADAPTER = "default"


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(0))
    return ids, torch.arange(SEQ).expand_as(ids)


def _logits(model, group) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    ids, positions = _inputs()
    return gather_from_tensor_model_parallel_region(model(ids, positions, attention_mask=None),
                                                    group=group)


def _full_adapter(name: str, module, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic A [r, in], B [out, r] at the full (TP=1) shape of linear ``name``."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    a = torch.randn(rank, module.input_size, generator=generator) * module.input_size**-0.5
    b = torch.randn(module.output_size, rank, generator=generator) * 0.01
    return a, b


def _local_adapter(name: str, module, tp: int, tp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This TP rank's shard of :func:`_full_adapter`, in megatron's sharding of the base linear:
    column-parallel (qkv, fc1) splits output rows, fc1 per half ([gate; up]); row-parallel
    (proj, fc2) splits input columns."""
    rank = module._lora_adapters[ADAPTER]["lora_a"].weight.shape[0]
    a, b = _full_adapter(name, module, rank)
    if name.endswith(("linear_proj", "linear_fc2")):
        return a.chunk(tp, dim=1)[tp_rank].contiguous(), b
    halves = b.chunk(2) if name.endswith("linear_fc1") else (b,)
    return a, torch.cat([half.chunk(tp)[tp_rank] for half in halves])


def _set_adapters(model, tp: int, tp_rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Load the same adapters at any TP size; return this rank's (A, B) per linear."""
    from nemo_opd.quant.lora import has_lora_adapters

    assert has_lora_adapters(model)
    local = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if getattr(module, "_lora_adapters", None):
                a, b = _local_adapter(name, module, tp, tp_rank)
                adapter = module._lora_adapters[ADAPTER]
                adapter["lora_a"].weight.copy_(a)
                adapter["lora_b"].weight.copy_(b)
                local[name] = (a, b)
    return local


def _lora_checks(model_dir: str, tp: int, export_dir: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nemo_opd.models import load_hf_gpt
    from nemo_opd.quant.export import export_student
    from nemo_opd.quant.lora import (
        LoraConfig,
        add_lora,
        has_lora_adapters,
        lora_parameters,
        merge_lora,
    )
    from nemo_opd.quant.student import quantize_student
    from nemo_opd.runtime import ParallelConfig, distributed_runtime

    ids, positions = _inputs()
    out: dict = {}
    with distributed_runtime(ParallelConfig(tensor_model_parallel_size=tp)):
        group = parallel_state.get_tensor_model_parallel_group()
        tp_rank = dist.get_rank(group)
        for fmt in LORA_FORMATS:
            model = load_hf_gpt(model_dir, ParallelConfig(tp))
            quantize_student(model, fmt, lambda m: m(ids, positions, attention_mask=None))
            add_lora(model)
            qkv = model.decoder.layers[0].self_attention.linear_qkv
            assert qkv._lora_adapters[ADAPTER]["scale"] == LoraConfig().scale == 2.0
            assert qkv._lora_adapters[ADAPTER]["lora_a"].weight.shape[0] == 32
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            adapters = {n for n, p in model.named_parameters() if ".lora_" in n}
            # 2 layers x (qkv, proj, fc1, fc2) x (A, B); output layer and embeddings get none
            assert trainable == adapters and len(adapters) == 16, sorted(trainable)
            assert {id(p) for p in lora_parameters(model)} == {
                id(p) for n, p in model.named_parameters() if n in adapters}
            local = _set_adapters(model, tp, tp_rank)

            base = {n: p.detach().clone() for n, p in model.named_parameters() if n not in adapters}
            buffers = {n: b.clone() for n, b in model.named_buffers()}  # quantizer amax etc.
            before = {n: p.detach().clone() for n, p in model.named_parameters() if n in adapters}
            _logits(model, group).float().pow(2).mean().backward()
            assert all(p.grad is None for n, p in model.named_parameters() if n not in adapters)
            assert all(p.grad is not None and bool(p.grad.abs().sum() > 0)
                       for n, p in model.named_parameters() if n in adapters)
            torch.optim.SGD(lora_parameters(model), lr=0.5).step()
            params = dict(model.named_parameters())
            assert all(torch.equal(params[n], value) for n, value in base.items())
            assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
            assert all(not torch.equal(params[n], value) for n, value in before.items())
            with torch.no_grad():
                trained = _logits(model, group)

            # float64 reference of the merge, from the trained adapters of this rank
            expected = {}
            for name in local:
                module = model.get_submodule(name)
                adapter = module._lora_adapters[ADAPTER]
                delta = adapter["lora_b"].weight.double() @ adapter["lora_a"].weight.double()
                expected[name] = module.weight.double() + 2.0 * delta
            if tp == 1 and fmt == "int4":  # export merges unmerged adapters itself
                from test_quant_export import (
                    code_mismatches,
                    fake_quantized_weights,
                    read_checkpoint,
                )

                result = export_student(model, model_dir, export_dir)
                out["export"] = (result.codes_total, code_mismatches(
                    "int4", read_checkpoint(export_dir), fake_quantized_weights(model)))
            else:
                assert merge_lora(model) == 8
            assert not has_lora_adapters(model)
            assert {n for n, _ in model.named_parameters() if ".lora_" in n} == set()
            for name, weight in expected.items():
                module = model.get_submodule(name)
                torch.testing.assert_close(module.weight.double(), weight, rtol=1e-6, atol=1e-7)
                amax = module.weight_quantizer.amax
                if fmt == "int4":  # block amax re-calibrated on the merged weight, per rank
                    blocks = module.weight.detach().reshape(-1, 128).abs().amax(-1, keepdim=True)
                    assert torch.equal(amax, blocks), name
                else:  # NVFP4 global amax: max |merged W| over the whole (TP-sharded) weight
                    whole = module.weight.detach().abs().max().reshape(amax.shape)
                    dist.all_reduce(whole, op=dist.ReduceOp.MAX, group=group)
                    assert torch.equal(amax, whole), name
            with torch.no_grad():
                out[fmt] = {"trained": trained, "merged": _logits(model, group)}

        if tp > 1:
            try:
                export_student(model, model_dir, export_dir)
            except ValueError as error:
                out["tp_error"] = str(error)

        # Without quantization the merge is exact: merged logits == adapter logits.
        model = load_hf_gpt(model_dir, ParallelConfig(tp))
        add_lora(model)
        _set_adapters(model, tp, tp_rank)
        with torch.no_grad():
            with_adapters = _logits(model, group)
            merge_lora(model)
            out["unquantized"] = (with_adapters, _logits(model, group))
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.multirank
def test_lora_trains_adapters_only_merges_and_exports_at_tp1_and_tp2(tiny_quant_model_dir,
                                                                     tmp_path):
    (tp1,) = run_ranks(_lora_checks, world_size=1, model_dir=tiny_quant_model_dir, tp=1,
                       export_dir=str(tmp_path / "tp1"))
    tp2 = run_ranks(_lora_checks, world_size=2, model_dir=tiny_quant_model_dir, tp=2,
                    export_dir=str(tmp_path / "tp2"))
    for fmt in LORA_FORMATS:
        for rank in tp2:
            # weight-only formats: same adapters, same step -> same model (summation order only)
            assert _relative(rank[fmt]["trained"], tp1[fmt]["trained"]) < 1e-5, fmt
            assert _relative(rank[fmt]["merged"], tp1[fmt]["merged"]) < 1e-5, fmt
        # merge-then-requantize is a different model from base-quantized + high-precision adapters
        assert _relative(tp1[fmt]["merged"], tp1[fmt]["trained"]) > 1e-3, fmt
    for result in (tp1, *tp2):
        with_adapters, merged = result["unquantized"]
        assert _relative(merged, with_adapters) < 1e-5
    codes_total, (wrong, compared) = tp1["export"]
    assert codes_total == compared == 1_179_648 and wrong == 0
    assert all("TP = PP = 1" in rank["tp_error"] for rank in tp2)


def test_lora_config_checks():
    from nemo_opd.quant.lora import LoraConfig

    assert LoraConfig().scale == 2.0
    with pytest.raises(ValueError, match="LoraConfig.rank must be >= 1, got 0"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="LoraConfig.alpha must be > 0, got -1"):
        LoraConfig(alpha=-1)
    with pytest.raises(ValueError, match="at least one linear"):
        LoraConfig(targets=())
