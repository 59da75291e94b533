"""Architectures from torchvision, timm and your own factory; checkpoints that rebuild them; other-class teachers."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest
import torch
from torch import nn

from rslad_edge.errors import CheckpointError, ConfigError, UsageError
from rslad_edge.models import (
    Normalized,
    canonical_arch,
    check_model_fits,
    create_model,
    load_checkpoint,
    model_defaults,
    save_checkpoint,
)
from rslad_edge.models.external import IMAGENET_MEAN, IMAGENET_STD
from rslad_edge.models.teacher import ClassMapped, Resized, read_class_map

torch.set_num_threads(1)


def test_torchvision_model_is_wrapped_with_its_normalisation_and_takes_the_class_count():
    model = create_model("torchvision:mobilenet_v3_small", 5).eval()
    assert isinstance(model, Normalized)
    assert model.mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.net((x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
            1, 3, 1, 1))
        assert torch.allclose(model(x), expected)
    assert model(x).shape == (2, 5)


def test_unknown_torchvision_name_is_one_line_with_close_matches():
    with pytest.raises(UsageError, match=r"unknown torchvision model 'mobilenet_v3_smal'.*:mobilenet_v3_small"):
        canonical_arch("torchvision:mobilenet_v3_smal")


def test_timm_model_takes_its_pretrained_cfg():
    pytest.importorskip("timm", reason="the timm extra is not installed (pip install 'rslad-edge[timm]')")
    defaults = model_defaults("timm:mobilenetv3_small_050")
    assert defaults.input_size == (224, 224) and defaults.crop_pct == pytest.approx(0.875)
    model = create_model("timm:mobilenetv3_small_050", 3)
    check_model_fits(model, "timm:mobilenetv3_small_050", 3, (64, 64))
    with pytest.raises(UsageError, match="unknown timm model 'mobilenetv3_smal_050'"):
        canonical_arch("timm:mobilenetv3_smal_050")


def test_timm_spec_without_the_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'rslad-edge\[timm\]'"):
        create_model("timm:resnet18", 10)


def test_too_small_input_and_wrong_class_count_are_one_line_each():
    model = create_model("torchvision:resnet18", 4)
    with pytest.raises(UsageError, match=r"--input-size 8x8 is too small for torchvision:resnet18.*at least 32x32"):
        check_model_fits(model, "torchvision:resnet18", 4, (8, 8))
    check_model_fits(model, "torchvision:resnet18", 4, (32, 32))
    with pytest.raises(ConfigError, match=r"outputs \(1, 4\) for one image, not \(1, 7\)"):
        check_model_fits(model, "torchvision:resnet18", 7, (32, 32))


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny(num_classes=10, width=4):
            return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(width, num_classes))

        def headless():
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_models"
    sys.modules.pop("my_models", None)


def test_factory_checkpoint_is_rebuilt_only_when_the_caller_names_the_factory(tmp_path, factory_module):
    model = create_model("my_models:tiny", 3, {"width": 6})
    path = save_checkpoint(tmp_path / "m.pt", model, "my_models:tiny", num_classes=3, input_size=(40, 48),
                           arch_kwargs={"width": 6})
    with pytest.raises(CheckpointError, match="pass --arch my_models:tiny to allow it"):
        load_checkpoint(path)
    loaded, info = load_checkpoint(path, arch="my_models:tiny")
    assert info["arch_kwargs"] == {"width": 6} and info["input"]["size"] == [40, 48]
    x = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(ConfigError, match=r"outputs \(1, 1\) for one image, not \(1, 3\)"):
        check_model_fits(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LazyLinear(1)), "x", 3, (8, 8))
    with pytest.raises(UsageError, match="cannot import 'no_such_module'"):
        create_model("no_such_module:tiny", 3)


def test_torchvision_checkpoint_records_spec_size_and_normalisation_and_loads_with_no_flags(tmp_path):
    model = create_model("torchvision:mobilenet_v3_small", 5, {"width_mult": 0.5}).eval()
    path = save_checkpoint(tmp_path / "s.pt", model, "torchvision:mobilenet_v3_small", num_classes=5,
                           input_size=(96, 96), arch_kwargs={"width_mult": 0.5},
                           preprocess={"crop_pct": 0.875, "resize_shorter": 110})
    loaded, info = load_checkpoint(path)
    assert info["arch"] == "torchvision:mobilenet_v3_small" and info["num_classes"] == 5
    assert info["input"]["size"] == [96, 96] and info["input"]["mean"] == pytest.approx(IMAGENET_MEAN)
    assert info["input"]["preprocess"]["crop_pct"] == 0.875
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_torchvision_models_own_state_dict_loads_into_the_wrapper(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(num_classes=7).eval()
    torch.save({"model": net.state_dict()}, tmp_path / "bare.pt")  # what a user's own training script writes
    loaded, info = load_checkpoint(tmp_path / "bare.pt", arch="torchvision:resnet18")
    assert info["num_classes"] == 7 and "size" not in info["input"]  # a bare state dict: the data's size
    assert torch.equal(loaded.net.fc.weight, net.fc.weight)


def test_class_map_sums_probabilities_of_each_group_and_max_takes_the_largest_logit():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0]])
    teacher = nn.Identity()
    summed = ClassMapped(teacher, [[0, 1], [3], [2, 4]], "sum")(logits)
    probs = logits.softmax(1)
    expected = torch.stack([probs[:, [0, 1]].sum(1), probs[:, 3], probs[:, [2, 4]].sum(1)], 1)
    assert torch.allclose(summed.softmax(1), expected / expected.sum(1, keepdim=True))
    assert torch.equal(ClassMapped(teacher, [[0, 1], [3], [2, 4]], "max")(logits), torch.tensor([[1.0, 3.0, 2.0]]))


def test_class_map_file_is_checked_against_the_dataset_and_the_teacher(tmp_path):
    path = tmp_path / "map.yaml"
    path.write_text("cat: [3, 4]\ndog: 7\n")
    assert read_class_map(path, ["cat", "dog"], 10) == [[3, 4], [7]]
    with pytest.raises(ConfigError, match="does not map bird"):
        read_class_map(path, ["cat", "dog", "bird"], 10)
    with pytest.raises(ConfigError, match="maps to class 7, but the teacher has 5 classes"):
        read_class_map(path, ["cat", "dog"], 5)
    path.write_text("cat: [3]\ndog: [3]\n")
    with pytest.raises(ConfigError, match="teacher class 3 is mapped to both 'cat' and 'dog'"):
        read_class_map(path, ["cat", "dog"], 10)


def test_resized_teacher_sees_its_own_size_and_passes_gradients():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return x.mean(dim=(2, 3))

    x = torch.rand(2, 3, 96, 96, requires_grad=True)
    Resized(Probe(), (32, 32))(x).sum().backward()
    assert seen == [(32, 32)] and x.grad is not None and x.grad.abs().sum() > 0


def test_bn_momentum_is_set_on_every_batchnorm_or_a_slow_one_is_warned_about(caplog):
    from rslad_edge.distill.config import DistillConfig
    from rslad_edge.distill.trainer import _set_bn_momentum
    from rslad_edge.models import create_model

    def momenta(model):
        return {m.momentum for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}

    model = create_model("torchvision:mobilenet_v3_small", 5)
    assert momenta(model) == {0.01}  # torchvision's own, for 600-epoch ImageNet runs
    with caplog.at_level("WARNING", logger="rslad_edge"):
        _set_bn_momentum(model, DistillConfig(student="torchvision:mobilenet_v3_small"), steps=234)
    assert "keep 9.5% of their initial values" in caplog.text
    assert re.search(r"--bn-momentum 0\.1$", caplog.text, re.M)
    caplog.clear()
    with caplog.at_level("WARNING", logger="rslad_edge"):  # a run too short even for PyTorch's default 0.1
        _set_bn_momentum(create_model("mobilenetv2", 10), DistillConfig(), steps=40)
    assert "momentum is 0.1: after this run's 40 steps" in caplog.text and "keep 1.5%" in caplog.text
    assert re.search(r"--bn-momentum 0\.11$", caplog.text, re.M)  # 0.89 ** 40 < 1%: advice that changes something
    caplog.clear()
    with caplog.at_level("WARNING", logger="rslad_edge"):
        _set_bn_momentum(model, DistillConfig(student="torchvision:mobilenet_v3_small"), steps=100_000)
    assert not caplog.text  # a long run moves them: 0.99 ** 100,000 is nothing
    _set_bn_momentum(model, DistillConfig(student="torchvision:mobilenet_v3_small", bn_momentum=0.1), steps=234)
    assert momenta(model) == {0.1}
    with pytest.raises(ConfigError, match="--bn-momentum is a fraction"):
        DistillConfig(bn_momentum=1.5)


def test_a_bare_state_dict_teacher_takes_the_datas_own_size_and_a_checkpoint_its_own(tmp_path, caplog):
    from PIL import Image

    from rslad_edge.data.registry import own_size
    from rslad_edge.distill.config import DistillConfig
    from rslad_edge.distill.trainer import _teacher_size

    def folder(name, sizes):
        for split in ("train", "test"):
            for label in ("a", "b"):
                (tmp_path / name / split / label).mkdir(parents=True)
                for index, (height, width) in enumerate(sizes):
                    Image.new("RGB", (width, height)).save(tmp_path / name / split / label / f"{index}.png")
        return tmp_path / name

    uniform, mixed = folder("uniform", [(40, 48)] * 3), folder("mixed", [(40, 48), (64, 64)])
    assert own_size("imagefolder", uniform) == (40, 48) and own_size("imagefolder", mixed) is None
    assert own_size("cifar10") == (32, 32)

    def size(root, info, **options):
        cfg = DistillConfig(teacher="teacher.pt", teacher_arch="resnet18", dataset="imagefolder", data_root=str(root),
                            input_size=96, **options)
        return _teacher_size(cfg, info, (96, 96))

    bare, recorded = {"input": {"range": [0.0, 1.0]}}, {"input": {"size": [32, 32]}}
    with caplog.at_level("WARNING", logger="rslad_edge"):
        assert size(uniform, bare) == (40, 48)  # what a teacher of this data was trained at, not the student's 96
    assert "records no input size: it sees the student's 96x96 images resized to 40x48" in caplog.text
    assert size(mixed, bare) == (96, 96)  # no size of its own: the student's
    assert size(uniform, bare, teacher_input_size="64x80") == (64, 80)
    assert size(uniform, recorded) == (32, 32)
    with pytest.raises(ConfigError, match="records its input size, 32x32; --teacher-input-size is for a bare"):
        size(uniform, recorded, teacher_input_size=64)
    with pytest.raises(UsageError, match="--teacher-input-size takes H or HxW"):
        DistillConfig(teacher_input_size="big")
