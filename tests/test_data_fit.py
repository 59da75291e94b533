"""rslad_edge.data.fit: whether data fit a model (image shape, class count), and the stages that refuse with it."""

from __future__ import annotations

import pytest

from rslad_edge.data import check_class_count, check_image_shape
from rslad_edge.distill.config import DistillConfig
from rslad_edge.distill.trainer import train
from rslad_edge.errors import ConfigError, DatasetError
from rslad_edge.export import ExportConfig, export
from rslad_edge.models import create_model, save_checkpoint


def test_open_dimensions_take_any_size_and_a_known_one_must_match():
    check_image_shape((3, 0, 0), (3, 64, 48), model="m.onnx", images="the images", fix="-")
    check_image_shape((3, None, 32), (3, 17, 32), model="m.onnx", images="the images", fix="-")
    with pytest.raises(DatasetError, match=r"^m.onnx takes 3x\?x32 images but the images are 3x32x16: resize$"):
        check_image_shape((3, 0, 32), (3, 32, 16), model="m.onnx", images="the images", fix="resize")
    with pytest.raises(ConfigError, match="takes 1x32x32 images"):
        check_image_shape((1, 32, 32), (3, 32, 32), model="m", images="x", fix="-", error=ConfigError)


def test_a_class_count_must_match_unless_the_model_does_not_state_one():
    check_class_count(10, 10, model="m.pt", data="--dataset shapes", fix="-")
    check_class_count(None, 10, model="m.pt", data="--dataset shapes", fix="-")
    with pytest.raises(DatasetError, match=r"^m.pt predicts 5 classes but --dataset shapes has 10: retrain$"):
        check_class_count(5, 10, model="m.pt", data="--dataset shapes", fix="retrain")


def test_export_refuses_a_dataset_of_another_class_count_naming_the_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path / "five.pt", create_model("smallcnn", 5), "smallcnn", num_classes=5,
                           input_size=(32, 32))
    with pytest.raises(DatasetError, match="five.pt predicts 5 classes but --dataset shapes has 10"):
        export(ExportConfig(checkpoint=path, out=tmp_path / "out", dataset="shapes", parity_n=8))
    assert not (tmp_path / "out").exists()


def test_distill_refuses_num_classes_other_than_the_datasets(tmp_path):
    config = DistillConfig(out=str(tmp_path / "run"), student="smallcnn", dataset="shapes", method="sat",
                           num_classes=5, epochs=1, batch_size=16, train_subset=64, val_n=16, device="cpu",
                           preset="smoke")
    with pytest.raises(ConfigError, match=r"--num-classes 5\) predicts 5 classes but --dataset shapes has 10"):
        train(config)
