"""Pure-torch fake quantization (quantize → dequantize) for MXFP4, MXFP8 and NVFP4.

These functions reproduce, on any device torch runs on, the arithmetic of the GPU kernels that
ModelOpt 0.47 uses for *dynamic block* fake quantization during QAT:

* MX formats (E8M0 block scale): ``fused_amax_convert`` in
  ``modelopt/torch/kernels/quantization/gemm/tensor_quant_mx.cu`` (``compute_scale_e8m0_NV`` +
  ``round_to_even``).
* NVFP4 (E4M3 block scale × FP32 global scale): the Triton kernel ``fp4_fake_quant_block`` in
  ``modelopt/torch/kernels/quantization/gemm/fp4_kernel_hopper.py`` with the helpers in
  ``kernels/quantization/common/nvfp4_quant.py``; ModelOpt picks it on GPUs with compute
  capability >= 8.9 (Ada, Hopper, Blackwell).

Every step is done in float32 in the same order as the kernels, because the rounding decisions
(which E2M1 / E4M3 value an element lands on) depend on float32 intermediate results. Outputs are
cast back to the input dtype once, at the end, exactly like the kernels' final store.

Shapes: blocks run along the last dimension, ``block_size`` consecutive elements per block,
independently per row of ``x.reshape(-1, x.shape[-1])``. A last dimension that is not a multiple
of ``block_size`` is zero-padded for the block statistics and the padding is dropped from the
output — what both CUDA kernels do.

NaN inputs propagate to NaN outputs and are ignored by the block amax (the kernels' ``fmaxf``
reduction ignores NaN too; their element output for NaN is not well defined). See
``docs/quantization.md`` ("CPU numerics for MX and NVFP4") for the formulas and how they relate to
the OCP MX spec and to ModelOpt's export path.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "E2M1_MAX",
    "E4M3_MAX",
    "MX_ELEMENT_MAX",
    "SUPPORTED_BLOCK_SIZES",
    "SUPPORTED_DTYPES",
    "e8m0_scale_exponent",
    "mx_fake_quant",
    "nvfp4_fake_quant",
    "round_to_e2m1",
    "round_to_e4m3",
]

E2M1_MAX = 6.0
"""Largest FP4 E2M1 magnitude."""

E4M3_MAX = 448.0
"""Largest finite FP8 E4M3 (``float8_e4m3fn``) magnitude."""

MX_ELEMENT_MAX: dict[str, float] = {"e2m1": E2M1_MAX, "e4m3": E4M3_MAX}
"""Element format → largest magnitude; MXFP4 uses ``"e2m1"``, MXFP8 ``"e4m3"``."""

SUPPORTED_BLOCK_SIZES = (8, 16, 32)
"""Block sizes ModelOpt's CUDA MX kernel dispatches; anything else would fail on the GPU."""

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Input dtypes the GPU kernels accept."""

# The NVFP4 Triton kernel replaces a decoded block scale below this by 1.0. Such a block's
# elements are below 6e-5 (→ 0 at scale 1) unless its E4M3 code underflowed to 0 under a global
# amax above ~1e5.
_NVFP4_MIN_BLOCK_SCALE = 1e-5
# The NVFP4 Triton kernel substitutes this global scale when the global amax is 0.
_NVFP4_ZERO_GLOBAL_SCALE = 1e-12


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest FP4 E2M1 value, ties to even, saturating at ±6.

    Representable magnitudes are ``0, 0.5, 1, 1.5, 2, 3, 4, 6``. A magnitude exactly halfway
    between two of them goes to the one with an even code (0→0, 2→1.0, 4→2.0, 6→4.0), i.e.
    0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4; anything above 5 (including inf) → 6.
    The sign is kept (``-0.0`` stays ``-0.0``); NaN stays NaN.

    Args:
        x: float32 tensor, any shape.

    Returns:
        float32 tensor of the same shape holding E2M1 values.
    """
    a = x.abs()
    # E2M1 has one mantissa bit: its grid spacing is 0.5 below 2, 1 in [2, 4) and 2 from 4 on.
    # Scaled by the inverse spacing (a power of two, so exactly), rounding half to even
    # (torch.round) lands ties on the even code; clamping saturates at 6 (inf included). NaN
    # passes through every step with its sign.
    scale = torch.where(a < 2.0, 2.0, torch.where(a < 4.0, 1.0, 0.5))
    return torch.copysign((a * scale).round_().div_(scale).clamp_(max=6.0), x)


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest FP8 E4M3 value, ties to even, saturating at ±448.

    Matches CUDA's ``__nv_fp8_e4m3(float)`` / PTX ``cvt.rn.satfinite``: round to nearest even
    (subnormals down to 2^-9 included), finite values beyond ±448 and ±inf clamp to ±448,
    NaN stays NaN.

    Args:
        x: float32 tensor, any shape.

    Returns:
        float32 tensor of the same shape holding E4M3 values.
    """
    # Clamp first: torch versions differ on out-of-range casts (older ones give NaN, not 448).
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def e8m0_scale_exponent(amax: torch.Tensor, element_max: float) -> torch.Tensor:
    """Block scale exponent of ModelOpt's CUDA MX kernel: ``clamp(ceil(log2(amax / emax)), ±127)``.

    ``amax / element_max`` is one float32 division (round to nearest even), then the exponent is
    the smallest ``e`` with ``2^e >= ratio``, clamped to the E8M0 range [-127, 127]. A block whose
    amax is 0 gets exponent 0 (scale 1.0), as in the kernel.

    Args:
        amax: float32 tensor of non-negative, finite block maxima, any shape.
        element_max: largest magnitude of the element format (6 for E2M1, 448 for E4M3).

    Returns:
        int32 tensor of the same shape.
    """
    ratio = amax / element_max
    mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa * 2**exponent, mantissa in [0.5, 1)
    # An exact power of two (mantissa 0.5) is its own ceiling; anything above rounds up.
    e = exponent - (mantissa == 0.5).to(exponent.dtype)
    e = e.clamp(-127, 127)
    return torch.where(amax == 0, torch.zeros_like(e), e).to(torch.int32)


def _exp2(e: torch.Tensor) -> torch.Tensor:
    """Exact float32 ``2**e`` for int32 ``e`` in [-127, 127], built from the bit pattern.

    2^-127 is the one subnormal in range; it is written directly (mantissa bit 22).
    """
    bits = torch.where(e > -127, (e + 127) << 23, torch.full_like(e, 1 << 22))
    return bits.to(torch.int32).view(torch.float32)


def _check_args(x: torch.Tensor, block_size: int) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"fake quantization supports dtypes {[str(d) for d in SUPPORTED_DTYPES]} "
            f"(as ModelOpt's GPU kernels do); got {x.dtype}"
        )
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(
            f"block_size must be one of {SUPPORTED_BLOCK_SIZES} (the sizes ModelOpt's CUDA kernel "
            f"accepts); got {block_size}"
        )
    if x.dim() == 0:
        raise ValueError("fake quantization needs at least one dimension to form blocks")


def _to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[..., n]`` any dtype → float32 ``[..., ceil(n / block_size), block_size]``, zero-padded."""
    n = x.shape[-1]
    pad = -n % block_size
    x32 = x.to(torch.float32)
    if pad:
        x32 = torch.nn.functional.pad(x32, (0, pad))
    return x32.reshape(*x.shape[:-1], (n + pad) // block_size, block_size)


def _from_blocks(blocks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_to_blocks`: drop the padding and cast to ``like.dtype``."""
    n = like.shape[-1]
    flat = blocks.reshape(*like.shape[:-1], -1)[..., :n]
    return flat.to(like.dtype)


def _block_amax(blocks: torch.Tensor, *, clamp_inf: bool) -> torch.Tensor:
    """``max |x|`` over the last dim, keepdim; NaN ignored (as ``fmaxf`` does).

    ``clamp_inf``: the CUDA MX kernel clamps |x| to FLT_MAX before the reduction, so an inf input
    gives the largest finite scale instead of a degenerate one; the NVFP4 Triton kernel does not.
    """
    posinf = torch.finfo(torch.float32).max if clamp_inf else float("inf")
    return torch.nan_to_num(blocks.abs(), nan=0.0, posinf=posinf).amax(dim=-1, keepdim=True)


def mx_fake_quant(
    x: torch.Tensor,
    element_format: Literal["e2m1", "e4m3"],
    block_size: int = 32,
) -> torch.Tensor:
    """MX fake quantization (MXFP4 with ``"e2m1"``, MXFP8 with ``"e4m3"``), CUDA-kernel semantics.

    Per block of ``block_size`` elements along the last dim (float32 arithmetic)::

        amax = max_i |x_i|                                  (|x| clamped to FLT_MAX, NaN ignored)
        e    = clamp(ceil(log2(amax / emax)), -127, 127)    (e = 0 when amax == 0)
        y_i  = round(x_i * 2^-e) * 2^e

    with ``emax`` = 6 (E2M1) or 448 (E4M3) and ``round`` = :func:`round_to_e2m1` or
    :func:`round_to_e4m3` (nearest, ties to even, saturating). Because ``2^e >= amax / emax``,
    no element is clipped except through rounding at the top of the range.

    Args:
        x: ``[..., n]`` float32 / float16 / bfloat16; any ``n`` (see module docstring on padding).
        element_format: ``"e2m1"`` (MXFP4) or ``"e4m3"`` (MXFP8).
        block_size: elements per shared scale, one of :data:`SUPPORTED_BLOCK_SIZES`.

    Returns:
        Tensor of the same shape and dtype as ``x``.
    """
    _check_args(x, block_size)
    if element_format not in MX_ELEMENT_MAX:
        raise ValueError(
            f"element_format must be one of {sorted(MX_ELEMENT_MAX)}; got {element_format!r}"
        )
    blocks = _to_blocks(x, block_size)
    e = e8m0_scale_exponent(_block_amax(blocks, clamp_inf=True), MX_ELEMENT_MAX[element_format])
    rounding = round_to_e2m1 if element_format == "e2m1" else round_to_e4m3
    # Both scalings are by powers of two, so they are exact in float32 (bar subnormal results).
    y = rounding(blocks * _exp2(-e)) * _exp2(e)
    return _from_blocks(y, x)


def nvfp4_fake_quant(
    x: torch.Tensor,
    global_amax: torch.Tensor | float,
    block_size: int = 16,
) -> torch.Tensor:
    """NVFP4 fake quantization: E2M1 elements, E4M3 block scales, one FP32 global scale.

    Semantics of ModelOpt's Triton kernel ``fp4_fake_quant_block`` (float32 arithmetic, each
    line one rounding)::

        g    = global_amax * fl(1 / (6 * 448))     (g := 1e-12 if g == 0; as CUDA torch divides)
        r    = amax_block / (6 * g)                (per block; NaN ignored)
        s    = e4m3(min(r, 448)) * g               (the decoded two-level block scale)
        s    = 1.0 if s < 1e-5                     (zero / underflowed / tiny block scales)
        y_i  = e2m1(|x_i| / s) * s * sign(x_i)

    ``e2m1`` saturates at 6, so when ``e4m3`` rounds a block scale down, the block's largest
    elements saturate to ``6 * s``. ``s = amax_block / 6`` up to the E4M3 rounding of ``r``, so the
    exported per-block scale (``e4m3(r)``) and ``g`` are what ``NVFP4QTensor`` stores.

    Args:
        x: ``[..., n]`` float32 / float16 / bfloat16; any ``n`` (see module docstring on padding).
        global_amax: per-tensor amax (a scalar or a one-element tensor; ModelOpt's calibrated
            ``_amax``, or ``max |x|`` for dynamic use).
        block_size: elements per block scale, one of :data:`SUPPORTED_BLOCK_SIZES` (16 for NVFP4).

    Returns:
        Tensor of the same shape and dtype as ``x``.
    """
    _check_args(x, block_size)
    amax_t = torch.as_tensor(global_amax, device=x.device).to(torch.float32)
    if amax_t.numel() != 1:
        raise ValueError(f"global_amax must have one element; got shape {tuple(amax_t.shape)}")
    # PyTorch's CUDA division by a scalar multiplies by the scalar's float32 reciprocal, and the
    # kernel's caller computes g that way on the GPU; an IEEE division differs by one ulp for
    # some amax values (seen on an H100), which shifts every dequantized value of the tensor.
    g = amax_t.reshape(()) * (amax_t.new_ones(()) / (E2M1_MAX * E4M3_MAX))
    g = torch.where(g > 0, g, g.new_tensor(_NVFP4_ZERO_GLOBAL_SCALE))
    blocks = _to_blocks(x, block_size)
    r = _block_amax(blocks, clamp_inf=False) / (E2M1_MAX * g)
    s = round_to_e4m3(torch.clamp(r, max=E4M3_MAX)) * g
    s = torch.where(s >= s.new_tensor(_NVFP4_MIN_BLOCK_SCALE), s, s.new_tensor(1.0))
    y = round_to_e2m1(blocks / s) * s
    return _from_blocks(y, x)
