from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
    """The shared folder beside the project (real data and the robust teacher); tests using it skip without it."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present (real data and teacher live there)")
    return SHARED


class _TinyExports(dict):
    """``student.pt`` and its exports, each made on first use (an export takes a few seconds)."""

    def __init__(self, folder: Path) -> None:
        from fitted_models import ridge_fitted_smallcnn

        from rslad_edge.models import save_checkpoint

        super().__init__()
        self.folder = folder
        self["pt"] = save_checkpoint(folder / "student.pt", ridge_fitted_smallcnn(), "smallcnn", num_classes=10,
                                     input_size=(32, 32), meta={"dataset": "shapes"})

    def __missing__(self, key: str) -> Path:
        from rslad_edge.export import ExportConfig, export

        precision, target = {"fp32": ("fp32", "cpu"), "fp16": ("fp16", "cpu"), "int8": ("int8", "cpu"),
                             "int8-trt": ("int8", "trt")}[key]
        # Random features separate the classes by small margins: int8 and fp16 flip a few (see test_export).
        cfg = ExportConfig(checkpoint=self["pt"], out=self.folder / key, precision=precision, target=target,
                           parity_n=32, calib_n=128, min_agreement=None if precision == "fp32" else 0.8)
        self[key] = export(cfg).onnx_path
        return self[key]


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory) -> dict[str, Path]:
    """``student.pt`` (a ridge-fitted smallcnn, ~40 % clean on shapes, trained on nothing) and its exports made with
    the project's own ``export()``: ``fp32``, ``fp16``, ``int8`` (--target cpu: uint8 activations) and ``int8-trt``
    (--target trt: symmetric int8), each exported on first use and shared by the twin and verify tests."""
    return _TinyExports(tmp_path_factory.mktemp("tiny-exports"))
