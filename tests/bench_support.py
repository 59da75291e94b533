"""Helpers shared by the bench tests (no tests here): a tiny ONNX model, a tiny checkpoint, fake runners, and
stand-ins for the Jetson tools (trtexec, tegrastats, nvpmodel, jetson_clocks) as POSIX sh scripts.

Imported as ``from bench_support import ...`` (pytest puts tests/ on sys.path: tests/ is not a package).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures" / "bench"
SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "samples"


def tiny_onnx(path: Path, *, seed: int = 0, batch: int | str = "batch") -> Path:
    """Conv-ReLU-GAP-Gemm on float32 NCHW 3x32x32, input "input", output "logits", dynamic batch unless ``batch``
    is an int (< 2 KB)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.1).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.standard_normal((8, 10)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every ONNX Runtime the project supports
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_checkpoint(path: Path) -> Path:
    """A smallcnn checkpoint in the rslad-edge format."""
    from rslad_edge.models import create_model, save_checkpoint

    return save_checkpoint(path, create_model("smallcnn"), "smallcnn", num_classes=10, input_size=(32, 32))


def write_verify_json(path: Path, artifact: Path, sha256: str, clean: float, robust: dict[str, float],
                      worst: float | None = None) -> Path:
    """A verify result in the schema verify writes."""
    record = {"artifact": str(artifact), "sha256": sha256, "clean_acc": clean, "robust_acc": robust}
    if worst is not None:
        record["worst_case_acc"] = worst
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


class FakeRunner:
    """A Runner whose predict records what it was given; logits are zeros of the right shape."""

    def __init__(self, path: Path, *, backend: str = "onnxruntime", provider: str = "CPUExecutionProvider",
                 precision: str = "fp32", threads: int | None = None, fail_at: int | None = None) -> None:
        self.path = str(path)
        self.backend, self.provider, self.precision = backend, provider, precision
        self.input_shape = (3, 32, 32)
        self.num_classes = 10
        self.threads = threads
        self.fail_at = fail_at
        self.seen: list[np.ndarray] = []

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.fail_at is not None and len(x) >= self.fail_at:
            raise RuntimeError(f"[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions: {len(x)}")
        self.seen.append(x)
        return np.zeros((len(x), self.num_classes), dtype=np.float32)


STANDIN_TRTEXEC = r"""#!/bin/sh
# Stand-in for NVIDIA trtexec (tests only). Build: --onnx ... --saveEngine=E writes E holding the shape it was
# built for. Time: --loadEngine=E --shapes=S checks S against E, sleeps --duration seconds, prints a TensorRT 10
# log and writes --exportTimes. Latency per query = 0.2 + 0.01 * batch ms. Unknown flags fail like trtexec does.
onnx= save= load= shapes= times= min= opt= max= duration=3 iterations=10 sep= pct=
for arg in "$@"; do
  case "$arg" in
    --onnx=*) onnx=${arg#*=} ;;
    --saveEngine=*) save=${arg#*=} ;;
    --minShapes=*) min=${arg#*=} ;;
    --optShapes=*) opt=${arg#*=} ;;
    --maxShapes=*) max=${arg#*=} ;;
    --loadEngine=*) load=${arg#*=} ;;
    --shapes=*) shapes=${arg#*=} ;;
    --exportTimes=*) times=${arg#*=} ;;
    --duration=*) duration=${arg#*=} ;;
    --iterations=*) iterations=${arg#*=} ;;
    --percentile=*) pct=${arg#*=} ;;
    --separateProfileRun) sep=1 ;;
    --warmUp=*|--timingCacheFile=*|--skipInference|--useSpinWait|--fp16|--int8|--stronglyTyped|--noTF32) ;;
    *) echo "[03/02/2026-10:15:01] [E] Unknown option: $arg"
       echo "&&&& FAILED TensorRT.trtexec [TensorRT v100300] [b17] # trtexec $*"; exit 1 ;;
  esac
done
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] [b17] # trtexec $*"
echo "[03/02/2026-10:15:01] [I] TensorRT version: 10.3.0"
echo "[03/02/2026-10:15:01] [I] Selected Device: Orin"
if [ -n "$onnx" ]; then
  if [ ! -f "$onnx" ] || [ -z "$save" ] || [ "$min" != "$opt" ] || [ "$opt" != "$max" ]; then
    echo "[03/02/2026-10:15:01] [E] Engine set up failed"; echo "&&&& FAILED TensorRT.trtexec"; exit 1
  fi
  echo "$min" > "$save"
  echo "&&&& PASSED TensorRT.trtexec [TensorRT v100300] [b17] # trtexec $*"; exit 0
fi
if [ ! -f "$load" ] || [ "$(cat "$load")" != "$shapes" ] || [ "$sep" != 1 ] || [ "$pct" != "50,90,99" ]; then
  echo "[03/02/2026-10:15:01] [E] bad engine, shapes or reporting flags"; echo "&&&& FAILED TensorRT.trtexec"; exit 1
fi
batch=${shapes#*:}; batch=${batch%%x*}
sleep "$duration"
queries=20
awk -v b="$batch" -v n="$queries" -v d="$duration" -v times="$times" 'BEGIN {
  base = 0.2 + 0.01 * b
  printf "[03/02/2026-10:15:06] [I] Timing trace has %d queries over %g s\n", n, d
  print "[03/02/2026-10:15:06] [I] === Performance summary ==="
  printf "[03/02/2026-10:15:06] [I] Throughput: %g qps\n", n / d
  fmt = "[03/02/2026-10:15:06] [I] Latency: min = %g ms, max = %g ms, mean = %g ms, median = %g ms, "
  fmt = fmt "percentile(50%%) = %g ms, percentile(90%%) = %g ms, percentile(99%%) = %g ms\n"
  printf fmt, base, base + 0.004, base + 0.002, base + 0.002, base + 0.002, base + 0.004, base + 0.004
  record = "%s{ \"startEnqMs\" : %g, \"h2dMs\" : 0.01, \"computeMs\" : %g, \"d2hMs\" : 0.01, "
  record = record "\"latencyMs\" : %g }\n"
  printf "[" > times
  for (i = 0; i < n; i++) {
    lat = base + (i % 5) * 0.001
    printf record, (i ? ", " : "\n  "), 1000 + i, lat - 0.02, lat > times
  }
  print "]" > times
}'
echo "&&&& PASSED TensorRT.trtexec [TensorRT v100300] [b17] # trtexec $*"
"""

STANDIN_TEGRASTATS = r"""#!/bin/sh
# Stand-in for NVIDIA tegrastats (tests only): Orin Nano JetPack 6 line format, a steady 5 W on VDD_IN.
interval=1000 logfile=
while [ $# -gt 0 ]; do
  case "$1" in --interval) interval=$2; shift 2 ;; --logfile) logfile=$2; shift 2 ;; *) shift ;; esac
done
pause=$(awk -v ms="$interval" 'BEGIN { printf "%.3f", ms / 1000 }')
trap 'exit 0' TERM INT
while :; do
  head="$(date '+%m-%d-%Y %H:%M:%S') RAM 2990/7620MB (lfb 41x4MB) SWAP 0/3810MB (cached 0MB) CPU [38%@1510,12%@1510]"
  middle="EMC_FREQ 21%@2133 GR3D_FREQ 93%@[1020] cpu@47.75C gpu@48.125C tj@48.125C"
  line="$head $middle VDD_IN 5000mW/5000mW VDD_CPU_GPU_CV 2000mW/2000mW VDD_SOC 1500mW/1500mW"
  if [ -n "$logfile" ]; then echo "$line" >> "$logfile"; else echo "$line"; fi
  sleep "$pause"
done
"""

STANDIN_NVPMODEL = "#!/bin/sh\n# Stand-in for nvpmodel -q (tests only).\necho 'NV Power Mode: MAXN'\necho 0\n"


def write_tool(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tool = directory / name
    tool.write_text(text)
    tool.chmod(0o755)
    return tool


def write_standins(directory: Path) -> Path:
    """Stand-in trtexec, tegrastats, nvpmodel and jetson_clocks (locked clocks) in ``directory``; returns it."""
    write_tool(directory, "trtexec", STANDIN_TRTEXEC)
    write_tool(directory, "tegrastats", STANDIN_TEGRASTATS)
    write_tool(directory, "nvpmodel", STANDIN_NVPMODEL)
    write_tool(directory, "jetson_clocks", f"#!/bin/sh\ncat {FIXTURES / 'jetson_clocks_show_locked_orin_nx.txt'}\n")
    return directory
