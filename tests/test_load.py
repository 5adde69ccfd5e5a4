"""load_model / eval_data / strict checkpoint files / training any reference (tiny data)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hasched.errors import HaschedError
from hasched.zoo import data
from hasched.zoo.data import InputAdapter, load_dataset, resize_bilinear
from hasched.zoo.fit import recalibrate_batchnorm
from hasched.zoo.load import eval_data, load_model
from hasched.zoo.ref import ModelRef, build_model
from hasched.zoo.train import checkpoint_dir, train_ref
from hasched.zoo.weights import read_state_file
from idx_files import write_learnable


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """Small learnable synthetic mnist/ and fashion-mnist/ folders (128 train, 32 test)."""
    monkeypatch.delenv("HASCHED_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "_download", lambda *a, **k: pytest.fail("tests never download"))
    return write_learnable(tmp_path / "data")


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("HASCHED_MODELS_DIR", raising=False)
    return tmp_path / "models"


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


SMALL_MLP = ModelRef("mlp", kwargs={"hidden": (16,)})


# --- training any reference --------------------------------------------------------------


def test_mlp_training_is_deterministic_per_seed(data_dir):
    state = torch.get_rng_state()
    kwargs = dict(data_dir=data_dir, epochs=2, progress=False, download=False)
    a, meta = train_ref(SMALL_MLP, 3, **kwargs)
    b, _ = train_ref(SMALL_MLP, 3, **kwargs)
    c, _ = train_ref(SMALL_MLP, 4, **kwargs)
    assert _same(a, b) and not _same(a, c)
    assert torch.equal(torch.get_rng_state(), state)
    # 128 images, batch 128: one step per epoch.
    assert (meta["steps"], meta["epochs"], meta["train_images"]) == (2, 2, 128)
    assert meta["model"] == SMALL_MLP.store_name == "mlp_hidden=" + meta["model"][-8:]
    assert meta["ref"] == SMALL_MLP.to_dict() and meta["input"]["steps"] == []


def test_mlp_learns_the_synthetic_task(data_dir):
    _, meta = train_ref(ModelRef("mlp", dataset="fashion-mnist"), 0, data_dir=data_dir,
                        epochs=30, progress=False)
    assert meta["test_accuracy"] >= 0.5, meta  # chance is 0.1


def test_resnet18_trains_through_the_adapter(data_dir):
    ref = ModelRef.from_options(torchvision="resnet18", dataset="fashion-mnist")
    model, meta = train_ref(ref, 0, data_dir=data_dir, max_steps=1, train_subset=8,
                            progress=False)
    assert meta["input"]["to"] == [3, 32, 32] and len(meta["input"]["steps"]) == 2
    assert meta["builder"] == "hasched (torchvision-compatible)"
    assert not model.training and meta["bn_recalibration_images"] == 8
    assert int(model.bn1.num_batches_tracked) == 1  # one recalibration batch


def test_batchnorm_recalibration_is_an_equal_weight_average():
    images = torch.rand(6, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.BatchNorm2d(2, momentum=0.01))
    identity = InputAdapter((2, 2, 2), (2, 2, 2))
    assert recalibrate_batchnorm(model, images, identity, batch_size=3, n_images=6) == 6
    bn = model[0]
    torch.testing.assert_close(bn.running_mean, images.mean(dim=(0, 2, 3)))
    batch_vars = [images[i : i + 3].transpose(0, 1).reshape(2, -1).var(dim=1) for i in (0, 3)]
    torch.testing.assert_close(bn.running_var, (batch_vars[0] + batch_vars[1]) / 2)
    assert bn.momentum == 0.01 and not model.training
    # A last batch of one image is left out; a model without BatchNorm is left alone.
    assert recalibrate_batchnorm(model, images, identity, batch_size=3, n_images=4) == 3
    torch.testing.assert_close(bn.running_mean, images[:3].mean(dim=(0, 2, 3)))
    assert recalibrate_batchnorm(nn.Linear(2, 2), images, identity) == 0


def test_training_rejects_a_model_that_cannot_score_every_class(data_dir, tmp_path,
                                                                monkeypatch):
    pkg = tmp_path / "hz_short_head.py"
    pkg.write_text("from torch import nn\n\ndef build():\n"
                   "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 5))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ref = ModelRef("module:hz_short_head:build", dataset="mnist")
    with pytest.raises(HaschedError, match=r"outputs shaped \(5,\).*needs 10 class scores"):
        train_ref(ref, 0, data_dir=data_dir, max_steps=1, progress=False)
    wrong = ModelRef("module:hz_short_head:build", dataset="mnist", input_shape=(1, 20, 20))
    with pytest.raises(HaschedError, match=r"cannot take mnist images shaped \(1, 20, 20\)"):
        train_ref(wrong, 0, data_dir=data_dir, max_steps=1, progress=False)


def test_training_refuses_a_checkpoint_reference(data_dir):
    ref = ModelRef("mlp", checkpoint="w.safetensors")
    with pytest.raises(HaschedError, match="training starts from scratch"):
        train_ref(ref, 0, data_dir=data_dir)


# --- load_model --------------------------------------------------------------------------


def test_init_only_gives_seeded_random_weights(models_dir):
    ref = ModelRef.from_options(torchvision="mobilenet_v3_small", dataset="mnist")
    a, meta = load_model(ref, 5, models_dir=models_dir, init_only=True)
    b, _ = load_model(ref, 5, models_dir=models_dir, init_only=True)
    assert _same(a, b) and not a.training and meta["weights"] == "random-init"
    assert not models_dir.exists()  # the store is not touched
    with pytest.raises(HaschedError, match="exclude training and a checkpoint"):
        load_model(ref, 5, init_only=True, train=True)


def test_foreign_model_needs_training_to_be_asked_for(data_dir, models_dir):
    ref = ModelRef.from_options(torchvision="resnet18", dataset="mnist")
    with pytest.raises(HaschedError, match="no checkpoint for torchvision-resnet18@mnist_c10"
                                           " seed 1 in .*; train it first"):
        load_model(ref, 1, models_dir=models_dir, data_dir=data_dir)


def test_train_then_load_from_the_store(data_dir, models_dir):
    logs: list[str] = []
    ref = ModelRef("mlp", dataset="fashion-mnist", kwargs={"hidden": (8,)})
    trained, meta = load_model(ref, 2, models_dir=models_dir, data_dir=data_dir, epochs=1,
                               log=logs.append, progress=False, train=True)
    folder = checkpoint_dir(ref.store_name, 2, models_dir)
    assert (folder / "model.safetensors").is_file() and meta["weights"] == "trained"
    again, meta2 = load_model(ref, 2, models_dir=models_dir, data_dir=data_dir, log=logs.append)
    assert _same(trained, again) and len(logs) == 1 and meta2["steps"] == meta["steps"] == 1


def test_train_flag_trains_a_foreign_model_once(data_dir, models_dir, tmp_path, monkeypatch):
    (tmp_path / "hz_tiny.py").write_text(
        "from torch import nn\n\ndef build(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(1, 2, 5, 4), nn.Flatten(), nn.Linear(72, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ref = ModelRef("module:hz_tiny:build", dataset="mnist")
    kwargs = dict(models_dir=models_dir, data_dir=data_dir, epochs=1, progress=False)
    first, meta = load_model(ref, 0, train=True, **kwargs)
    second, _ = load_model(ref, 0, **kwargs)
    assert _same(first, second) and meta["builder"] == "hz_tiny:build"
    assert (checkpoint_dir("module-hz_tiny-build@mnist", 0, models_dir) / "meta.json").is_file()


# --- checkpoint files --------------------------------------------------------------------


@pytest.fixture
def resnet_state():
    """A resnet18 (1 channel, 10 classes) state dict with non-default weights."""
    model = build_model(ModelRef("resnet18", dataset="mnist"), 11)
    with torch.no_grad():
        model.fc.bias.copy_(torch.arange(10.0))
        model.bn1.running_mean.fill_(0.25)
    return model.state_dict()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_checkpoint_files_load_exactly(tmp_path, resnet_state, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in resnet_state.items()}, str(path))
    else:
        torch.save({"state_dict": resnet_state, "epoch": 3} if suffix == ".pth"
                   else resnet_state, path)
    ref = ModelRef("resnet18", dataset="mnist", checkpoint=str(path))
    model, meta = load_model(ref, 0)
    assert not model.training and meta["weights"] == "checkpoint" and len(meta[
        "checkpoint_sha256"]) == 16
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], resnet_state[k]) for k in resnet_state)


def test_same_weights_load_into_torchvision_and_registered_refs(tmp_path):
    registered = ModelRef("resnet18", dataset="mnist", kwargs={"in_channels": 3})
    model = build_model(registered, 4).eval()
    path = tmp_path / "rgb.safetensors"
    save_file(model.state_dict(), str(path))
    tv = ModelRef.from_options(torchvision="resnet18", dataset="mnist", checkpoint=path)
    other, _ = load_model(tv, 0)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path, resnet_state):
    state = dict(resnet_state)
    for key in ("fc.bias", "conv1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight"):
        del state[key]
    state["head.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    ref = ModelRef("resnet18", dataset="mnist", checkpoint=str(path))
    with pytest.raises(HaschedError, match=r"bad\.pt does not match resnet18: keys differ \("
                       r"missing conv1\.weight, layer1\.0\.conv1\.weight, layer1\.0\.conv2\."
                       r"weight and 1 more; unexpected head\.weight\)") as err:
        load_model(ref, 0)
    assert "\n" not in str(err.value)


def test_strict_loading_checks_shapes(tmp_path, resnet_state):
    path = tmp_path / "ten.safetensors"
    save_file({k: v.contiguous() for k, v in resnet_state.items()}, str(path))
    ref = ModelRef("resnet18", dataset="mnist", checkpoint=str(path), num_classes=5)
    with pytest.raises(HaschedError, match=r"fc\.weight is \(10, 512\) torch\.float32, "
                                           r"expected \(5, 512\).*num_classes\?"):
        load_model(ref, 0)


def test_missing_batchnorm_counters_are_accepted(tmp_path, resnet_state):
    # Checkpoints from older torch versions have no num_batches_tracked; torch fills them.
    state = {k: v for k, v in resnet_state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pt"
    torch.save(state, path)
    model, _ = load_model(ModelRef("resnet18", dataset="mnist", checkpoint=str(path)), 0)
    assert torch.equal(model.fc.bias, resnet_state["fc.bias"])


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(HaschedError, match="checkpoint file not found: .*nope.pt"):
        read_state_file(tmp_path / "nope.pt")
    pickled = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), pickled)
    with pytest.raises(HaschedError, match="not a plain state dict.*save model.state_dict"):
        read_state_file(pickled)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(HaschedError, match="corrupt checkpoint weights .*junk.safetensors"):
        read_state_file(junk)
    other = tmp_path / "other.pt"
    torch.save({"epoch": 3, "optimizer": {}}, other)
    with pytest.raises(HaschedError, match="holds no state dict"):
        read_state_file(other)


# --- eval_data ---------------------------------------------------------------------------


def test_eval_data_adapts_images_to_the_model(data_dir):
    ref = ModelRef.from_options(torchvision="resnet18", dataset="fashion-mnist")
    x, y, info = eval_data(ref, "4:12", data_dir)
    raw = load_dataset("fashion-mnist", "test", data_dir)
    assert x.shape == (8, 3, 32, 32) and torch.equal(y, raw.labels[4:12])
    expected = resize_bilinear(raw.images[4:12], 32).clamp(0, 1)
    assert all(torch.equal(x[:, c : c + 1], expected) for c in range(3))
    assert (info["dataset"], info["start"], info["stop"]) == ("fashion-mnist", 4, 12)
    assert info["input"] == {"from": [1, 28, 28], "to": [3, 32, 32], "steps": [
        "resize 28x28 -> 32x32 (bilinear, half-pixel)", "repeat channels 1 -> 3"]}


def test_eval_data_of_a_paper_model_is_its_dataset(data_dir):
    x, y, info = eval_data(ModelRef("mnist32-cnn"), 5, data_dir)
    ds = load_dataset("mnist32", "test", data_dir)
    assert torch.equal(x, ds.images[:5]) and torch.equal(y, ds.labels[:5])
    assert info["input"]["steps"] == [] and info["fingerprint"] == ds.fingerprint
    with pytest.raises(HaschedError, match="image range '40:50' is outside 0..32"):
        eval_data(ModelRef("mnist32-cnn"), "40:50", data_dir)
