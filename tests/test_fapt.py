"""FAP / FAP+T on tiny synthetic models: masks held at zero, determinism, fractional epochs,
and the Reduce policy's choice from a hand-made resilience map."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from hasched.errors import HaschedError
from hasched.sim.fap import faulty_weight_masks
from hasched.sim.mapping import Systolic
from hasched.sim.profile import ChipMap
from hasched.study.fapt import FapTrainer, FineTune, masked_max, pruned_share, steps_for
from hasched.study.resilience import ResilienceMap
from hasched.study.retrain import Policy, reduce_steps
from hasched.zoo.models import TrainRecipe

SGD = TrainRecipe(optimizer="sgd", lr=0.1, momentum=0.9, batch_size=16)
ADAM = TrainRecipe(optimizer="adam", lr=1e-2, batch_size=16)


def tiny_model(seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(OrderedDict([("h0", nn.Linear(12, 10)), ("relu", nn.ReLU()),
                                   ("drop", nn.Dropout(0.3)), ("op", nn.Linear(10, 3))]))
    for p in m.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


def tiny_data(n: int = 100, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # 3 learnable classes


def chip(frac: float = 0.3, seed: int = 3) -> ChipMap:
    return ChipMap.sample((4, 4), frac, seed, kind="dead")


def trainer(seed: int = 0, recipe: TrainRecipe = SGD, key: str = "chip",
            model: nn.Module | None = None) -> FapTrainer:
    model = model or tiny_model()
    masks = faulty_weight_masks(model, ["h0", "op"], Systolic(4, 4), chip())
    x, y = tiny_data()
    return FapTrainer(model, masks, recipe, x, y, FineTune(seed=seed), key)


@pytest.mark.parametrize("recipe", [SGD, ADAM])
def test_fap_masks_are_applied_and_stay_zero_through_fap_t(recipe):
    model = tiny_model()
    masks = faulty_weight_masks(model, ["h0", "op"], Systolic(4, 4), chip())
    # a loop oracle of the mask: W[r, j] is on PE (r mod 4, j mod 4)
    bad = chip().faulty
    for name in ("h0", "op"):
        w = dict(model.named_modules())[name].weight
        want = torch.tensor([[bool(bad[r % 4, j % 4]) for j in range(w.shape[1])]
                             for r in range(w.shape[0])])
        assert torch.equal(masks[name], want)
    assert 0 < pruned_share(model, masks) < 1 and masked_max(model, masks) > 0
    t = trainer(recipe=recipe)
    assert masked_max(t.model, masks) == 0.0  # FAP at once
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    # the gradient reaches pruned weights, so only re-applying the mask keeps them at zero
    x, y = tiny_data()
    t.model.train()
    nn.CrossEntropyLoss()(t.model(x), y).backward()
    assert float(t.model.h0.weight.grad[masks["h0"]].abs().sum()) > 0
    t.model.zero_grad(set_to_none=True)
    t.advance_epochs(3)
    assert t.step == 3 * 7 and masked_max(t.model, masks) == 0.0
    after = t.model.state_dict()
    kept = ~masks["h0"]
    assert not torch.equal(before["h0.weight"][kept], after["h0.weight"][kept])  # it trained
    assert torch.equal(model.h0.weight, tiny_model().h0.weight)  # the original is untouched


def test_fap_t_is_deterministic_for_a_seed_and_piecewise_equals_one_run():
    a, b, c, d = trainer(5), trainer(5), trainer(6), trainer(5, key="other")
    a.advance_to(10)
    b.advance_to(3)
    b.advance_to(4)  # pieces (with evaluation in between) change nothing
    b.ready()
    b.advance_to(10)
    c.advance_to(10)
    d.advance_to(10)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["h0.weight"], c.model.state_dict()["h0.weight"])
    assert not torch.equal(sa["h0.weight"], d.model.state_dict()["h0.weight"])
    e = trainer(5)  # (building the test's model draws from the global RNG; training not)
    rng = torch.get_rng_state()
    e.advance_to(2)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is left as it was


@pytest.mark.parametrize("epochs,spe,steps", [
    (0, 7, 0), (0.1, 7, 1), (0.25, 7, 2), (0.5, 7, 4), (1, 7, 7), (2, 7, 14), (0.35, 20, 7),
    (0.05, 7, 0), (0.1, 10, 1), (0.25, 10, 3), (1.5, 79, 119)])
def test_fractional_epochs_are_that_share_of_the_batches(epochs, spe, steps):
    assert steps_for(epochs, spe) == steps


def test_fractional_epochs_take_that_many_optimiser_steps():
    t = trainer()
    assert t.steps_per_epoch == math.ceil(100 / 16) == 7
    calls = []
    t.model.h0.register_forward_hook(lambda m, i, o: calls.append(m.training))
    t.advance_epochs(0.5)
    assert t.step == 4 and calls.count(True) == 4
    t.advance_epochs(0.25)  # never backwards
    assert t.step == 4 and calls.count(True) == 4
    t.advance_epochs(1.25)  # crosses an epoch boundary: a new shuffle, 9 steps in all
    assert t.step == 9 and calls.count(True) == 9
    with pytest.raises(HaschedError):
        steps_for(-0.5, 7)


def hand_map() -> ResilienceMap:
    worst = [[0.95, 0.95, 0.95, 0.95],
             [0.80, 0.92, 0.945, 0.95],
             [0.60, 0.85, 0.90, 0.94]]
    mean = [[0.95] * 4, [0.85, 0.94, 0.95, 0.95], [0.70, 0.90, 0.93, 0.95]]
    return ResilienceMap([0.0, 0.1, 0.2], [0.0, 0.5, 1.0, 2.0], worst, 0.95, 0.96, {},
                         [[0] * 4] * 3, mean)


@pytest.mark.parametrize("rate,max_drop,epochs,reason", [
    (0.0, 1.0, 0.0, "map"),
    (0.1, 1.0, 1.0, "map"),      # 0.945 >= 0.94 first at e = 1
    (0.05, 1.0, 1.0, "map"),     # halfway: [0.875, 0.935, 0.9475, 0.95]
    (0.15, 1.0, 2.0, "map"),     # halfway: [0.70, 0.885, 0.9225, 0.945]
    (0.15, 5.0, 1.0, "map"),     # target 0.90: 0.885 at e = 0.5 misses, 0.9225 at 1 meets
    (0.2, 0.5, 2.0, "none-suffices"),
    (0.25, 1.0, 2.0, "beyond-map"),
    (0.1, 15.0, 0.0, "map"),     # target 0.80: FAP alone suffices
])
def test_reduce_chooses_the_hand_computed_amount(rate, max_drop, epochs, reason):
    c = hand_map().choose(rate, max_drop)
    assert (c.epochs, c.reason) == (epochs, reason)


@pytest.mark.parametrize("fap_acc,rate,epochs,reason", [
    (0.945, 0.005, 0.0, "fap-meets"),  # within 1 point after FAP alone: no retraining
    (0.90, 0.05, 1.0, "map"),         # e = 0 means 0.95 / 0.85 / 0.70: halfway to 0.1
    (0.775, 0.15, 2.0, "map"),        # halfway between 0.85 (f = 0.1) and 0.70 (f = 0.2)
    (0.65, None, 2.0, "beyond-map"),  # worse than the mean chip at the largest rate
])
def test_reduce_crit_places_a_chip_by_its_fap_damage(fap_acc, rate, epochs, reason):
    m = hand_map()
    got = m.equivalent_rate(fap_acc)
    assert (got is None and rate is None) or got == pytest.approx(rate)
    c = m.choose_by_damage(fap_acc, 1.0)
    assert (c.epochs, c.reason) == (epochs, reason)
    bumpy = ResilienceMap(m.rates, m.epochs, m.val_worst, 0.95, 0.96, {}, m.steps,
                          [[0.95] * 4, [0.80] * 4, [0.85] * 4])  # made non-increasing first
    assert bumpy.equivalent_rate(0.80) == pytest.approx(0.1)
    assert bumpy.equivalent_rate(0.79) is None


def test_acceptance_compares_with_the_cheapest_fixed_amount_of_the_same_yield():
    from hasched.report.reduce import acceptance

    def pol(y, e):
        return {"yield": y, "total_epochs": e, "total_seconds": 10 * e}

    summary = {"policies": {"none": pol(0.5, 0), "fixed:0.5": pol(0.9, 30),
                            "fixed:1": pol(1.0, 60), "fixed:2": pol(1.0, 120),
                            "reduce": pol(0.95, 25), "reduce-crit": pol(0.9, 20)}}
    v = acceptance(summary)
    assert v["fixed_max"] == {"policy": "fixed:2", "yield": 1.0, "epochs": 120}
    assert v["reduce"]["fixed_same_yield"]["policy"] == "fixed:1"
    assert v["reduce"]["epoch_ratio"] == pytest.approx(25 / 60) and v["reduce"]["passed"]
    crit = v["reduce-crit"]
    assert crit["fixed_same_yield"]["policy"] == "fixed:0.5" and not crit["passed"]
    assert crit["epoch_ratio"] == pytest.approx(20 / 30) and not crit["meets_yield"]
    summary["policies"]["reduce"] = pol(0.5, 3)  # no better than FAP alone at 0 epochs
    assert acceptance(summary)["reduce"]["epoch_ratio"] == float("inf")


def test_hindsight_bound_takes_each_chips_cheapest_meeting_amount():
    from hasched.study.retrain import hindsight_bound

    def row(chip, policy, cost, meets):
        return {"chip": chip, "policy": policy, "cost_epochs": cost, "meets": meets}

    rows = [row("a", "none", 0.0, False), row("a", "fixed:2", 2.0, True),
            row("a", "fixed:0.5", 0.5, True), row("a", "reduce", 0.5, True),
            row("b", "none", 0.0, True), row("b", "fixed:0.5", 0.5, True),
            row("c", "fixed:2", 2.0, False), row("c", "fixed:0.5", 0.5, False),
            row("d", "fixed:0.5", 0.52, False), row("d", "fixed:2", 2.04, True)]
    b = hindsight_bound(rows)
    # a: 0.5 (fixed:2 also meets, reduce is not an amount); b: FAP alone; c: never, costs
    # nothing; d: 2.04 (costs are steps / steps per epoch, not the nominal amount)
    assert b == {"chips": 4, "yield": 0.75, "total_epochs": pytest.approx(0.5 + 2.04),
                 "amounts": {"a": 0.5, "b": 0.0, "c": None, "d": 2.0}}
    assert hindsight_bound([row("a", "none", 0.0, True), row("a", "reduce", 1.0, True)]) is None


def test_reduce_steps_up_when_verification_misses():
    eps = [0.0, 0.5, 1.0, 2.0]
    asked = []

    def val_at(e):
        asked.append(e)
        return {0.5: 0.93, 1.0: 0.935, 2.0: 0.95}[e]

    assert reduce_steps(1, eps, val_at, 0.94) == [1, 2, 3]
    assert asked == [0.5, 1.0, 2.0]
    assert reduce_steps(1, eps, lambda e: 0.99, 0.94) == [1]  # verified at once
    assert reduce_steps(3, eps, lambda e: 0.5, 0.94) == [3]  # nothing larger to step up to


def test_policies_are_checked():
    assert Policy("fixed", 2.0).name == "fixed:2" and Policy("reduce").name == "reduce"
    with pytest.raises(HaschedError, match="unknown policy"):
        Policy("always")
    with pytest.raises(HaschedError, match="only fixed"):
        Policy("reduce", 1.0)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(HaschedError, match="finite and >= 0"):
            Policy("fixed", bad)


def tiny_context(model: nn.Module, layers: list[str], mapping: Systolic):
    from hasched.study.fap_study import FapContext, FapStudy

    x, y = tiny_data(40)
    if isinstance(model[0], nn.Conv2d):
        x = torch.randn(40, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    return FapContext(FapStudy(), model, {}, SGD, layers, mapping, {}, (x, y), (x, y), (x, y))


def test_remap_masks_equal_faulty_weight_masks_under_any_schedule():
    from hasched.study.remap import FapRemapProblem

    g = torch.Generator().manual_seed(4)
    conv = nn.Sequential(OrderedDict([("c0", nn.Conv2d(2, 5, 3)), ("flat", nn.Flatten()),
                                      ("op", nn.Linear(5 * 9, 3))]))
    for model, layers, mapping in ((tiny_model(), ["h0", "op"], Systolic(4, 4)),
                                   (conv, ["c0", "op"], Systolic(4, 4, k_order="hwc"))):
        ctx = tiny_context(model, layers, mapping)
        problem = FapRemapProblem(ctx, chip(0.4, 7), images=40)
        mods = dict(model.named_modules())
        for _ in range(3):
            perms = {n: torch.randperm(mods[n].weight.shape[0], generator=g) for n in layers}
            want = faulty_weight_masks(model, layers, mapping, chip(0.4, 7), perms=perms)
            got = problem.masks_for(perms)
            assert all(torch.equal(got[n], want[n]) for n in layers)
            w = problem.model_for(perms)
            assert masked_max(w, want) == 0.0
            kept = ~want["op"]
            assert torch.equal(dict(w.named_modules())["op"].weight[kept], mods["op"].weight[kept])


def test_remap_search_is_deterministic_for_a_seed():
    from hasched.study.remap import remap_chip

    ctx = tiny_context(tiny_model(), ["h0", "op"], Systolic(4, 4))
    cfg = {"population": 4, "generations": 2}
    a, b = (remap_chip(ctx, chip(0.4, 7), "ga", cfg, seed=3, images=40) for _ in range(2))
    assert a["schedule"] == b["schedule"] and a["val_acc"] == b["val_acc"]
    assert a["evaluations"] > 4 and a["search_fitness"] >= remap_chip(
        ctx, chip(0.4, 7), "ga", {"population": 1, "generations": 0}, 3, 40)["search_fitness"]


def test_policies_give_the_same_rows_in_any_order():
    # fixed:2 first used to train past the 0.5 epochs Reduce then asked for (a crash)
    from hasched.study.fap_study import FapStudy
    from hasched.study.retrain import RetrainConfig, _chip_rows

    ctx = tiny_context(tiny_model(), ["h0", "op"], Systolic(4, 4))
    ctx.clean_val = ctx.clean_test = 0.95
    c = chip(0.1, 3)  # 2 of 16 PEs: Reduce starts at e = 0.5 with a 5-point budget
    assert hand_map().choose(float(c.faulty.mean()), 5.0).epochs == 0.5
    pols = (Policy("fixed", 2.0), Policy("reduce"), Policy("reduce-crit"))
    got = []
    for order in (pols, pols[::-1]):
        cfg = RetrainConfig(FapStudy(), order, (("c", c),), 5.0, hand_map())
        rows = _chip_rows(cfg, ctx, "c", c, False)
        got.append({r["policy"]: {k: v for k, v in r.items() if "seconds" not in k}
                    for r in rows})
    assert got[0] == got[1]
    assert got[0]["reduce"]["tried"][0] == 0.5


def test_verify_margin_makes_reduce_aim_lower_but_judges_yield_at_max_drop():
    from hasched.study.fap_study import FapStudy
    from hasched.study.retrain import RetrainConfig, _chip_rows

    ctx = tiny_context(tiny_model(), ["h0", "op"], Systolic(4, 4))
    ctx.clean_val = ctx.clean_test = 0.95
    c = chip(0.1, 3)  # rate 0.125: worst case [0.75, 0.9025, 0.93375, 0.9475] by hand
    rmap = hand_map()
    assert rmap.choose(0.125, 5.0).epochs == 0.5 and rmap.choose(0.125, 4.0).epochs == 1.0
    rows = {}
    for margin in (0.0, 1.0):
        cfg = RetrainConfig(FapStudy(), (Policy("reduce"),), (("c", c),), 5.0, rmap,
                            verify_margin=margin)
        rows[margin] = _chip_rows(cfg, ctx, "c", c, False)[0]
        assert ("verify_margin" in cfg.identity()) == (margin > 0)  # old runs still resume
    assert rows[0.0]["chosen"] == 0.5 and rows[1.0]["chosen"] == 1.0  # aims at 4 points
    for r in rows.values():  # judged at 5 points whatever the margin
        assert r["meets"] == (r["test_acc"] >= 0.90 - 1e-12)
        assert r["val_ok"] == (r["val_acc"] >= 0.90 - 1e-12)
        # verification stopped at the first amount that met the aim (or the last amount)
        aim = 0.90 if r is rows[0.0] else 0.91
        assert r["val_acc"] >= aim - 1e-12 or r["epochs"] == 2.0
    with pytest.raises(HaschedError, match="verify-margin"):
        RetrainConfig(FapStudy(), (Policy("none"),), (("c", c),), 1.0,
                      verify_margin=1.5).validate()


@pytest.mark.parametrize("batch,n", [(1, 100), (16, 1)])
def test_batchnorm_with_one_image_batches_is_an_error_not_a_hang(batch, n):
    model = nn.Sequential(OrderedDict([("h0", nn.Linear(12, 10)), ("bn", nn.BatchNorm1d(10)),
                                       ("op", nn.Linear(10, 3))])).eval()
    masks = faulty_weight_masks(model, ["h0", "op"], Systolic(4, 4), chip())
    x, y = tiny_data(n)
    with pytest.raises(HaschedError, match="at least 2"):
        FapTrainer(model, masks, SGD, x, y, FineTune(batch_size=batch), "chip")
