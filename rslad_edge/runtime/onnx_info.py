"""What an ONNX file says about itself, read without running it: input name and image shape, static batch, class
count, precision and the metadata export wrote. The ONNX Runner and bench's remote build both read a file this way.
An ORT-format file (``.ort``) is a flatbuffer that only ONNX Runtime reads, so it is described from a session.

A file not written by rslad-edge has no metadata; its precision is then read from the graph (Q/DQ nodes: int8;
float16 weights: fp16) and a symbolic dimension stays 0 ("any").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rslad_edge.errors import ExportError
from rslad_edge.runtime.metadata import decode_props, read_sidecar


@dataclass(frozen=True)
class OnnxInfo:
    """One ONNX model's input, output and description."""

    path: Path
    input_name: str
    output_name: str
    input_shape: tuple[int, int, int]  # (C, H, W); 0 where the graph is symbolic and the metadata does not say
    static_batch: int | None  # the batch a static-batch export was fixed to; None: dynamic
    num_classes: int | None  # the output's width, or the metadata's; None: symbolic (ask the model)
    precision: str  # fp32 | fp16 | int8: the metadata's, else read from the graph
    metadata: dict[str, Any] = field(default_factory=dict)  # sidecar JSON, then metadata_props (which win)


def inspect_onnx(path: str | Path) -> OnnxInfo:
    """Read ``path``'s graph (without external weights) and its sidecar; ExportError naming the file when it is not
    a readable ONNX model taking one float32 NCHW image batch."""
    import onnx

    graph_proto = _load_model(Path(path))
    metadata = {**read_sidecar(path), **decode_props({p.key: p.value for p in graph_proto.metadata_props})}
    graph = graph_proto.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]  # old IRs list the weights as inputs too
    if len(inputs) != 1 or not graph.output:
        raise ExportError(f"'{path}' has {len(inputs)} inputs and {len(graph.output)} outputs; rslad-edge models take "
                          "one NCHW image batch and return one logits tensor")
    model_input, model_output = inputs[0], graph.output[0]
    element = onnx.TensorProto.DataType.Name(model_input.type.tensor_type.elem_type).lower()
    return _contract_info(path, model_input.name, model_output.name, element, _dims(model_input), _dims(model_output),
                          metadata, graph_precision=lambda: _graph_precision(graph))


def inspect_ort_session(session: Any, path: str | Path) -> OnnxInfo:
    """The same description for an ORT-format model (``.ort``, ONNX Runtime's mobile format: a flatbuffer, not an
    ONNX protobuf), read from a session that loaded it: its inputs and outputs, the metadata_props it kept from the
    ONNX (``custom_metadata_map``) and its sidecar."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or not outputs:
        raise ExportError(f"'{path}' has {len(inputs)} inputs and {len(outputs)} outputs; rslad-edge models take "
                          "one NCHW image batch and return one logits tensor")
    metadata = {**read_sidecar(path), **decode_props(session.get_modelmeta().custom_metadata_map)}
    element = str(inputs[0].type).removeprefix("tensor(").removesuffix(")")  # "tensor(float)" -> "float"

    def dims(shape: list[Any]) -> list[int]:
        return [d if isinstance(d, int) and d > 0 else 0 for d in shape]  # a symbolic dimension is a string or None

    return _contract_info(path, inputs[0].name, outputs[0].name, element, dims(inputs[0].shape),
                          dims(outputs[0].shape), metadata, graph_precision=lambda: "unknown")


def _contract_info(
    path: str | Path, input_name: str, output_name: str, element: str, dims: list[int], output_dims: list[int],
    metadata: dict[str, Any], graph_precision: Callable[[], str],
) -> OnnxInfo:
    """An :class:`OnnxInfo` for a model taking one float32 NCHW batch, or an ExportError saying what it takes."""
    if element != "float":
        raise ExportError(f"'{path}' takes {element}, not float32: it is not an rslad-edge model")
    if len(dims) != 4:
        raise ExportError(f"'{path}' takes a {len(dims)}-d input, not NCHW images")
    batch, channels, height, width = dims
    size = metadata.get("input_size")  # (H, W) rslad-edge exported it for, if it did
    if size and not (height and width):  # a symbolic spatial size: hold it to the size it was exported for
        channels, height, width = channels or 3, height or int(size[0]), width or int(size[1])
    classes = output_dims[-1] if output_dims else 0
    if not classes and "num_classes" in metadata:
        classes = int(metadata["num_classes"])
    return OnnxInfo(
        path=Path(path), input_name=input_name, output_name=output_name,
        input_shape=(channels, height, width), static_batch=batch or None, num_classes=classes or None,
        precision=str(metadata.get("precision") or graph_precision()), metadata=metadata,
    )


def _load_model(path: Path) -> Any:
    """The ONNX proto without external weights (only metadata, shapes and node types are read from it)."""
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise ExportError(f"ONNX model '{path}' does not exist")
    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as exc:
        raise ExportError(f"'{path}' is not a readable ONNX model ({str(exc).splitlines()[0][:160]})") from exc


def _dims(value_info: Any) -> list[int]:
    """The static size of each dimension, 0 for a symbolic one."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 0
            for d in value_info.type.tensor_type.shape.dim]


def _graph_precision(graph: Any) -> str:
    """For ONNX files not written by rslad-edge: int8 if the graph has Q/DQ nodes, fp16 if it has fp16 weights."""
    import onnx

    if any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in graph.node):
        return "int8"
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer):
        return "fp16"
    return "fp32"
