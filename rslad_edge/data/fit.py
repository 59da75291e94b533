"""Whether data fit a model: its images the model's input shape, its class count the model's outputs.

Distill, export and verify each pair a dataset with a model and refuse a pair that does not fit before any work;
the rules live here so that they refuse the same things. The caller names the model, the data and the fix in its
own terms (the file, the flag at fault) and picks the error: data that do not fit the model are a DatasetError, a
flag that contradicts the data a ConfigError. Whether the model runs at all on such images (a forward) is
:func:`rslad_edge.models.registry.check_model_fits`.
"""

from __future__ import annotations

from collections.abc import Sequence

from rslad_edge.errors import DatasetError, RsladEdgeError


def shape_text(shape: Sequence[int | None]) -> str:
    """``3x32x32``, with ``?`` for a dimension left open."""
    return "x".join(str(d) if d else "?" for d in shape)


def check_image_shape(
    model_shape: Sequence[int | None], image_shape: Sequence[int], *, model: str, images: str, fix: str,
    error: type[RsladEdgeError] = DatasetError,
) -> None:
    """Refuse C x H x W images that ``model_shape`` (C, H, W) does not take. A dimension of 0 or None is open and
    takes any size: an ONNX input with a symbolic height and width, a model that pools globally."""
    if any(want and want != have for want, have in zip(model_shape, image_shape, strict=True)):
        raise error(f"{model} takes {shape_text(model_shape)} images but {images} are {shape_text(image_shape)}: "
                    f"{fix}")


def check_class_count(
    model_classes: int | None, data_classes: int, *, model: str, data: str, fix: str,
    error: type[RsladEdgeError] = DatasetError,
) -> None:
    """Refuse data with another class count than the model predicts: label ``i`` would be scored against a logit
    meant for another class, and every accuracy would be wrong without any error. A count the model does not
    state (0 or None) is not refused."""
    if model_classes and model_classes != data_classes:
        raise error(f"{model} predicts {model_classes} classes but {data} has {data_classes}: {fix}")
