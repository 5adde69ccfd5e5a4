"""int8 arithmetic, multipliers and LUT files against references computed another way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hasched.errors import HaschedError
from hasched.sim.arithmetic import Int8
from hasched.sim.faults import create_fault
from hasched.sim.functional import faulty_matmul
from hasched.sim.mapping import GpuTiles
from hasched.sim.multipliers import (
    MULTIPLIERS,
    Multiplier,
    create_multiplier,
    error_metrics,
    load_lut,
)

MAP = GpuTiles(n_sms=2, pes_per_sm=8, block_height=8, dense_block_width=4)
ZERO = torch.zeros(MAP.n_pes, dtype=torch.float64)


def quantize_ref(w, x, absmax):
    """The textbook int8 PTQ: per-row weight scale, per-tensor activation scale."""
    s_w = w.double().abs().amax(1) / 127
    wq = torch.round(w.double() / s_w[:, None]).clamp(-127, 127).long()
    xq = torch.round(x / (absmax / 127)).clamp(-127, 127).long()
    return wq, xq


def test_int8_exact_equals_an_integer_reference():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(13, 37, generator=g), torch.rand(5, 37, 3, generator=g) * 2
    absmax = float(x.abs().max())
    wq, xq = quantize_ref(w, x, absmax)
    ref = torch.einsum("rk,bkc->brc", wq, xq)  # int64, exact
    out = faulty_matmul(w, x, MAP, ZERO, create_fault("zero"), arith=Int8(), in_absmax=absmax)
    assert out.dtype == torch.float64 and torch.equal(out[0].long(), ref)


def _lut_matmul_ref(table: np.ndarray, wq, xq):
    """sum_j T[w_j + 128, x_j + 128] by brute force."""
    t = torch.from_numpy(table.copy())
    return t[(wq + 128)[None, :, :, None], (xq + 128)[:, None, :, :]].sum(2)


@pytest.mark.parametrize("name", ["exact", "drum4", "bam8", "mitchell", "trunc4"])
def test_multiplier_gemm_equals_brute_force(name):
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(9, 21, generator=g), torch.randn(4, 21, 2, generator=g)
    absmax = float(x.abs().max())
    wq, xq = quantize_ref(w, x, absmax)
    mult = create_multiplier(name)
    ref = _lut_matmul_ref(mult.signed_table(), wq, xq)
    out = faulty_matmul(w, x, MAP, ZERO, create_fault("zero"), arith=Int8(mult),
                        in_absmax=absmax)
    assert torch.equal(out[0].long(), ref)


def test_factorised_and_gathered_lut_gemms_agree():
    # drum4 (rank 1) and bam8 (rank <= 8) take the factorised path; mitchell the gather
    assert create_multiplier("drum4").factors()[0].shape[1] == 1
    assert create_multiplier("bam8").factors()[0].shape[1] <= 8
    assert create_multiplier("mitchell").factors() is None


def test_exact_lut_file_equals_the_exact_multiplier(tmp_path):
    a = np.arange(256)
    np.save(tmp_path / "exact.npy", (a[:, None] * a[None, :]).astype(np.uint16))
    mult = load_lut(tmp_path / "exact.npy")
    assert not mult.signed and mult.is_exact
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(6, 10, generator=g), torch.randn(3, 10, 4, generator=g)
    kw = dict(in_absmax=float(x.abs().max()))
    a = faulty_matmul(w, x, MAP, ZERO, create_fault("zero"), arith=Int8(mult), **kw)
    b = faulty_matmul(w, x, MAP, ZERO, create_fault("zero"), arith=Int8(), **kw)
    assert torch.equal(a, b)


def test_hand_made_lut_gives_hand_computed_products():
    a = np.arange(256)
    lut = Multiplier("sum", (a[:, None] + a[None, :]).astype(np.int64))  # "product" = a + b
    t = lut.signed_table()
    # sign-magnitude: (-3) x 5 -> -(3 + 5) = -8; (-2) x (-7) -> 9; 0 x 4 -> 0 (sign 0)
    assert t[-3 + 128, 5 + 128] == -8 and t[-2 + 128, -7 + 128] == 9 and t[128, 4 + 128] == 0
    signed = Multiplier("s", ((a[:, None] - a[None, :]) % 7).astype(np.int64), signed=True)
    # signed LUTs are indexed by two's-complement bytes: -1 is byte 255
    assert signed.signed_table()[-1 + 128, 2 + 128] == (255 - 2) % 7


def test_lut_file_errors(tmp_path):
    (tmp_path / "small.npy").write_bytes(b"")
    np.save(tmp_path / "rect.npy", np.zeros((256, 128), np.int32))
    np.save(tmp_path / "float.npy", np.zeros((256, 256), np.float32))
    np.save(tmp_path / "big.npy", np.zeros((512, 512), np.int32))
    (tmp_path / "bad.bin").write_bytes(b"\0" * 1000)
    for name, needle in (("small.npy", "malformed"), ("rect.npy", "square"),
                         ("float.npy", "integers"), ("big.npy", "256x256"),
                         ("bad.bin", "bytes"), ("missing.bin", "not found")):
        with pytest.raises(HaschedError, match=needle):
            load_lut(tmp_path / name)


def test_raw_binary_layouts(tmp_path):
    a = np.arange(256)
    exact = (a[:, None] * a[None, :]).astype("<u2")
    (tmp_path / "mul8u.bin").write_bytes(exact.tobytes())
    assert load_lut(tmp_path / "mul8u.bin").is_exact
    (tmp_path / "m32.bin").write_bytes(exact.astype("<i4").tobytes())
    assert load_lut(tmp_path / "m32.bin").is_exact
    assert create_multiplier(f"lut:{tmp_path / 'mul8u.bin'}").name == "lut:mul8u.bin"


def test_error_metrics_by_hand():
    a = np.arange(256)
    exact = a[:, None] * a[None, :]
    trunc2 = error_metrics((exact >> 2) << 2)
    # the error is ab mod 4; over all pairs ab mod 4 takes 0 w.p. 1/2 (an even factor
    # pair) ... computed independently by counting
    counts = np.bincount((exact % 4).ravel(), minlength=4) / exact.size
    assert trunc2["mae"] == pytest.approx(float((counts * np.arange(4)).sum()))
    assert trunc2["wce"] == 3 and trunc2["error_probability"] == pytest.approx(1 - counts[0])
    assert error_metrics(exact)["mae"] == 0.0
    for name in MULTIPLIERS.names():  # every bundled design is an 8x8 unsigned multiplier
        m = create_multiplier(name).metrics()
        assert m["wce"] >= 0 and 0 <= m["error_probability"] <= 1


def test_drum_keeps_small_operands_exact_and_rounds_large_ones():
    t = create_multiplier("drum4").lut
    assert t[15, 15] == 225  # both below 2^4: exact
    # 200 = 0b11001000 -> keep 4 bits from the leading one: 1100 + forced 1 -> 0b11010000
    assert t[200, 1] == 0b11010000


def test_int8_needs_calibration():
    with pytest.raises(HaschedError, match="calibration"):
        Int8().layer(torch.randn(3, 3), None)
