"""Error models on hand-made FP32 bit patterns."""

from __future__ import annotations

import pytest
import torch

from hasched.errors import HaschedError
from hasched.sim.faults import (
    PAPER_FR_MAX,
    ExponentBitError,
    create_error_model,
    list_error_models,
)


def bits(x: torch.Tensor) -> list[int]:
    return [v & 0xFFFFFFFF for v in x.view(torch.int32).tolist()]


def from_bits(*words: int) -> torch.Tensor:
    signed = [w - (1 << 32) if w >= 1 << 31 else w for w in words]
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32)


def fixed(mode: str, bit: int) -> ExponentBitError:
    return ExponentBitError(mode=mode, low_bit=bit, high_bit=bit)


def test_flip_to_one_sets_the_bit():
    x = torch.tensor([1.0, 2.0, 0.0, -0.25])
    out = fixed("flip-to-1", 23).corrupt(x, None)
    # 1.0 already has exponent bit 23 set; 2.0 (exp 128) -> exp 129 = 4.0; 0 -> 2^-126;
    # -0.25 (exp 125 = 0b1111101) has bit 23 set already.
    assert out.tolist()[0] == 1.0 and out.tolist()[1] == 4.0 and out.tolist()[3] == -0.25
    assert bits(out)[2] == 0x00800000


def test_flip_to_one_top_bit_gives_inf_and_default_never_hits_it():
    assert torch.isinf(fixed("flip-to-1", 30).corrupt(torch.tensor([1.0]), None)).all()
    g = torch.Generator().manual_seed(0)
    out = create_error_model("flip-to-1").corrupt(torch.ones(20000), g)
    assert torch.isfinite(out).all()  # bit 30 is never chosen by default (authors' code)


def test_flip_to_zero_and_bitflip():
    x = torch.tensor([1.0, 3.0])
    assert fixed("flip-to-0", 23).corrupt(x, None).tolist() == [0.5, 3.0]  # 3.0: exp 128
    assert fixed("bitflip", 23).corrupt(x, None).tolist() == [0.5, 6.0]
    assert fixed("bitflip", 31).corrupt(x, None).tolist() == [-1.0, -3.0]  # sign bit


def test_bit_position_is_uniform_over_23_to_29():
    g = torch.Generator().manual_seed(1)
    n = 70000
    out = create_error_model("bitflip").corrupt(torch.zeros(n), g)  # 0 ^ (1 << b)
    b = torch.log2(out.view(torch.int32).double()).round().long()
    counts = torch.bincount(b, minlength=32)
    assert counts[:23].sum() == 0 and counts[30:].sum() == 0
    # Each of 7 bits: Binomial(n, 1/7); 5 sigma is a bound a correct sampler never hits.
    mu, sd = n / 7, (n * (1 / 7) * (6 / 7)) ** 0.5
    assert ((counts[23:30].double() - mu).abs() < 5 * sd).all()


def test_truncation_is_exact():
    x = from_bits(0x3FFFFFFF, 0xBF81FFFF, 0x00001FFF)
    assert bits(create_error_model("tf32").corrupt(x, None)) == [0x3FFFE000, 0xBF81E000, 0]
    assert bits(create_error_model("bf16").corrupt(x, None)) == [0x3FFF0000, 0xBF810000, 0]


def test_truncation_matches_reference_on_random_values():
    x = torch.randn(10000)
    ref = (x.view(torch.int32) >> 16 << 16).view(torch.float32)
    assert torch.equal(create_error_model("bf16").corrupt(x, None), ref)
    t = create_error_model("tf32").corrupt(x, None)
    assert ((t - x).abs() <= x.abs() * 2.0**-10).all()  # at most 10 mantissa bits kept


def test_zero():
    assert create_error_model("zero").corrupt(torch.randn(5), None).eq(0).all()


@pytest.mark.parametrize("name", list_error_models())
def test_every_model_is_deterministic_and_shape_preserving(name):
    x = torch.randn(3, 4)
    a = create_error_model(name).corrupt(x, torch.Generator().manual_seed(5))
    b = create_error_model(name).corrupt(x, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_registry_and_bad_input():
    assert set(PAPER_FR_MAX) <= set(list_error_models())
    with pytest.raises(HaschedError, match="unknown error model"):
        create_error_model("flip-to-2")
    with pytest.raises(HaschedError):
        create_error_model("bitflip", low_bit=30, high_bit=23)
    with pytest.raises(HaschedError):
        create_error_model("tf32", nonsense=1)
    with pytest.raises(HaschedError):
        create_error_model("bitflip").corrupt(torch.ones(2, dtype=torch.float64), None)


def test_corrupt_u_maps_uniforms_onto_bits_evenly():
    em = create_error_model("flip-to-1")
    u = (torch.arange(7000, dtype=torch.float32) + 0.5) / 7000  # evenly spaced in (0, 1)
    out = em.corrupt_u(torch.zeros(7000), u)
    b = torch.log2(out.view(torch.int32).double()).round().long()
    assert torch.equal(torch.bincount(b, minlength=30)[23:30], torch.full((7,), 1000))
    assert torch.equal(em.corrupt_u(torch.zeros(1), torch.ones(1)).view(torch.int32),
                       torch.tensor([1 << 29], dtype=torch.int32))  # u=1 stays in range
