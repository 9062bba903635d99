"""On a GPU: ModelOpt's CUDA kernels against our CPU path on a real quantized student, and the
CUDA/NCCL runtime and losses against CPU float64. Skipped on CPU-only machines (CI).

These are the checks only a GPU can make: the CPU MX/NVFP4 backend claims to reproduce ModelOpt's
kernels bit for bit, and the test suite elsewhere proves it only against our own reading of them.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

FORMATS = ["mxfp4", "mxfp4_w4a4", "nvfp4", "nvfp4_w4a16", "int4", "fp8"]
SEQ = 32


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """TF32 would make CUDA logits differ from CPU ones for reasons unrelated to quantization."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _capture_quantizer_inputs(model: torch.nn.Module) -> tuple[dict, list]:
    """Hooks recording what each enabled TensorQuantizer receives during one forward."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled:
            def hook(_module, args, _name=name):
                seen.setdefault(_name, args[0].detach().clone())
            handles.append(module.register_forward_pre_hook(hook))
    return seen, handles


def _explained(quantizer, x: torch.Tensor, out_gpu: torch.Tensor,
               out_cpu: torch.Tensor) -> torch.Tensor:
    """Elements where CUDA and CPU may differ for a known, documented reason (docs/quantization.md):

    * NVFP4: ``|x| / s`` within 2 ulps of an E2M1 rounding boundary, where Triton's approximate
      float32 division may round the other way than an IEEE division;
    * FP8 (ModelOpt's own CPU code vs its CUDA extension, not ours): the same E4M3 code, the
      dequantized value up to two ulps of the dtype apart (measured on an H100: 1.6 ulps at most;
      the extension orders the scaling arithmetic differently).
    """
    from test_quant_cpu_backend import nvfp4_near_ties

    from nemo_opd.quant import dynamic_block_format

    if dynamic_block_format(quantizer.num_bits, quantizer.block_sizes) == "nvfp4":
        return nvfp4_near_ties(x, quantizer._get_amax(x).amax().item())
    if quantizer.num_bits == (4, 3) and not quantizer.block_sizes:
        two_ulps = 2 * torch.finfo(x.dtype).eps * out_cpu.abs()
        return (out_gpu - out_cpu).abs() <= two_ulps
    return torch.zeros_like(x, dtype=torch.bool)


def _quantize_both_ways(quantizer, cuda_input: torch.Tensor) -> dict:
    """The quantizer on CUDA (ModelOpt's kernels) and a CPU copy of it (our backend or
    ModelOpt's CPU code) on the same input: outputs and straight-through gradients."""
    cpu_quantizer = copy.deepcopy(quantizer).cpu()  # copied before any call can touch state
    x_gpu = cuda_input.clone().requires_grad_()
    out_gpu = quantizer(x_gpu)
    out_gpu.backward(torch.ones_like(out_gpu))
    x_cpu = cuda_input.cpu().requires_grad_()
    out_cpu = cpu_quantizer(x_cpu)
    out_cpu.backward(torch.ones_like(out_cpu))
    assert out_cpu.device.type == "cpu", "the CPU copy must compute on the CPU"
    out_gpu, out_cpu = out_gpu.detach().cpu(), out_cpu.detach()
    differ = out_gpu != out_cpu
    explained = _explained(cpu_quantizer, x_cpu.detach(), out_gpu, out_cpu)
    return {"differ": int(differ.sum()), "unexplained": int((differ & ~explained).sum()),
            "numel": x_cpu.numel(), "grad_equal": torch.equal(x_gpu.grad.cpu(), x_cpu.grad)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantizers_on_cuda_equal_the_cpu_path(tiny_quant_model_dir, dtype):
    """Every enabled quantizer of a calibrated student, fed what it saw in a CUDA forward, gives
    the same bits on CUDA (ModelOpt's kernels) and on CPU (our backend / ModelOpt's CPU path),
    and the same straight-through gradient."""
    from nemo_opd.models import load_hf_gpt
    from nemo_opd.quant.student import quantize_student
    from nemo_opd.runtime import distributed_runtime

    ids = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(0)).cuda()
    positions = torch.arange(SEQ, device="cuda").expand_as(ids)
    report = {}
    with distributed_runtime() as runtime:
        assert runtime.backend == "nccl"
        for fmt in FORMATS:
            model = load_hf_gpt(tiny_quant_model_dir, dtype=dtype)
            quantize_student(model, fmt, lambda m: m(ids, positions, attention_mask=None))
            seen, handles = _capture_quantizer_inputs(model)
            with torch.no_grad():
                model(ids, positions, attention_mask=None)
            for handle in handles:
                handle.remove()
            assert len(seen) >= 8, (fmt, sorted(seen))  # 2 layers x 4 linears, weights at least
            modules = dict(model.named_modules())
            report[fmt] = {name: _quantize_both_ways(modules[name], x) for name, x in seen.items()}
    rows = [(f"{fmt} {name}: {r['differ']}/{r['numel']} differ ({r['unexplained']} unexplained), "
             f"grad equal {r['grad_equal']}", r["unexplained"] == 0 and r["grad_equal"])
            for fmt, per_q in report.items() for name, r in per_q.items()]
    print(f"\nCUDA vs CPU quantizers, {dtype}:\n" + "\n".join(line for line, _ in rows))
    bad = [line for line, ok in rows if not ok]
    assert not bad, "\n".join(bad)


def test_losses_on_cuda_match_cpu_float64():
    """generalized_jsd and its fused form on CUDA (fp32 and bf16 inputs, several chunks) against
    the same functions in float64 on CPU — values and gradients."""
    from nemo_opd.loss import fused_generalized_jsd, generalized_jsd

    gen = torch.Generator().manual_seed(0)
    tokens, vocab, hidden = 300, 5003, 64
    student = torch.randn(tokens, vocab, generator=gen) * 3
    teacher = student + torch.randn(tokens, vocab, generator=gen)
    mask = torch.rand(tokens, generator=gen) > 0.2
    for beta in (0.0, 0.3, 1.0):
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            # the float64 reference sees the same (rounded) inputs as the CUDA call
            ref_in = student.to(dtype).double().detach().requires_grad_()
            reference = generalized_jsd(ref_in, teacher.to(dtype).double(), beta=beta,
                                        temperature=1.5, mask=mask)
            reference.backward()
            x = student.to("cuda", dtype).detach().clone().requires_grad_()
            value = generalized_jsd(x, teacher.to("cuda", dtype), beta=beta, temperature=1.5,
                                    mask=mask.cuda(), chunk_tokens=64)
            value.backward()  # the gradient comes back in the input dtype (bf16: 2^-9 rounding)
            assert abs(value.item() - reference.item()) <= tol * abs(reference.item()), \
                (beta, dtype, value.item(), reference.item())
            grad_error = ((x.grad.double().cpu() - ref_in.grad).norm() / ref_in.grad.norm())
            assert grad_error < tol, (beta, dtype, grad_error)

    h_s = torch.randn(tokens, hidden, generator=gen)
    h_t = h_s + 0.1 * torch.randn(tokens, hidden, generator=gen)
    w_s = torch.randn(vocab, hidden, generator=gen) / hidden**0.5
    w_t = w_s + 0.1 * torch.randn(vocab, hidden, generator=gen) / hidden**0.5
    reference = generalized_jsd(h_s.double() @ w_s.double().t(), h_t.double() @ w_t.double().t(),
                                beta=0.5)
    fused = fused_generalized_jsd(h_s.cuda(), w_s.cuda(), h_t.cuda(), w_t.cuda(), beta=0.5,
                                  chunk_tokens=64)
    # fp32 logits from a matmul, and a small divergence (~2.5e-3) of close distributions:
    # cancellation makes 1e-4 relative the honest fp32 bound here
    assert abs(fused.item() - reference.item()) <= 1e-4 * reference.item()
