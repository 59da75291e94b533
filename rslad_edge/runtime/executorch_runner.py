"""The ExecuTorch backend: a ``.pte`` program run by ExecuTorch's own runtime (the one phones link), on the CPU.

ExecuTorch comes with the optional ``mobile`` extra and is imported only here, inside the functions that need it,
so the package and its tests import without it; without it, opening a ``.pte`` is one line naming the extra.

What ran is read from the program, not assumed: the ``.pte`` lists, per method, the delegate blobs (the backend
each was lowered to) and the instructions, either a call into a delegate or a portable kernel running one op
outside any delegate. The runner's ``provider`` says which backend ran and how much of the graph it took, e.g.
``XNNPACK (68 of 68 nodes delegated)``: the node counts come from the export (the sidecar), and are used only
when the program agrees with them (same delegate calls, same ops outside); otherwise the program's own counts
are reported.

XNNPACK runs on ExecuTorch's thread pool, one per process; ``threads`` sizes it, which is only safe while no program
is loaded (XNNPACK binds a program to the pool when it loads), so a conflicting request is an error, not a crash.

A ``.pte`` is exported for one batch size (torch.export specialises it; rslad-edge records it in the sidecar).
``predict`` serves any batch by splitting it into calls of that size and padding the last one with zero images,
and the runner says so (``static_batch``), like a static-batch ONNX model.

White-box attacks go through ``twin()``: the ONNX of the program's graph that export writes beside the ``.pte``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rslad_edge.errors import ConfigError, ExportError, RuntimeUnavailableError
from rslad_edge.runtime.inputs import batch_slices, check_input, pad_batch
from rslad_edge.runtime.metadata import read_sidecar

logger = logging.getLogger(__name__)

_LOADED: weakref.WeakSet[ExecuTorchRunner] = weakref.WeakSet()  # runners whose program is loaded (see _set_threads)
MOBILE_EXTRA = "pip install 'rslad-edge[mobile]'"
METHOD = "forward"
BACKEND_NAMES = {"XnnpackBackend": "XNNPACK"}  # ExecuTorch's backend id -> what people call it
FLOAT32 = 6  # ExecuTorch's ScalarType::Float, as MethodMeta's TensorInfo.dtype() reports it


def executorch_missing() -> str | None:
    """Why ExecuTorch cannot be used here (one line naming the extra), or None when it is installed."""
    import importlib.util

    try:
        found = importlib.util.find_spec("executorch") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return f"ExecuTorch is not installed: {MOBILE_EXTRA}"
    return None


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Importing ExecuTorch imports torchao, which warns on import (an ExperimentalWarning for the runtime's Python
    API, and through torch's own logger a deprecation of ``register_constant`` on enums): noise for our users, not
    something they can act on."""
    pytree_logger = logging.getLogger("torch.utils._pytree")
    level = pytree_logger.level
    pytree_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pytree_logger.setLevel(level)


def import_executorch_runtime() -> Any:
    """``executorch.runtime``, or a RuntimeUnavailableError naming the extra that provides it."""
    missing = executorch_missing()
    if missing is not None:
        raise RuntimeUnavailableError(missing)
    try:
        with quiet_imports():
            import executorch.runtime as et_runtime
    except ImportError as exc:  # a broken install, or one built for another torch (its bindings link libtorch)
        raise RuntimeUnavailableError(
            f"ExecuTorch is installed but its runtime does not import ({str(exc).splitlines()[0][:200]}): "
            f"reinstall the pinned combination with {MOBILE_EXTRA}"
        ) from exc
    return et_runtime


@contextlib.contextmanager
def native_stderr(lines: list[str]) -> Iterator[None]:
    """Collect what ExecuTorch's runtime logs during the block into ``lines``.

    The runtime logs from C++ on every first load (cpuinfo probing) and, when a program does not load, the one
    useful line ("Program identifier 'PK\x03\x04' != expected 'ET12'"). Its Python bindings send the log to
    ``sys.stderr``; anything native that writes to file descriptor 2 directly is collected too. The first kind is
    kept out of the CLI's output (logged at debug level), the second goes into the error message.
    """
    python_side = io.StringIO()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink, contextlib.redirect_stderr(python_side):
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = python_side.getvalue() + sink.read().decode(errors="replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())


def _log_native(lines: list[str], path: str) -> None:
    for line in lines:
        logger.debug("executorch (%s): %s", Path(path).name, line)


@dataclass(frozen=True)
class Delegation:
    """What the program says runs where: per backend, the calls into it, and the ops run outside any delegate."""

    delegate_calls: dict[str, int]  # ExecuTorch backend id -> calls in the method's instruction chain
    outside_ops: dict[str, int] = field(default_factory=dict)  # op name -> portable kernel calls

    @property
    def backend(self) -> str:
        """``XNNPACK``, ``XNNPACK + QnnBackend`` or ``portable kernels`` (nothing delegated)."""
        names = [BACKEND_NAMES.get(b, b) for b in self.delegate_calls]
        return " + ".join(names) if names else "portable kernels"

    def to_dict(self) -> dict[str, Any]:
        return {"delegate_calls": dict(self.delegate_calls), "outside_ops": dict(self.outside_ops)}


def read_delegation(program_bytes: bytes, method: str = METHOD) -> Delegation:
    """Decode the program's flatbuffer (no weights are copied) and count its delegate and kernel calls."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(program_bytes).program
    plan = next((p for p in program.execution_plan if p.name == method), None)
    if plan is None:
        raise ValueError(f"no method '{method}'")
    delegate_calls: Counter[str] = Counter()
    outside_ops: Counter[str] = Counter()
    for chain in plan.chains:
        for instruction in chain.instructions:
            kind = type(instruction.instr_args).__name__
            if kind == "DelegateCall":
                delegate_calls[plan.delegates[instruction.instr_args.delegate_index].id] += 1
            elif kind == "KernelCall":
                operator = plan.operators[instruction.instr_args.op_index]
                name = operator.name + (f".{operator.overload}" if operator.overload else "")
                outside_ops[name] += 1
    return Delegation(dict(delegate_calls), dict(sorted(outside_ops.items())))


def provider_label(delegation: Delegation, metadata: dict[str, Any]) -> str:
    """``XNNPACK (61 of 61 nodes delegated)``, from the export's node counts when the program agrees with them,
    else from the program alone: ``XNNPACK (1 delegate call, 0 ops outside)``."""
    outside = sum(delegation.outside_ops.values())
    calls = sum(delegation.delegate_calls.values())
    exported = metadata.get("delegation") or {}
    agrees = (exported.get("program") == delegation.to_dict()
              and isinstance(exported.get("delegated_nodes"), int) and isinstance(exported.get("graph_nodes"), int))
    if agrees:
        return f"{delegation.backend} ({exported['delegated_nodes']} of {exported['graph_nodes']} nodes delegated)"
    if not calls:
        return f"portable kernels ({outside} ops, nothing delegated)"
    plural = "s" if calls != 1 else ""
    return f"{delegation.backend} ({calls} delegate call{plural}, {outside} ops outside)"


class ExecuTorchRunner:
    """Runs a ``.pte`` with ``executorch.runtime`` on the CPU; splits and pads batches to the exported batch."""

    backend = "executorch"

    def __init__(self, path: str | Path, *, threads: int | None = None, batch_size: int | None = None) -> None:
        del batch_size  # a .pte takes exactly the batch it was exported for
        self.path = str(path)
        if not Path(self.path).is_file():
            raise ExportError(f"ExecuTorch program '{self.path}' does not exist")
        et_runtime = import_executorch_runtime()
        native: list[str] = []
        try:
            with native_stderr(native):  # the pool's first use probes the CPU (cpuinfo), loudly
                self.threads = _set_threads(threads)  # before any method loads: XNNPACK binds the pool at load time
                runtime = et_runtime.Runtime.get()
                program = runtime.load_program(Path(self.path))
                if METHOD not in program.method_names:
                    raise ExportError(f"'{self.path}' has methods {sorted(program.method_names)}, no '{METHOD}': "
                                      "it is not an exported model")
                method_meta = program.metadata(METHOD)
                self._method = program.load_method(METHOD)
        except RuntimeError as exc:
            said = native[-1] if native else str(exc).splitlines()[0]
            raise ExportError(f"'{self.path}' is not an ExecuTorch program this runtime can load ({said[:200]})"
                              ) from exc
        finally:
            _log_native(native, self.path)
        self._program = program  # the method borrows from it
        self.metadata = read_sidecar(self.path)
        self.static_batch, self.input_shape, self.num_classes = _check_contract(method_meta, self.path, self.metadata)
        self.batch_size = self.static_batch
        self.precision = str(self.metadata.get("precision", "unknown"))
        try:
            self.delegation = read_delegation(Path(self.path).read_bytes())
        except Exception as exc:  # the runtime loaded it, so this is a decoding gap: say so rather than guess
            raise ExportError(f"'{self.path}' loads but its program cannot be decoded ({exc})") from exc
        self.provider = provider_label(self.delegation, self.metadata)
        _LOADED.add(self)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, C, H, W) in [0, 1] -> float32 logits (N, num_classes), in calls of the exported batch."""
        import torch

        x = check_input(x, self.input_shape, self.path)
        logits = np.empty((len(x), self.num_classes), dtype=np.float32)
        for part in batch_slices(len(x), self.static_batch):
            batch = torch.from_numpy(pad_batch(x[part], self.static_batch))
            out = self._method.execute([batch])[0]
            logits[part] = out.numpy()[: part.stop - part.start]
        return logits

    def twin(self) -> Any:
        """The differentiable twin (:mod:`rslad_edge.runtime.twin`) of what the program computes. A ``.pte`` holds
        its int8 scales inside the XNNPACK delegate, so export writes that graph beside it as an ONNX (fp32: the
        model; int8: the converted PT2E graph as Q/DQ, its own int8 weights and scales), named with its sha256 in
        the sidecar (``twin_onnx``); verify's agreement check then compares the twin with the program."""
        from rslad_edge.runtime.twin import built_from_onnx_twin

        return built_from_onnx_twin(self.path, self.metadata, key="twin_onnx")

    def __repr__(self) -> str:
        return f"ExecuTorchRunner({self.path!r}, {self.precision}, {self.provider})"


def _check_contract(method_meta: Any, path: str, metadata: dict[str, Any]) -> tuple[int, tuple[int, int, int], int]:
    """(static batch, (C, H, W), classes) of ``forward``, or an ExportError when it is not the input contract
    (one float32 NCHW image batch in, one float32 (batch, classes) logits tensor out)."""
    if method_meta.num_inputs() != 1 or method_meta.num_outputs() != 1:
        raise ExportError(f"'{path}' takes {method_meta.num_inputs()} inputs and returns {method_meta.num_outputs()} "
                          "outputs; rslad-edge models take one NCHW image batch and return one logits tensor")
    model_input, model_output = method_meta.input_tensor_meta(0), method_meta.output_tensor_meta(0)
    in_shape, out_shape = tuple(model_input.sizes()), tuple(model_output.sizes())
    if len(in_shape) != 4 or model_input.dtype() != FLOAT32 or in_shape[1] not in (1, 3):
        raise ExportError(f"'{path}' takes a tensor of shape {in_shape} (dtype code {model_input.dtype()}), not "
                          "float32 NCHW images: it is not an rslad-edge model")
    if len(out_shape) != 2 or out_shape[0] != in_shape[0] or model_output.dtype() != FLOAT32:
        raise ExportError(f"'{path}' returns shape {out_shape} for an input of {in_shape}; expected float32 "
                          "logits (batch, classes)")
    batch, channels, height, width = in_shape
    size = metadata.get("input_size")
    if size and [height, width] != list(size):
        raise ExportError(f"'{path}' takes {height}x{width} images but its sidecar says {size[0]}x{size[1]}: the "
                          "sidecar belongs to another export")
    if metadata.get("batch") not in (None, batch):
        raise ExportError(f"'{path}' takes batches of {batch} but its sidecar says {metadata['batch']}: the sidecar "
                          "belongs to another export")
    return int(batch), (int(channels), int(height), int(width)), int(out_shape[1])


def _set_threads(threads: int | None) -> int:
    """Size ExecuTorch's process-wide thread pool, which XNNPACK runs on, and return its size (call it inside
    :func:`native_stderr`: the pool logs when it starts and when it is resized).

    XNNPACK binds a program to the pool when the program is loaded, and resizing the pool replaces it, so a resize
    while any program is loaded would leave that program pointing at a pool that is gone (a crash on its next call,
    hence ExecuTorch's name ``_unsafe_reset_threadpool``). It is refused instead, with what to do.
    """
    from executorch.extension.pybindings import portable_lib

    current = int(portable_lib._threadpool_get_thread_count())
    if threads is None or threads == current:
        return current
    if len(_LOADED):
        raise ConfigError(
            f"--threads {threads}: ExecuTorch's thread pool is shared by the whole process and has {current} threads "
            f"while {len(_LOADED)} .pte program(s) are loaded; it can only be resized when none is (open every .pte "
            "with the same --threads)"
        )
    portable_lib._unsafe_reset_threadpool(threads)  # logs "Resetting threadpool to N threads."
    return int(portable_lib._threadpool_get_thread_count())
