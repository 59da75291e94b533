import pytest
import torch

from rslad_edge.errors import CheckpointError, ConfigError
from rslad_edge.models import count_parameters, create_model, load_checkpoint, model_names, save_checkpoint

PAPER_PARAMETER_COUNTS = {"resnet18": 11_173_962, "mobilenetv2": 2_296_922, "wrn-34-10": 46_160_474}


@pytest.mark.parametrize("name,count", PAPER_PARAMETER_COUNTS.items())
def test_parameter_counts_match_the_paper_models(name, count):
    assert count_parameters(name, 10) == count


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "resnet50", "smallcnn"])
def test_forward_gives_one_logit_row_per_image(name):
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def test_wide_resnets_build_and_run_on_the_meta_device():
    # Full-size WRNs are too slow for a unit test on CPU; shapes are checked without allocating memory.
    with torch.device("meta"):
        for name, classes in [("wrn-34-10", 10), ("wrn-70-16", 100)]:
            assert create_model(name, classes)(torch.empty(2, 3, 32, 32)).shape == (2, classes)


def test_wrn_70_16_normalises_inside_with_cifar100_statistics():
    from rslad_edge.models.wideresnet import CIFAR100_MEAN, DMWideResNet

    model = DMWideResNet(depth=10, width=1, num_classes=100)  # same code path, tiny
    assert "mean" not in model.state_dict()  # RobustBench checkpoints do not carry it
    assert torch.allclose(model.mean.flatten(), torch.tensor(CIFAR100_MEAN))


def test_wrn_34_10_keeps_trades_keys_including_unused_sub_block1():
    with torch.device("meta"):
        keys = set(create_model("wrn-34-10").state_dict())
    assert {"conv1.weight", "fc.weight", "bn1.running_mean"} <= keys
    assert any(k.startswith("sub_block1.layer.0.conv1") for k in keys)
    assert "block2.layer.0.convShortcut.weight" in keys


def test_unknown_architecture_lists_the_known_names():
    with pytest.raises(ConfigError, match="mobilenetv2") as info:
        create_model("mobilenet_v2x")
    assert "resnet18" in str(info.value)


@pytest.mark.parametrize("name", model_names())
def test_parameter_count_is_what_forward_uses_for_every_registered_model(name):
    """The count is of the parameters that get a gradient: one the forward never uses (a layout kept for community
    checkpoints) must be declared unused, or the model's size would be overstated."""
    with torch.device("meta"):  # full-size WRNs in no memory and well under a second
        model = create_model(name)
        model(torch.empty(2, 3, 32, 32)).sum().backward()
    used = sum(p.numel() for p in model.parameters() if p.grad is not None)
    assert used > 0 and count_parameters(name) == used


def test_checkpoint_round_trip_keeps_weights_and_metadata(tmp_path):
    model = create_model("smallcnn", 10)
    meta = {"method": "rslad", "eps": 8 / 255}
    path = save_checkpoint(tmp_path / "m.pt", model, "smallcnn", num_classes=10, input_size=(32, 32), meta=meta)
    loaded, info = load_checkpoint(path)
    assert info["arch"] == "smallcnn" and info["meta"]["method"] == "rslad"
    x = torch.rand(3, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), loaded(x))
    assert not loaded.training


def test_bare_state_dict_with_module_prefix_loads_given_arch(tmp_path):
    model = create_model("smallcnn", 5)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "bare.pth")
    loaded, info = load_checkpoint(tmp_path / "bare.pth", arch="smallcnn")
    assert info["num_classes"] == 5  # read off the classifier
    assert torch.equal(loaded.state_dict()["linear.weight"], model.state_dict()["linear.weight"])


def test_bare_state_dict_without_arch_asks_for_it_and_guesses(tmp_path):
    torch.save(create_model("smallcnn").state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="--arch.*smallcnn"):
        load_checkpoint(tmp_path / "bare.pt")


def test_wrong_architecture_names_keys_and_suggests_the_right_arch(tmp_path):
    torch.save(create_model("smallcnn").state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "bare.pt", arch="resnet18")
    message = str(info.value)
    assert "missing keys [bn1.bias" in message
    assert "unexpected keys [features.0.weight" in message
    assert "--arch smallcnn" in message


def test_rslad_checkpoint_refuses_a_conflicting_arch(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", create_model("smallcnn"), "smallcnn", num_classes=10, input_size=(32, 32))
    with pytest.raises(CheckpointError, match="smallcnn checkpoint but --arch resnet18"):
        load_checkpoint(path, arch="resnet18")


@pytest.mark.parametrize(
    "content", [b"", b"not a checkpoint at all", b"hello world", b'{"a": 1}', b"PK\x03\x04garbage"]
)
def test_corrupt_file_is_a_clear_checkpoint_error(tmp_path, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_checkpoint(path, arch="smallcnn")


def test_pickled_code_is_refused_not_executed(tmp_path):
    import pickle

    path = tmp_path / "evil.pt"
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        load_checkpoint(path, arch="smallcnn")
    assert not marker.exists()


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.pt' does not exist"):
        load_checkpoint(tmp_path / "nothere.pt", arch="resnet18")


def test_shared_robust_teacher_loads_as_bare_resnet18(shared_dir):
    model, info = load_checkpoint(shared_dir / "models" / "resnet18-cifar10-fastat.pt", arch="resnet18")
    assert info["num_classes"] == 10 and info["format"] == "state_dict"


def test_atomic_write_gives_ordinary_file_permissions(tmp_path):
    import os
    import stat

    from rslad_edge.io import write_json

    path = write_json(tmp_path / "a.json", {"x": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
