"""Fault models on hand-made FP32 and integer bit patterns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hasched.errors import HaschedError
from hasched.sim.arithmetic import Word
from hasched.sim.faults import (
    FAULTS,
    PAPER_FR_MAX,
    BitError,
    ChipFault,
    PermanentFault,
    create_fault,
)
from hasched.sim.profile import ChipMap

F32 = Word("float32")
I16, I32 = Word("int", 16), Word("int", 32)
TRANSIENT = [n for n in FAULTS.names() if n not in ("stuck-at", "dead")]


class _Compat:
    """``corrupt(values, generator)`` / ``corrupt_u(values, u)`` on float32 words."""

    def __init__(self, model):
        self.model = model

    def corrupt(self, x, g):
        return self.model.corrupt(x, F32, None, None, g)

    def corrupt_u(self, x, u):
        return self.model.corrupt(x, F32, None, u, None)


def create_error_model(name, **kw):
    return _Compat(create_fault(name, **kw))


def bits(x: torch.Tensor) -> list[int]:
    return [v & 0xFFFFFFFF for v in x.view(torch.int32).tolist()]


def from_bits(*words: int) -> torch.Tensor:
    signed = [w - (1 << 32) if w >= 1 << 31 else w for w in words]
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32)


def fixed(mode: str, bit: int) -> _Compat:
    return _Compat(BitError(mode=mode, low_bit=bit, high_bit=bit))


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


@pytest.mark.parametrize("name", TRANSIENT)
def test_every_model_is_deterministic_and_shape_preserving(name):
    x = torch.randn(3, 4)
    a = create_error_model(name).corrupt(x, torch.Generator().manual_seed(5))
    b = create_error_model(name).corrupt(x, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_registry_and_bad_input():
    assert set(PAPER_FR_MAX) <= set(FAULTS.names())
    with pytest.raises(HaschedError, match="unknown fault model"):
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


def test_integer_words_flip_twos_complement_bits():
    x = torch.tensor([0.0, 5.0, -1.0, 300.0], dtype=torch.float64)
    # bit 15 is the sign bit of a 16-bit product: 0 -> -32768; -1 (all ones) stays
    out = BitError("flip-to-1", 15, 15).corrupt(x, I16, None, None, None)
    assert out.tolist() == [-32768.0, 5.0 - 32768.0, -1.0, 300.0 - 32768.0]
    # clearing bit 0 of -1 gives -2; of 5 gives 4; bitflip of 300 at bit 2 gives 296
    assert BitError("flip-to-0", 0, 0).corrupt(x, I32, None, None, None).tolist() == [
        0.0, 4.0, -2.0, 300.0]
    assert BitError("bitflip", 2, 2).corrupt(x, I32, None, None, None).tolist() == [
        4.0, 1.0, -5.0, 296.0]
    # default bit range of an integer word is the whole word
    assert BitError("bitflip").bit_range(I16) == (0, 15)
    assert BitError("bitflip").bit_range(F32) == (23, 29)


def test_truncation_refuses_integer_words():
    with pytest.raises(HaschedError, match="float32"):
        create_fault("bf16").check_word(I32)


def _chip(kind, bit, value):
    k = np.array([[kind, 0]], dtype=np.int8)
    return ChipMap(k, np.array([[bit, 0]]), np.array([[value, 0]]))


def test_stuck_at_and_dead_by_hand():
    x = torch.tensor([6.0, -3.0, 0.0], dtype=torch.float64)
    pe = torch.zeros(3, dtype=torch.long)  # all on the faulty PE 0
    # 6 = 0b110: stuck-at-1 on bit 0 -> 7; -3 = ...11101 -> -3; 0 -> 1
    assert ChipFault(_chip(1, 0, 1)).corrupt(x, I16, pe, None, None).tolist() == [7, -3, 1]
    # stuck-at-0 on bit 1: 6 -> 4; -3 (...11101: bit 1 is 0) -> -3; 0 -> 0
    assert ChipFault(_chip(1, 1, 0)).corrupt(x, I16, pe, None, None).tolist() == [4, -3, 0]
    assert ChipFault(_chip(2, 0, 0)).corrupt(x, I16, pe, None, None).tolist() == [0, 0, 0]
    healthy = torch.ones(3, dtype=torch.long)  # PE 1 is fine: values pass unchanged
    assert ChipFault(_chip(1, 0, 1)).corrupt(x, I16, healthy, None, None).tolist() == [6, -3, 0]
    f = torch.tensor([1.0], dtype=torch.float32)  # float32 word: bit 31 is the sign
    out = ChipFault(_chip(1, 31, 1)).corrupt(f, F32, torch.zeros(1, dtype=torch.long), None,
                                             None)
    assert out.tolist() == [-1.0]


def test_stuck_bit_must_fit_the_word():
    with pytest.raises(HaschedError, match="outside"):
        ChipFault(_chip(1, 20, 1)).check_word(I16)
    ChipFault(_chip(1, 20, 1)).check_word(I32)


def test_permanent_fault_recipes_sample_chips():
    pf = create_fault("stuck-at", bit=14, value=1)
    assert isinstance(pf, PermanentFault)
    chip = pf.sample_chip((16, 16), 0.05, seed=3)
    assert int(chip.faulty.sum()) == round(0.05 * 256)
    assert (chip.bit[chip.faulty] == 14).all() and (chip.value[chip.faulty] == 1).all()
    assert np.array_equal(chip.kind, pf.sample_chip((16, 16), 0.05, seed=3).kind)
    assert not np.array_equal(chip.kind, pf.sample_chip((16, 16), 0.05, seed=4).kind)
    with pytest.raises(HaschedError):
        create_fault("stuck-at", bit=40)
    with pytest.raises(HaschedError):
        create_fault("stuck-at", value=2)
