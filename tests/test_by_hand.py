"""The by-hand int8 absmax and nf4 quantizers (lmref.compression.by_hand) against bitsandbytes on
the same weights, and the Q4_1 grid helpers against a Q4_1 round trip written here."""

from __future__ import annotations

import pytest
import torch

from lmref.compression import by_hand as H
from lmref.models.quantized import quiet_cpu_kernel_notice

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def bnbF():
    quiet_cpu_kernel_notice()  # before bitsandbytes' first import: no hub-kernel notice
    from bitsandbytes import functional

    return functional


@pytest.fixture
def weight():
    torch.manual_seed(0)
    w = torch.randn(96, 320) * 0.02
    w[3, 17] = 0.4  # an outlier: its row's and its block's scale follow it
    return w


def test_nf4_levels_are_bitsandbytes_levels(bnbF):
    levels = H.nf4_levels()
    assert levels.shape == (16,) and levels[0] == -1 and levels[-1] == 1
    assert (levels == 0).sum() == 1 and bool((levels.diff() > 0).all())
    assert torch.allclose(levels, bnbF.get_4bit_type("nf4", device="cpu"), atol=1e-6)


def test_int8_absmax_equals_bitsandbytes_vectorwise(bnbF, weight):
    codes, absmax = H.int8_absmax(weight)
    cb, scb, outliers = bnbF.int8_vectorwise_quant(weight.clone())
    assert outliers is None
    assert codes.dtype == torch.int8 and torch.equal(codes, cb) and torch.equal(absmax, scb)
    assert codes.abs().max() == 127 and codes[3, 17] == 127
    error = (H.int8_dequantize(codes, absmax) - weight).abs()
    assert bool((error <= absmax[:, None] / 254 * (1 + 1e-5)).all())  # half a step at most


@pytest.mark.parametrize("blocksize", [64, 128])
def test_nf4_equals_bitsandbytes_codes_scales_and_values(bnbF, weight, blocksize):
    codes, absmax = H.nf4_quantize(weight, blocksize=blocksize)
    packed, state = bnbF.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4")
    assert codes.shape == weight.shape and int(codes.max()) <= 15
    assert torch.equal(H.unpack_nibbles(packed), codes.reshape(-1))
    assert torch.equal(absmax, state.absmax)
    ours = H.nf4_dequantize(codes, absmax, weight.shape)
    if blocksize == 64:  # bitsandbytes 0.50 on CPU dequantizes other block sizes differently
        theirs = bnbF.dequantize_4bit(packed, state)
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6 * float(absmax.max()))
    # every block's largest |w| is exact (it maps to level +-1), the error is a few percent
    assert ours.reshape(-1, blocksize).abs().amax(1).allclose(absmax)
    assert 0.02 < H.relative_rms(ours, weight) < 0.2


def test_nf4_refuses_a_partial_block():
    with pytest.raises(ValueError, match="blocks of 64"):
        H.nf4_quantize(torch.randn(10, 10))


def _q4_1_round_trip(w: torch.Tensor) -> torch.Tensor:
    """GGUF Q4_1 by its definition: per block of 32, d = (max - min) / 15, q = round((w - min)/d)."""
    blocks = w.reshape(-1, 32)
    low = blocks.amin(1, keepdim=True)
    d = (blocks.amax(1, keepdim=True) - low) / 15
    return (torch.round((blocks - low) / d) * d + low).reshape(w.shape)


def test_q4_1_grid_distance_and_off_grid(weight):
    on = _q4_1_round_trip(weight)
    assert H.q4_1_grid_distance(on).max() < 1e-4
    assert H.q4_1_grid_distance(weight).median() > 0.1  # continuous weights are off any grid
    off = H.off_grid(on, seed=1)
    assert not torch.equal(off, on) and H.q4_1_grid_distance(off).median() > 0.1
    # rounding the stand-in to the original grid gives the grid weights back
    blocks, stand_in = on.reshape(-1, 32).double(), off.reshape(-1, 32).double()
    low = blocks.amin(1, keepdim=True)
    step = (blocks.amax(1, keepdim=True) - low) / 15
    back = torch.round((stand_in - low) / step) * step + low
    assert torch.allclose(back.float(), blocks.float(), atol=1e-6)
    assert torch.equal(H.off_grid(on, seed=1), off)  # seeded


def test_unpack_nibbles_is_high_then_low():
    assert H.unpack_nibbles(torch.tensor([[0x3A], [0xF0]], dtype=torch.uint8)).tolist() == [
        3,
        10,
        15,
        0,
    ]
