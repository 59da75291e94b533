"""``bench(runner)`` and ``bench_artifacts``: what is timed, what a row carries, accuracy lookup, device checks."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from bench_support import FIXTURES, FakeRunner, write_standins, write_verify_json

from rslad_edge.bench import BenchReport, bench, bench_artifacts
from rslad_edge.bench.accuracy import Accuracies, Accuracy, find_accuracies
from rslad_edge.bench.core import TimingConfig, artifact_facts
from rslad_edge.bench.jetson import PowerReading, TegrastatsSampler, probe_local_jetson
from rslad_edge.bench.suite import busy_machine_warning, runner_device
from rslad_edge.errors import ConfigError, RsladEdgeError, RuntimeUnavailableError
from rslad_edge.io import sha256_file
from rslad_edge.record import Artifact, RunRecord, VerifyEntry

FAST = dict(warmup=1, warmup_seconds=0.0, iters=5)
ENV = {"cpu_model": "test"}


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    path = tmp_path / "export" / "student.onnx"
    path.parent.mkdir()
    path.write_bytes(b"not really onnx, but bench only hashes and sizes the file" * 100)
    return path


def test_bench_times_one_preallocated_batch_of_exactly_each_size(artifact):
    runner = FakeRunner(artifact, threads=2)
    report = bench(runner, batches=(1, 8, 64), threads=2, env=ENV, **FAST)
    assert [r.batch for r in report.results] == [1, 8, 64]
    by_size: dict[int, set[int]] = {}
    for x in runner.seen:
        assert x.dtype == np.float32 and x.shape[1:] == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
        by_size.setdefault(len(x), set()).add(id(x))
    assert all(len(ids) == 1 for ids in by_size.values())  # the same array every call: no per-call allocation
    assert len(runner.seen) == 3 * (1 + 1 + 5)  # per batch: one check call, one warm-up, five timed


def test_a_row_carries_identity_statistics_and_how_it_was_timed(artifact):
    report = bench(FakeRunner(artifact, threads=4), batches=(8,), threads=4, device="cpu", env=ENV, **FAST)
    row = report.results[0]
    assert row.artifact == str(artifact) and row.sha256 == sha256_file(artifact)
    assert (row.backend, row.provider, row.precision, row.threads) == ("onnxruntime", "CPUExecutionProvider",
                                                                       "fp32", 4)
    assert row.iterations == 5 and row.warmup_iterations == 1
    assert row.p50_ms <= row.p90_ms <= row.p99_ms <= row.max_ms
    assert row.images_per_s == pytest.approx(8e3 / row.p50_ms)
    assert (row.timed, row.clock) == ("predict", "perf_counter")
    assert row.size_mb == pytest.approx(artifact.stat().st_size / 1e6)
    payload = json.loads(json.dumps(report.to_dict()))
    for key in ["artifact", "sha256", "backend", "provider", "precision", "batch", "p50_ms", "p90_ms", "p99_ms",
                "mean_ms", "std_ms", "images_per_s", "outliers", "threads"]:
        assert key in payload["results"][0]
    assert payload["env"] == ENV


def test_threads_the_runner_was_not_created_with_are_refused(artifact):
    with pytest.raises(ConfigError, match=r"--threads 2.*load_runner\(\.\.\., threads=2\)"):
        bench(FakeRunner(artifact, threads=4), batches=(1,), threads=2, env=ENV, **FAST)


def test_torch_runner_without_threads_records_torchs_thread_count(artifact):
    import torch

    row = bench(FakeRunner(artifact, backend="torch", provider="cpu"), batches=(1,), env=ENV, **FAST).results[0]
    assert row.threads == torch.get_num_threads()


def test_a_batch_the_artifact_cannot_take_fails_naming_it_before_timing(artifact):
    with pytest.raises(RsladEdgeError, match=r"student\.onnx' fails at batch 64: \[ONNXRuntimeError\]"):
        bench(FakeRunner(artifact, fail_at=64), batches=(1, 64), env=ENV, **FAST)


@pytest.mark.parametrize("batches, message", [((0,), "--batch sizes must be >= 1, got 0"), ((), "--batch needs")])
def test_bad_batch_sizes_are_config_errors(artifact, batches, message):
    with pytest.raises(ConfigError, match=message):
        bench(FakeRunner(artifact), batches=batches, env=ENV, **FAST)
    with pytest.raises(ConfigError, match="--iters must be >= 1"):
        TimingConfig(iters=0)


def test_a_device_fast_path_is_timed_instead_of_predict(artifact):
    class FastPathRunner(FakeRunner):
        enqueued = 0

        def timed_fn(self, x):
            def run():
                FastPathRunner.enqueued += 1
            return run

    row = bench(FastPathRunner(artifact), batches=(1,), env=ENV, **FAST).results[0]
    assert row.timed == "timed_fn" and row.clock == "perf_counter"  # CPU runner: CUDA events only on a GPU
    assert FastPathRunner.enqueued == 6


def test_power_is_sampled_over_the_timed_window_and_turned_into_energy_per_image(artifact):
    windows = []

    class Sampler:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def power(self, window):
            windows.append(window)
            return PowerReading("VDD_IN", mean_w=6.0, samples=12, gpu_load_pct=97.0)

    row = bench(FakeRunner(artifact), batches=(8,), env=ENV, power=Sampler, **FAST).results[0]
    assert len(windows) == 1 and windows[0][0] <= windows[0][1]
    assert row.power_w == 6.0 and row.power_rail == "VDD_IN" and row.power_samples == 12
    assert row.energy_per_image_mj == pytest.approx(6.0 / row.images_per_s_wall * 1e3)


def test_static_batch_models_are_noted_when_a_batch_is_padded_or_split(artifact):
    runner = FakeRunner(artifact, threads=1)
    runner.static_batch = 8
    rows = bench(runner, batches=(1, 8, 64), env=ENV, **FAST).results
    assert "runs as 1 call(s) of 8" in rows[0].notes[0] and not rows[1].notes and "8 call(s)" in rows[2].notes[0]


def test_onnx_runtime_default_threads_are_noted_not_left_blank(artifact):
    row = bench(FakeRunner(artifact), batches=(1,), env={"cpu_cores_physical": 6}, **FAST).results[0]
    assert row.threads is None and "one per physical core (6 here)" in row.notes[0]


# ------------------------------------------------------------------------------------------------- accuracy


def _record_with(run: Path, artifact: Path, sha: str, clean: float, worst: float) -> RunRecord:
    record = RunRecord(root=run, exports=[dataclasses.replace(Artifact.from_file(artifact), sha256=sha)],
                       verify=[VerifyEntry(sha, run / "verify" / "x.json", clean, {"pgd": worst}, worst)])
    record.save()
    return record


def test_accuracy_comes_from_the_run_record_of_the_run_holding_the_file(artifact):
    sha = sha256_file(artifact)
    _record_with(artifact.parent.parent, artifact, sha, 0.81, 0.50)
    found = find_accuracies([(artifact, sha)])
    assert found.by_sha256[sha].clean_acc == 0.81 and found.by_sha256[sha].robust_acc == 0.50
    assert not found.warnings


def test_an_explicit_verify_json_without_worst_case_gives_the_lowest_attack(artifact, tmp_path):
    sha = sha256_file(artifact)
    path = write_verify_json(tmp_path / "elsewhere" / "v.json", artifact, sha, 0.8, {"pgd": 0.5, "cw": 0.47})
    assert find_accuracies([(artifact, sha)], [path]).by_sha256[sha].robust_acc == 0.47


def test_verify_jsons_lying_in_the_run_folder_are_not_globbed(artifact):
    sha = sha256_file(artifact)
    write_verify_json(artifact.parent.parent / "verify" / "student.json", artifact, sha, 0.8, {"pgd": 0.5})
    found = find_accuracies([(artifact, sha)])
    assert found.by_sha256 == {} and found.warnings == []


def test_a_record_result_for_an_older_file_is_not_shown_but_reported(artifact):
    _record_with(artifact.parent.parent, artifact, "0" * 64, 0.9, 0.6)
    found = find_accuracies([(artifact, sha256_file(artifact))])
    assert found.by_sha256 == {}
    assert len(found.warnings) == 1 and "older 'student.onnx' (sha256 differs)" in found.warnings[0]


def test_explicit_verify_json_that_matches_nothing_is_reported(artifact, tmp_path):
    other = write_verify_json(tmp_path / "elsewhere.json", Path("x.onnx"), "f" * 64, 0.9, {"pgd": 0.6})
    found = find_accuracies([(artifact, sha256_file(artifact))], [other, tmp_path / "missing.json"])
    assert found.by_sha256 == {} and any("no sha256 matches" in w for w in found.warnings)
    assert any("does not exist" in w for w in found.warnings)


# ------------------------------------------------------------------------------------------ bench_artifacts


@pytest.mark.parametrize("name, device, expected", [
    ("m.onnx", "cpu", "cpu"), ("m.onnx", "jetson", "trt"), ("m.onnx", "trt", "trt"), ("m.pt", "jetson", "cuda"),
    ("m.engine", "trt", "cuda"), ("m.pt", "cuda", "cuda"),
])
def test_runner_device_maps_bench_devices_to_load_runner_devices(name, device, expected):
    assert runner_device(Path(name), device) == expected


def test_an_engine_on_cpu_is_an_error_that_says_why():
    with pytest.raises(ConfigError, match="TensorRT engine: it runs only on the NVIDIA GPU .* not on --device cpu"):
        runner_device(Path("student.engine"), "cpu")
    with pytest.raises(ConfigError, match="checkpoint: --device trt runs ONNX models and engines"):
        runner_device(Path("student.pt"), "trt")


def _loader(created: list):
    def load(path, device, **options):
        created.append((Path(path).name, device, options))
        backend = "torch" if Path(path).suffix == ".pt" else "onnxruntime"
        return FakeRunner(path, backend=backend, provider=device, precision=options.get("precision", "fp32"),
                          threads=options.get("threads"))
    return load


def test_bench_artifacts_compares_several_files_with_their_accuracy_in_one_json(tmp_path, artifact):
    checkpoint = tmp_path / "student.pt"
    checkpoint.write_bytes(b"checkpoint bytes")
    accuracies = Accuracies({sha256_file(checkpoint): Accuracy(0.83, 0.51, "verify/pt.json")}, ["a warning"])
    created: list = []
    out = tmp_path / "bench" / "cpu.json"
    report = bench_artifacts([artifact, checkpoint], batches=(1, 4), precisions=("fp32", "bf16"), threads=2,
                             json_path=out, loader=_loader(created), accuracies=accuracies, **FAST)
    assert [(name, options.get("precision")) for name, _, options in created] == [
        ("student.onnx", None), ("student.pt", "fp32"), ("student.pt", "bf16")]
    assert all(options["threads"] == 2 for _, _, options in created)
    assert len(report.results) == 6
    pt_rows = [r for r in report.results if r.artifact.endswith(".pt")]
    assert {r.precision for r in pt_rows} == {"fp32", "bf16"}
    assert all(r.clean_acc == 0.83 and r.robust_acc == 0.51 for r in pt_rows)
    saved = json.loads(out.read_text())
    assert len(saved["results"]) == 6 and saved["config"]["batches"] == [1, 4] and "a warning" in saved["warnings"]
    assert {"cpu_model", "versions", "cpu_cores_logical", "load_avg_1m_end"} <= set(saved["env"])
    assert not list(out.parent.glob("*.tmp"))  # written atomically


def test_bench_artifacts_checks_every_artifact_before_loading_any(tmp_path, artifact):
    engine = tmp_path / "student.engine"
    engine.write_bytes(b"plan")
    created: list = []
    with pytest.raises(ConfigError, match="student.engine' is a TensorRT engine"):
        bench_artifacts([artifact, engine], device="cpu", loader=_loader(created), **FAST)
    assert created == []


def test_bench_artifacts_refuses_missing_files_and_plot_without_json(tmp_path, artifact):
    with pytest.raises(ConfigError, match="ARTIFACT '.*nope.onnx' does not exist"):
        bench_artifacts([tmp_path / "nope.onnx"], **FAST)
    with pytest.raises(ConfigError, match="--plot writes the PNG next to the JSON"):
        bench_artifacts([artifact], plot=True, **FAST)


def test_device_jetson_off_a_jetson_says_to_use_host(artifact, monkeypatch):
    monkeypatch.setattr("rslad_edge.bench.suite.is_jetson", lambda: False)
    with pytest.raises(RuntimeUnavailableError, match="not a Jetson .* --host user@jetson"):
        bench_artifacts([artifact], device="jetson", loader=_loader([]), **FAST)


def test_plot_is_written_next_to_the_json(tmp_path, artifact):
    pytest.importorskip("matplotlib")
    write_verify_json(artifact.parent.parent / "verify" / "v.json", artifact, sha256_file(artifact), 0.8,
                      {"pgd": 0.5})
    out = tmp_path / "bench.json"
    bench_artifacts([artifact], batches=(1, 2), json_path=out, plot=True, loader=_loader([]), **FAST)
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_report_extend_keeps_warnings_unique():
    report = BenchReport([], {}, warnings=["a"])
    report.extend(BenchReport([], {}, warnings=["a", "b"]))
    assert report.warnings == ["a", "b"]


def test_artifact_facts_count_external_onnx_weights(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x" * 1000)
    (tmp_path / "m.onnx.data").write_bytes(b"y" * 3000)
    assert artifact_facts(model)[1] == pytest.approx(0.004)


# ------------------------------------------------------------------------------------------- on a Jetson


def test_local_jetson_probe_reads_release_power_mode_and_clocks():
    outputs = {"nvpmodel": (FIXTURES / "nvpmodel_q_maxn.txt").read_text(),
               "jetson_clocks": (FIXTURES / "jetson_clocks_show_locked_orin_nx.txt").read_text()}
    state = probe_local_jetson(FIXTURES / "nv_tegra_release_r36.3.txt", read_command=lambda cmd: outputs[cmd[0]])
    assert state.release.l4t == "36.3.0" and state.power_mode.name == "MAXN" and state.clocks.locked
    assert state.warnings == []


def test_tegrastats_sampler_with_standin_tegrastats_measures_its_power(tmp_path):
    tool = write_standins(tmp_path / "bin") / "tegrastats"
    with TegrastatsSampler(tmp_path, command=str(tool)) as sampler:
        time.sleep(0.6)
    reading = sampler.power((sampler.started, sampler.stopped))
    assert reading.rail == "VDD_IN" and reading.mean_w == pytest.approx(5.0) and reading.samples >= 3


def test_device_jetson_on_the_device_with_standin_tools_reports_power_and_state(tmp_path, artifact, monkeypatch):
    bin_dir = write_standins(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr("rslad_edge.bench.suite.is_jetson", lambda: True)
    created: list = []
    report = bench_artifacts([artifact], device="jetson", batches=(4,), warmup=1, warmup_seconds=0.0,
                             seconds=0.5, loader=_loader(created))
    assert created[0][1] == "trt"  # an ONNX on a Jetson runs on ONNX Runtime's TensorRT provider
    row = report.results[0]
    assert row.power_w == pytest.approx(5.0) and row.power_rail == "VDD_IN"
    assert row.energy_per_image_mj == pytest.approx(5.0 / row.images_per_s_wall * 1e3)
    assert report.env["jetson"]["power_mode"]["name"] == "MAXN" and report.env["jetson"]["clocks_locked"] is True


def test_a_busy_machine_is_warned_about():
    assert "kept 1.9 of 2 usable cores busy" in busy_machine_warning(1.9, 2)
    assert busy_machine_warning(0.4, 2) is None and busy_machine_warning(10.0, 64) is None
    assert busy_machine_warning(None, 2) is None


def test_busy_cores_count_other_processes_not_this_ones_past_work():
    from rslad_edge.bench.env import busy_cores_of_others

    samples = iter(["cpu  100 0 100 800 0 0 0 0 0 0\n", "cpu  250 0 150 900 0 0 0 0 0 0\n"])  # 200 busy of 300
    busy = busy_cores_of_others(0.0, read_stat=lambda: next(samples))
    assert busy == pytest.approx((os.cpu_count() or 1) * 200 / 300, abs=0.01)
    assert busy_cores_of_others(0.0, read_stat=lambda: "no cpu line") is None


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="no /proc/stat on this platform")
def test_busy_cores_see_a_process_that_spins_one_core():
    """The real /proc/stat under a known load: a child spinning one core must show up as (nearly) one busy core."""
    import subprocess
    import sys

    from rslad_edge.bench.env import busy_cores_of_others

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        busy = busy_cores_of_others(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and 0.8 <= busy <= (os.cpu_count() or 1) + 0.05
