"""CPU MX / NVFP4 fake quantization against an independent float64 reference, and through ModelOpt.

The reference below is written from the formulas (docs/quantization.md, "CPU numerics for MX and
NVFP4") and does not import nemo_opd: it rounds by searching the list of representable values
(decoded from the bit layouts) instead of thresholds or torch's float8 cast, finds the E8M0
exponent by comparing powers of two in float64, and emulates each float32 operation of the NVFP4
kernel as an exact float64 operation followed by one rounding to float32. Results are compared
with ``torch.equal`` (bit-for-bit apart from the sign of zero).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer, is_registered_quant_backend

from nemo_opd.quant import (
    BACKEND_NAME,
    cpu_backend,
    enable_cpu_quant_backend,
    mx_fake_quant,
    nvfp4_fake_quant,
)
from nemo_opd.quant.mx_numerics import round_to_e2m1, round_to_e4m3

# ----------------------------------------------------------------------------------------------
# Independent float64 reference
# ----------------------------------------------------------------------------------------------

F32_MAX = float(torch.finfo(torch.float32).max)
E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _e4m3_grid() -> torch.Tensor:
    """Non-negative finite E4M3FN values in code order (4 exponent bits, bias 7, 3 mantissa bits;
    code 0x7F is NaN, there is no infinity)."""
    values = []
    for code in range(0x7F):
        exponent, mantissa = code >> 3, code & 0x7
        if exponent == 0:
            values.append(mantissa / 8 * 2.0**-6)
        else:
            values.append((1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return torch.tensor(values, dtype=torch.float64)


E4M3_GRID = _e4m3_grid()
GRIDS = {"e2m1": E2M1_GRID, "e4m3": E4M3_GRID}


def ref_round(v: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Nearest value of ``grid`` (magnitudes in code order), ties to the even code, saturating."""
    v = v.double()
    a = v.abs().clamp(max=grid[-1].item())
    hi_idx = torch.searchsorted(grid, a).clamp(max=len(grid) - 1)  # first grid value >= a
    lo_idx = (hi_idx - 1).clamp(min=0)
    lo, hi = grid[lo_idx], grid[hi_idx]
    pick_hi = (hi - a < a - lo) | ((hi - a == a - lo) & (hi_idx % 2 == 0))
    q = torch.copysign(torch.where(pick_hi, hi, lo), v)
    return torch.where(v.isnan(), v, q)


def _f32(v: torch.Tensor | float) -> torch.Tensor:
    """Round float64 to the nearest float32 (kept as float64)."""
    return torch.as_tensor(v, dtype=torch.float64).to(torch.float32).to(torch.float64)


def _blocks64(x: torch.Tensor, block: int) -> torch.Tensor:
    n = x.shape[-1]
    return F.pad(x.double(), (0, -n % block)).reshape(-1, block)


def _unblock(blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    return blocks.reshape(*x.shape[:-1], -1)[..., :n].to(x.dtype)


def _ref_block_amax(row: torch.Tensor, clamp_inf: bool) -> float:
    mags = [abs(v) for v in row.tolist() if not math.isnan(v)]
    if clamp_inf:  # the CUDA MX kernel clamps |x| to FLT_MAX before its max reduction
        mags = [min(m, F32_MAX) for m in mags]
    return max(mags, default=0.0)


def ref_mx(x: torch.Tensor, fmt: str, block: int = 32) -> torch.Tensor:
    """MX: 2^e is the smallest power of two with amax / 2^e <= emax, e clamped to [-127, 127]."""
    grid = GRIDS[fmt]
    emax = grid[-1].item()
    blocks = _blocks64(x, block)
    out = torch.empty_like(blocks)
    for i, row in enumerate(blocks):
        amax = _ref_block_amax(row, clamp_inf=True)
        e = 0
        if amax > 0:
            e = math.floor(math.log2(amax / emax))
            while amax > emax * 2.0**e:
                e += 1
            while amax <= emax * 2.0 ** (e - 1):
                e -= 1
            e = max(-127, min(127, e))
        out[i] = ref_round(row / 2.0**e, grid) * 2.0**e
    return _unblock(out, x)


def _ref_nvfp4_block_scales(x: torch.Tensor, global_amax: float,
                            block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 blocks of ``x`` and each block's decoded two-level scale, as the Triton kernel
    and its caller compute them in float32 (g = amax * fl(1/2688): PyTorch's CUDA division by a
    scalar multiplies by the reciprocal)."""
    g = _f32(_f32(global_amax) * _f32(1.0 / 2688.0))
    if g == 0:
        g = _f32(1e-12)
    blocks = _blocks64(x, block)
    scales = torch.empty(blocks.shape[0], 1, dtype=torch.float64)
    for i, row in enumerate(blocks):
        r = _f32(_ref_block_amax(row, clamp_inf=False) / _f32(6.0 * g))
        s = _f32(ref_round(torch.clamp(r, max=448.0), E4M3_GRID) * g)
        scales[i] = 1.0 if s < _f32(1e-5) else s
    return blocks, scales


def ref_nvfp4(x: torch.Tensor, global_amax: float, block: int = 16) -> torch.Tensor:
    """NVFP4, ModelOpt's Triton kernel: every float32 operation emulated one by one."""
    blocks, scales = _ref_nvfp4_block_scales(x, global_amax, block)
    q = ref_round(_f32(blocks.abs() / scales), E2M1_GRID)
    out = torch.where(blocks.isnan(), blocks, torch.copysign(_f32(q * scales), blocks))
    return _unblock(out, x)


def nvfp4_near_ties(x: torch.Tensor, global_amax: float, block: int = 16) -> torch.Tensor:
    """Elements whose ``|x| / s`` lies within 2 float32 ulps of an E2M1 rounding boundary: there
    Triton's approximate float32 division (``div.full.f32``) may round the other way than an
    IEEE division. Same shape as ``x``."""
    blocks, scales = _ref_nvfp4_block_scales(x, global_amax, block)
    ratio = blocks.abs() / scales
    boundaries = (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2
    near = ((ratio.unsqueeze(-1) - boundaries).abs() <= 2 * 2.0**-23 * boundaries).any(-1)
    return _unblock(near.to(torch.float64), x).bool()


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values with a per-row magnitude spread over six decades."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * 10.0 ** torch.empty(*shape[:-1], 1, dtype=torch.float64).uniform_(-3, 3, generator=gen)
    return x.to(dtype)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(4, 64), (3, 5, 96), (7, 40)]  # (7, 40): last dim not a multiple of any block size


# ----------------------------------------------------------------------------------------------
# Reference sanity and element rounding
# ----------------------------------------------------------------------------------------------


def test_reference_grids():
    assert len(E4M3_GRID) == 127 and E4M3_GRID[-1] == 448 and E4M3_GRID[1] == 2.0**-9
    assert torch.all(E4M3_GRID[1:] > E4M3_GRID[:-1])


def test_e2m1_rounding_known_values():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.2, 0.3, 2.6, 5.01, 7.0, 1e30])
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.0, 0.5, 3.0, 6.0, 6.0, 6.0])
    for sign in (1.0, -1.0):
        assert torch.equal(round_to_e2m1(sign * x), sign * expected)
        assert torch.equal(ref_round(sign * x, E2M1_GRID).float(), sign * expected)
    assert torch.equal(round_to_e2m1(torch.tensor([float("inf")])), torch.tensor([6.0]))
    assert round_to_e2m1(torch.tensor([float("nan")])).isnan().all()


def test_e4m3_rounding_matches_reference_on_all_midpoints():
    mids = (E4M3_GRID[1:] + E4M3_GRID[:-1]) / 2  # exact ties, all float32-representable
    nudged = torch.cat([mids * (1 + 2.0**-20), mids * (1 - 2.0**-20)])
    beyond = torch.tensor([448.0, 449.0, 463.9, 464.0, 480.0, 1e6, 1e38])
    x = torch.cat([E4M3_GRID, mids, nudged, beyond]).float()
    x = torch.cat([x, -x])
    assert torch.equal(round_to_e4m3(x), ref_round(x, E4M3_GRID).float())
    # Hand-checked ties: 1 + 1/16 → 1 (even), 1.1875 → 1.25 (even), 2^-10 → 0, 3·2^-10 → 2^-8.
    ties = torch.tensor([1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10])
    assert torch.equal(round_to_e4m3(ties), torch.tensor([1.0, 1.25, 0.0, 2.0**-8]))


# ----------------------------------------------------------------------------------------------
# MX (MXFP4, MXFP8)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["e2m1", "e4m3"])
def test_mx_matches_reference(fmt, dtype, shape):
    x = _random(shape, dtype, seed=sum(shape))
    assert torch.equal(mx_fake_quant(x, fmt), ref_mx(x, fmt))


@pytest.mark.parametrize("block", [8, 16, 32])
def test_mx_block_sizes(block):
    x = _random((3, 48), torch.float32, seed=block)
    for fmt in ("e2m1", "e4m3"):
        assert torch.equal(mx_fake_quant(x, fmt, block), ref_mx(x, fmt, block))


def test_mxfp4_ties_to_even_known_answer():
    # amax 6 → scale 2^0; the rest are the seven E2M1 ties, both signs.
    row = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -1.75, -3.5, -5.0, 0.1, 5.5]
    expected = [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, -2.0, -4.0, -4.0, 0.0, 6.0]
    x = torch.tensor([row + [0.0] * (32 - len(row))])
    want = torch.tensor([expected + [0.0] * (32 - len(row))])
    for k in (0, 5, -9):  # scale exponent k: the same codes, times 2^k
        assert torch.equal(mx_fake_quant(x * 2.0**k, "e2m1"), want * 2.0**k)
        assert torch.equal(ref_mx(x * 2.0**k, "e2m1"), want * 2.0**k)


def test_mxfp8_ties_to_even_known_answer():
    row = [448.0, 1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, 232.0, -1.0625]
    expected = [448.0, 1.0, 1.25, 0.0, 2.0**-8, 224.0, -1.0]
    x = torch.tensor([row + [0.0] * (32 - len(row))])
    want = torch.tensor([expected + [0.0] * (32 - len(row))])
    assert torch.equal(mx_fake_quant(x, "e4m3"), want)
    assert torch.equal(ref_mx(x, "e4m3"), want)


def test_mx_scale_is_ceil_not_ocp_floor():
    # amax 7: ModelOpt's kernel picks 2^ceil(log2(7/6)) = 2, so 7 → 3.5·2 → ties to 4·2 = 8.
    # The OCP rule 2^(floor(log2 7) − 2) = 1 would clip 7 to 6.
    x = torch.tensor([[7.0, 1.5, 1.0] + [0.0] * 29])
    assert mx_fake_quant(x, "e2m1")[0, :3].tolist() == [8.0, 2.0, 1.0]
    # Right at a power-of-two boundary: amax 12 → scale 2 exactly (3 stays 3); one float32 step
    # above → scale 4 (12.000001 → 12, and 3 → 0.75 → ties to 1 → 4).
    assert mx_fake_quant(torch.tensor([[12.0] + [3.0] * 31]), "e2m1")[0, :2].tolist() == [12, 3]
    above = torch.nextafter(torch.tensor(12.0), torch.tensor(13.0)).item()
    y = mx_fake_quant(torch.tensor([[above] + [3.0] * 31]), "e2m1")
    assert y[0, :2].tolist() == [12.0, 4.0] and torch.equal(
        y, ref_mx(torch.tensor([[above] + [3.0] * 31]), "e2m1")
    )


def test_mx_outlier_zero_and_negative_blocks():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 96, generator=gen)
    x[0, 5] = 1e4  # outlier: the rest of block 0 of row 0 flushes to zero
    x[1, 32:64] = 0.0  # an all-zero block
    x[2] = -x[2].abs()  # all negative
    for fmt in ("e2m1", "e4m3"):
        y = mx_fake_quant(x, fmt)
        assert torch.equal(y, ref_mx(x, fmt))
        assert torch.equal(mx_fake_quant(-x, fmt), -y)
        assert torch.equal(y[1, 32:64], torch.zeros(32)) and not y.isnan().any()
        # Other blocks are quantized independently of the outlier.
        assert torch.equal(y[0, 32:], mx_fake_quant(x[0:1, 32:], fmt)[0])
    # 1e4 → scale 2^ceil(log2(1e4 / 6)) = 2^11; 1e4 / 2^11 = 4.88 → 4 → 8192.
    y4 = mx_fake_quant(x, "e2m1")
    assert y4[0, 5] == 8192 and torch.count_nonzero(y4[0, :32]) == 1


def test_mx_extreme_values():
    x = torch.zeros(3, 32)
    x[0, 0], x[0, 1] = float("inf"), 1.0  # inf: largest finite scale, saturates to 6·2^126
    # Tiny block: ceil(log2(2^-128 / 6)) = -130 clamps to -127, so 2^-128 → 0.5 · 2^-127 and
    # 3 · 2^-130 → 0.375 → 0.5 (with -126 both would round to 0).
    x[1, 0], x[1, 1] = 2.0**-128, 3 * 2.0**-130
    x[2, 0], x[2, 1] = float("nan"), 3.0  # NaN: ignored by the amax, propagates itself
    y = mx_fake_quant(x, "e2m1")
    assert y[0, 0] == 6 * 2.0**126 and y[0, 1] == 0
    assert y[1, :2].tolist() == [2.0**-128, 2.0**-128]
    assert y[2, 0].isnan() and y[2, 1] == 3.0
    for fmt in ("e2m1", "e4m3"):
        assert torch.equal(mx_fake_quant(x[:2], fmt), ref_mx(x[:2], fmt))


def test_mx_pads_partial_last_block():
    x = _random((5, 40), torch.float32, seed=3)
    padded = F.pad(x, (0, 24))
    for fmt in ("e2m1", "e4m3"):
        assert torch.equal(mx_fake_quant(x, fmt), mx_fake_quant(padded, fmt)[:, :40])


def test_bad_arguments():
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="block_size"):
        mx_fake_quant(x, "e2m1", block_size=64)
    with pytest.raises(ValueError, match="element_format"):
        mx_fake_quant(x, "e3m2")
    with pytest.raises(TypeError, match="float64"):
        mx_fake_quant(x.double(), "e2m1")
    with pytest.raises(ValueError, match="one element"):
        nvfp4_fake_quant(x, torch.ones(2))


# ----------------------------------------------------------------------------------------------
# NVFP4
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("amax_factor", [1.0, 0.25, 1e4])
def test_nvfp4_matches_reference(dtype, shape, amax_factor):
    # amax_factor 0.25: block scales saturate at 448 and elements at 6;
    # 1e4: small blocks fall under the 1e-5 block-scale floor and come out as zeros.
    x = _random(shape, dtype, seed=7 + sum(shape))
    global_amax = x.float().abs().max().item() * amax_factor
    assert torch.equal(nvfp4_fake_quant(x, global_amax), ref_nvfp4(x, global_amax))


def test_nvfp4_known_answers():
    # global amax 2688 → global scale exactly 1, so a block's scale is e4m3(amax_block / 6).
    x = torch.zeros(5, 16)
    x[0, :8] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, -5.0])  # scale 1: ties
    x[1, :2] = torch.tensor([6.375, 3.0])  # 6.375/6 = 1.0625 ties down to 1 → 6.375 saturates to 6
    x[2, :2] = torch.tensor([6.0 * 2.0**-12, 3.0 * 2.0**-12])  # scale rounds to 0 → block is zero
    x[4, :2] = torch.tensor([float("inf"), 1.0])  # block scale saturates at 448: inf → 6 · 448
    y = nvfp4_fake_quant(x, 2688.0)
    assert y[0, :8].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, -4.0]
    assert y[1, :2].tolist() == [6.0, 3.0]
    assert torch.equal(y[2:4], torch.zeros(2, 16))
    assert y[4, :2].tolist() == [2688.0, 0.0]
    assert torch.equal(y, ref_nvfp4(x, 2688.0))
    assert torch.equal(nvfp4_fake_quant(-x, 2688.0), -y)


def test_nvfp4_zero_global_amax_and_outliers():
    x = _random((4, 48), torch.float32, seed=11)
    x[0, 3] = 1e5
    x[1, 16:32] = 0.0
    for amax in (0.0, x.abs().max().item()):
        y = nvfp4_fake_quant(x, amax)
        assert torch.equal(y, ref_nvfp4(x, amax)) and not y.isnan().any()
    assert torch.equal(nvfp4_fake_quant(x, x.abs().max())[1, 16:32], torch.zeros(16))


def test_nvfp4_pads_partial_last_block():
    x = _random((5, 40), torch.bfloat16, seed=5)
    amax = x.float().abs().max()
    assert torch.equal(nvfp4_fake_quant(x, amax), nvfp4_fake_quant(F.pad(x, (0, 8)), amax)[:, :40])


# ----------------------------------------------------------------------------------------------
# Through ModelOpt: config rewrite, mtq.quantize, forward/backward
# ----------------------------------------------------------------------------------------------

PRESETS = {
    "mxfp4": mtq.MXFP4_DEFAULT_CFG,
    "mxfp8": mtq.MXFP8_DEFAULT_CFG,
    "nvfp4": mtq.NVFP4_DEFAULT_CFG,
    "w4a8_mxfp4_fp8": mtq.W4A8_MXFP4_FP8_CFG,
}


def _ref_for(quantizer: TensorQuantizer, inputs: torch.Tensor) -> torch.Tensor:
    block = quantizer.block_sizes[-1]
    if quantizer.block_sizes["scale_bits"] == (4, 3):  # NVFP4
        return ref_nvfp4(inputs, quantizer.amax.item(), block)
    return ref_mx(inputs, "e2m1" if quantizer.num_bits == (2, 1) else "e4m3", block)


def _tiny_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 40)
    ).to(dtype)


def _quantize(preset: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = _tiny_model(dtype)
    calib = [torch.randn(8, 64, dtype=dtype) for _ in range(2)]

    def forward_loop(m):
        for batch in calib:
            m(batch)

    return mtq.quantize(model, enable_cpu_quant_backend(PRESETS[preset]), forward_loop)


@pytest.mark.parametrize(
    "preset, dtype",
    [("mxfp4", torch.float32), ("mxfp4", torch.bfloat16), ("mxfp8", torch.float32),
     ("nvfp4", torch.float32), ("nvfp4", torch.bfloat16)],
)
def test_modelopt_flow_matches_reference(preset, dtype):
    model = _quantize(preset, dtype)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled:
            assert module.backend == BACKEND_NAME, name
            module.register_forward_hook(
                lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], out))
            )
    x = torch.randn(6, 64, dtype=dtype)
    model(x).float().sum().backward()

    assert len(seen) == 4  # input and weight quantizer of both linears
    for name, (inputs, outputs) in seen.items():
        quantizer = model.get_submodule(name)
        assert torch.equal(outputs, _ref_for(quantizer, inputs.detach())), name
    assert torch.equal(seen["0.weight_quantizer"][0], model[0].weight)

    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    if dtype == torch.float32:
        # Straight-through: d sum(y) / dW2 is the (quantized) input of layer 2, summed over batch.
        xq2 = seen["2.input_quantizer"][1]
        torch.testing.assert_close(model[2].weight.grad, xq2.sum(0).expand(40, 48))


def test_w4a8_mxfp4_fp8_runs_with_modelopt_fp8_inputs():
    model = _quantize("w4a8_mxfp4_fp8")
    assert model[0].weight_quantizer.backend == BACKEND_NAME
    assert model[0].input_quantizer.backend is None  # per-tensor FP8: ModelOpt's own CPU path
    model(torch.randn(3, 64)).sum().backward()
    w = model[0].weight
    assert torch.equal(model[0].weight_quantizer(w), ref_mx(w.detach(), "e2m1"))


@pytest.mark.parametrize("preset", ["mxfp4", "nvfp4"])
def test_presets_fail_on_cpu_without_backend(preset):
    model = _tiny_model(torch.float32)
    with pytest.raises((RuntimeError, AssertionError), match="CUDA"):
        mtq.quantize(model, PRESETS[preset], lambda m: m(torch.randn(2, 64)))
        model(torch.randn(2, 64))


def test_enable_cpu_quant_backend_rewrites_only_mx_and_nvfp4():
    original = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    cfg = enable_cpu_quant_backend(mtq.NVFP4_DEFAULT_CFG)
    assert mtq.NVFP4_DEFAULT_CFG == original  # input left alone
    assert cfg["algorithm"] == original["algorithm"]
    routed = [e["quantizer_name"] for e in cfg["quant_cfg"]
              if isinstance(e.get("cfg"), dict) and e["cfg"].get("backend") == BACKEND_NAME]
    assert routed == ["*weight_quantizer", "*input_quantizer"]

    w4a8 = enable_cpu_quant_backend(mtq.W4A8_MXFP4_FP8_CFG)["quant_cfg"]
    backends = {e["quantizer_name"]: e["cfg"].get("backend") for e in w4a8 if e.get("cfg")}
    assert backends == {"*weight_quantizer": BACKEND_NAME, "*input_quantizer": None}

    for untouched in (mtq.INT8_DEFAULT_CFG, mtq.MXFP6_DEFAULT_CFG, mtq.MXINT8_DEFAULT_CFG):
        entries = enable_cpu_quant_backend(untouched)["quant_cfg"]
        assert not any("backend" in str(e.get("cfg")) for e in entries)

    # Legacy dict shape and sequential (list) quantizer configs.
    mx = {"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        legacy = enable_cpu_quant_backend({"quant_cfg": {"*weight_quantizer": mx}})
    assert legacy["quant_cfg"][0]["cfg"]["backend"] == BACKEND_NAME
    seq = enable_cpu_quant_backend(
        {"quant_cfg": [{"quantizer_name": "*w*", "cfg": [mx, {"num_bits": (4, 3)}]}]}
    )
    assert [c.get("backend") for c in seq["quant_cfg"][0]["cfg"]] == [BACKEND_NAME, None]


def _mx_quantizer(**extra) -> TensorQuantizer:
    return TensorQuantizer(QuantizerAttributeConfig(
        num_bits=(2, 1), block_sizes={-1: 32, "type": "dynamic", "scale_bits": (8, 0)}, **extra
    ))


def _nvfp4_quantizer(**extra) -> TensorQuantizer:
    return TensorQuantizer(QuantizerAttributeConfig(
        num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)}, **extra
    ))


def test_bad_backend_configuration_is_rejected():
    mx = {"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}
    bad_args = {"quant_cfg": [{"quantizer_name": "*", "cfg": {**mx, "backend_extra_args": {
        "rounding": "up"}}}]}
    with pytest.raises(ValueError, match=r"unknown backend_extra_args \['rounding'\]"):
        enable_cpu_quant_backend(bad_args)
    other = {"quant_cfg": [{"quantizer_name": "*", "cfg": {**mx, "backend": "other"}}]}
    with pytest.raises(ValueError, match="already selects backend 'other'"):
        enable_cpu_quant_backend(other)
    with pytest.raises(ValueError, match="quant_cfg"):
        enable_cpu_quant_backend({"algorithm": "max"})

    quantizer = _mx_quantizer(backend=BACKEND_NAME, backend_extra_args={"rounding": "up"})
    with pytest.raises(ValueError, match=r"unknown backend_extra_args \['rounding'\]"):
        quantizer(torch.randn(2, 32))
    int8 = TensorQuantizer(QuantizerAttributeConfig(num_bits=8, backend=BACKEND_NAME))
    with pytest.raises(ValueError, match="MXFP4, MXFP8 and NVFP4 only"):
        int8(torch.randn(2, 32))


def test_straight_through_gradients():
    x = torch.linspace(-3, 3, 64).reshape(2, 32).requires_grad_()
    _mx_quantizer(backend=BACKEND_NAME)(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # MX: always pass-through

    for pass_through in (True, False):
        x.grad = None
        quantizer = _nvfp4_quantizer(backend=BACKEND_NAME, pass_through_bwd=pass_through)
        quantizer.amax = 1.0
        y = quantizer(x)
        assert torch.equal(y, ref_nvfp4(x.detach(), 1.0))
        y.sum().backward()
        # pass_through_bwd=False: ModelOpt zeroes the gradient where |x| > amax.
        expected = torch.ones_like(x) if pass_through else (x.abs() <= 1).float()
        assert torch.equal(x.grad, expected)


def test_cuda_tensors_go_to_modelopt_kernels(monkeypatch):
    """What CUDA inputs do, checked on CPU: ModelOpt's own path runs (here it fails for want of
    CUDA, which proves it was reached) and the quantizer keeps its backend afterwards."""
    assert is_registered_quant_backend(BACKEND_NAME)
    monkeypatch.setattr(cpu_backend, "_on_modelopt_kernels", lambda inputs: True)
    quantizer = _mx_quantizer(backend=BACKEND_NAME)
    with pytest.raises(RuntimeError, match="CUDA"):
        quantizer(torch.randn(2, 32))
    assert quantizer.backend == BACKEND_NAME


# ----------------------------------------------------------------------------------------------
# On a GPU: bit-for-bit against ModelOpt's own kernels (skipped on CPU-only machines)
# ----------------------------------------------------------------------------------------------


def _adversarial(element_max: float, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows whose amax sits on, just below and just above element_max * 2^k, tie rows, zeros and
    random rows with magnitudes over six decades."""
    rows = []
    for k in (-20, -3, 0, 4, 17):
        edge = element_max * 2.0**k
        for amax in (edge, math.nextafter(edge, 0.0), math.nextafter(edge, math.inf)):
            rows.append([amax] + [amax * f for f in torch.linspace(-1, 1, block - 1).tolist()])
    rows.append([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * (block // 8))
    rows.append([0.0] * block)
    x = torch.tensor(rows, dtype=torch.float64)
    return torch.cat([x, _random((64, block * 4), torch.float64, seed=1).reshape(-1, block)]).to(
        dtype
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and ModelOpt's GPU kernels")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8", "nvfp4"])
def test_matches_modelopt_gpu_kernels(fmt, dtype):
    if fmt == "nvfp4" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("below sm_89 ModelOpt uses its CUDA-extension NVFP4 kernel, not reproduced")
    num_bits = (4, 3) if fmt == "mxfp8" else (2, 1)
    scale_bits = (4, 3) if fmt == "nvfp4" else (8, 0)
    block = 16 if fmt == "nvfp4" else 32
    quantizer = TensorQuantizer(QuantizerAttributeConfig(
        num_bits=num_bits, block_sizes={-1: block, "type": "dynamic", "scale_bits": scale_bits}
    )).cuda()  # no backend: ModelOpt's own kernels
    x = _adversarial(448.0 if fmt == "mxfp8" else 6.0, block, dtype)
    # fp16 overflows the largest rows to inf; on non-finite blocks the kernels disagree (the
    # Triton NVFP4 kernel returns inf/NaN, the CPU path saturates), and no trained model has them
    x = x[x.isfinite().all(-1)]
    gpu = quantizer(x.cuda()).cpu()
    if fmt == "nvfp4":
        ours = nvfp4_fake_quant(x, x.float().abs().max())
        allowed = nvfp4_near_ties(x, x.float().abs().max().item())
    else:
        ours = mx_fake_quant(x, "e4m3" if fmt == "mxfp8" else "e2m1")
        allowed = torch.zeros_like(x, dtype=torch.bool)
    mismatch = ((gpu != ours) & ~allowed).nonzero()
    assert mismatch.numel() == 0, f"{len(mismatch)} elements differ, first at {mismatch[:5]}"
