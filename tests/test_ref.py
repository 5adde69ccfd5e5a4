"""ModelRef: validation, defaults, store names, module:fn builders, torchvision resolution."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from hasched.errors import HaschedError
from hasched.zoo import ref as ref_module
from hasched.zoo.ref import ModelRef, adapter_for, build_model, expected_input

PACKAGE = '''
import torch
from torch import nn

def build(num_classes=10, width=4):
    return nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, num_classes))

def rgb_mlp(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))

def not_a_module():
    return 3

def broken():
    raise ValueError("no such width")

VALUE = 5
'''


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    """An importable package ``hz_user_pkg`` with builders, from a temporary folder."""
    pkg = tmp_path / "hz_user_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(PACKAGE)
    (pkg / "bad_import.py").write_text("import hz_dependency_that_is_missing\n")
    (pkg / "raises.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "hz_user_pkg"
    for name in [m for m in sys.modules if m.split(".")[0] == "hz_user_pkg"]:
        del sys.modules[name]


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "match"), [
    ({}, "name a model: --model NAME, --torchvision NAME or --module"),
    ({"model": "mlp", "torchvision": "resnet18"}, "one model source, not --model and --torchv"),
    ({"model": "lenet"}, "unknown model 'lenet'; known: .*resnet18"),
    ({"torchvision": "resnet18"}, "torchvision:resnet18 has no dataset of its own; name one"),
    ({"model": "resnet18"}, "resnet18 has no dataset of its own"),
    ({"module": "no_colon_here", "dataset": "mnist"}, "bad module reference 'no_colon_here'"),
    ({"module": "a.b:c:d", "dataset": "mnist"}, "bad module reference"),
    ({"model": "mnist32-cnn", "num_classes": 5}, "fixed output layer; num_classes does not"),
    ({"model": "mlp", "num_classes": 0}, "num_classes must be a positive integer"),
    ({"model": "mlp", "num_classes": 2.5}, "num_classes must be a positive integer, got 2.5"),
    ({"model": "mlp", "checkpoint": "w.bin"}, "use a .safetensors, .pt or .pth file"),
    ({"model": "mlp", "dataset": "cifar10"}, "unknown dataset 'cifar10'"),
    ({"torchvision": "resnet18", "dataset": "mnist", "kwargs": {"weights": "DEFAULT"}},
     "cannot be downloaded here"),
    ({"model": "mlp", "kwargs": {"num_classes": 3}}, "num_classes as its own field"),
    ({"model": "mlp", "kwargs": {"hidden": {"a": 1}}}, "values must be numbers"),
    ({"model": "mlp", "input_shape": (1, 28)}, r"input_shape must be \(C, H, W\)"),
])
def test_invalid_references_are_one_line_errors(options, match):
    with pytest.raises(HaschedError, match=match) as err:
        ModelRef.from_options(**options)
    assert "\n" not in str(err.value)


def test_defaults_are_filled_from_the_dataset():
    assert ModelRef("mnist32-cnn") == ModelRef.from_options(model="mnist32-cnn",
                                                            dataset="mnist32")
    assert ModelRef("mnist32-cnn").num_classes is None  # fixed head, nothing to fill
    mlp = ModelRef("mlp")
    assert (mlp.dataset, mlp.num_classes, dict(mlp.kwargs)) == (
        "mnist", 10, {"image_size": 28, "in_channels": 1})
    res = ModelRef("resnet18", dataset="fashion-mnist")
    assert (res.num_classes, dict(res.kwargs)) == (10, {"in_channels": 1})
    tv = ModelRef.from_options(torchvision="resnet18", dataset="fashion-mnist")
    assert (tv.name, tv.kind, tv.target, tv.num_classes, tv.kwargs) == (
        "torchvision:resnet18", "torchvision", "resnet18", 10, ())
    assert ModelRef.from_options(default_model="mlp") == mlp
    assert ModelRef.from_options(torchvision="torchvision:resnet18", dataset="mnist").name == (
        "torchvision:resnet18")


@pytest.mark.parametrize(("ref", "store"), [
    (ModelRef("mnist32-cnn"), "mnist32-cnn"),
    (ModelRef("fashion-cnn"), "fashion-cnn"),
    (ModelRef("mlp"), "mlp"),
    (ModelRef("mlp", dataset="fashion-mnist"), "mlp@fashion-mnist"),
    (ModelRef("mlp", dataset="mnist32"), "mlp@mnist32_image_size=32"),
    (ModelRef("mlp", kwargs={"hidden": [256, 128]}), "mlp"),
    (ModelRef("resnet18", dataset="fashion-mnist"), "resnet18@fashion-mnist_in_channels=1_c10"),
    (ModelRef("torchvision:resnet18", dataset="mnist", num_classes=1000),
     "torchvision-resnet18@mnist"),
    (ModelRef("module:p.m:f", dataset="mnist", input_shape=(1, 28, 28)),
     "module-p.m-f@mnist_in1x28x28"),
])
def test_store_names(ref, store):
    assert ref.store_name == store
    assert ModelRef.from_dict(ref.to_dict()) == ref


def test_store_name_hashes_non_scalar_arguments():
    a = ModelRef("mlp", kwargs={"hidden": (64,)}).store_name
    b = ModelRef("mlp", kwargs={"hidden": (32,)}).store_name
    assert a.startswith("mlp_hidden=") and a != b and len(a) == len("mlp_hidden=") + 8


def test_references_are_hashable_values():
    a = ModelRef("mlp", kwargs={"hidden": [8, 4]})
    b = ModelRef("mlp", kwargs=(("hidden", (8, 4)),))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1


# --- building ----------------------------------------------------------------------------


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_build_is_seeded_and_keeps_the_global_rng():
    ref = ModelRef("mobilenet_v3_small", dataset="mnist32")
    state = torch.get_rng_state()
    a, b, c = build_model(ref, 1), build_model(ref, 1), build_model(ref, 2)
    assert torch.equal(torch.get_rng_state(), state)
    assert _same(a, b) and not _same(a, c)
    assert a.features[0][0].in_channels == 1 and a.classifier[3].out_features == 10


def test_module_builder_is_imported_and_called(user_pkg):
    ref = ModelRef.from_options(module=f"{user_pkg}.models:build", dataset="mnist",
                                num_classes=7, kwargs={"width": 3})
    model = build_model(ref, 0)
    assert isinstance(model, nn.Sequential)
    assert (model[0].out_channels, model[-1].out_features) == (3, 7)
    assert ref.store_name == "module-hz_user_pkg.models-build@mnist_c7_width=3"
    # No num_classes given: the builder's own default applies.
    plain = ModelRef.from_options(module=f"{user_pkg}.models:build", dataset="mnist")
    assert plain.num_classes is None and build_model(plain)[-1].out_features == 10


@pytest.mark.parametrize(("target", "match"), [
    ("hz_not_a_package.models:build", "cannot import 'hz_not_a_package.models': no module"
     " named 'hz_not_a_package'.*PYTHONPATH"),
    ("{pkg}.nope:build", r"cannot import 'hz_user_pkg\.nope': no module named 'hz_user_pkg\.n"),
    ("{pkg}.bad_import:build", "importing 'hz_user_pkg.bad_import' failed: No module named"
     " 'hz_dependency_that_is_missing'"),
    ("{pkg}.raises:build", "importing 'hz_user_pkg.raises' failed: RuntimeError: boom at"),
    ("{pkg}.models:missing", "module 'hz_user_pkg.models' has no attribute 'missing'"),
    ("{pkg}.models:VALUE", r"hz_user_pkg\.models:VALUE is not callable \(int\)"),
    ("{pkg}.models:not_a_module", "returned 'int', not a torch.nn.Module"),
    ("{pkg}.models:broken", r"broken\(\) failed: ValueError: no such width"),
])
def test_module_builder_errors(user_pkg, target, match):
    ref = ModelRef("module:" + target.format(pkg=user_pkg), dataset="mnist")
    with pytest.raises(HaschedError, match=match) as err:
        build_model(ref)
    assert "\n" not in str(err.value)


def test_module_builder_bad_parameters(user_pkg):
    ref = ModelRef(f"module:{user_pkg}.models:build", dataset="mnist", kwargs={"depth": 2})
    with pytest.raises(HaschedError, match="models:build: bad parameters.*depth"):
        build_model(ref)


def test_expected_input_is_inferred_for_module_models(user_pkg):
    conv = ModelRef(f"module:{user_pkg}.models:build", dataset="mnist32")
    assert expected_input(conv) == (1, 32, 32)
    rgb = ModelRef(f"module:{user_pkg}.models:rgb_mlp", dataset="fashion-mnist")
    assert expected_input(rgb) == (3, 32, 32)
    assert adapter_for(rgb).describe()["steps"] == [
        "resize 28x28 -> 32x32 (bilinear, half-pixel)", "repeat channels 1 -> 3"]
    forced = ModelRef(f"module:{user_pkg}.models:rgb_mlp", dataset="mnist",
                      input_shape=(3, 32, 32))
    assert expected_input(forced) == (3, 32, 32)
    assert expected_input(ModelRef("torchvision:resnet18", dataset="mnist")) == (3, 32, 32)
    assert expected_input(ModelRef("resnet18", dataset="mnist")) == (1, 32, 32)
    assert expected_input(ModelRef("mlp", dataset="mnist32")) == (1, 32, 32)


# --- torchvision resolution --------------------------------------------------------------


def test_without_torchvision_the_bundle_is_used(monkeypatch):
    monkeypatch.setattr(ref_module, "_torchvision_models", lambda: None)
    ref = ModelRef.from_options(torchvision="mobilenet_v3_small", dataset="mnist")
    assert ref_module.builder_origin(ref) == "hasched (torchvision-compatible)"
    assert build_model(ref, 0).classifier[3].out_features == 10
    with pytest.raises(HaschedError, match="torchvision is not importable here, and 'vgg11' is"
                                           " not among its bundled equivalents: mobilenet_v3"):
        ModelRef.from_options(torchvision="vgg11", dataset="mnist")


def test_real_torchvision_is_preferred_when_importable(monkeypatch):
    calls = []

    def fake_builder(**kwargs):
        calls.append(kwargs)
        return nn.Linear(3 * 224 * 224, kwargs["num_classes"])

    fake = types.SimpleNamespace(list_models=lambda module=None: ["vgg11"],
                                 get_model_builder=lambda name: fake_builder)
    monkeypatch.setattr(ref_module, "_torchvision_models", lambda: (fake, "9.9"))
    ref = ModelRef.from_options(torchvision="vgg11", dataset="mnist")
    assert isinstance(build_model(ref), nn.Linear) and calls == [{"num_classes": 10}]
    assert ref_module.builder_origin(ref) == "torchvision 9.9"
    assert expected_input(ref) == (3, 224, 224)
    with pytest.raises(HaschedError, match="torchvision 9.9 has no classification model 'x'"):
        ModelRef.from_options(torchvision="x", dataset="mnist")


def test_torchvision_import_failure_means_absent(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def broken_import(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken_import)
    ref_module._torchvision_models.cache_clear()
    try:
        assert ref_module._torchvision_models() is None
    finally:
        ref_module._torchvision_models.cache_clear()
