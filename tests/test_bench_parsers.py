"""Parsers for trtexec, tegrastats, nvpmodel, jetson_clocks and nv_tegra_release output.

Each format is tested on the project's own fixtures (tests/fixtures/bench, written for these tests) and on real
captured outputs in ../shared/samples (skipped where that folder is absent).
"""

from __future__ import annotations

import pytest
from bench_support import FIXTURES, SAMPLES

from rslad_edge.bench.jetson import (
    TegrastatsSample,
    jetson_state,
    parse_jetson_clocks_show,
    parse_nv_tegra_release,
    parse_nvpmodel_query,
    parse_tegrastats,
    parse_tegrastats_line,
    power_in_window,
    sample_times,
)
from rslad_edge.bench.trtexec import (
    parse_export_times,
    parse_trt_version,
    parse_trtexec_log,
    time_args,
)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def sample(name: str) -> str:
    path = SAMPLES / name
    if not path.is_file():
        pytest.skip(f"real sample {name} not present (../shared/samples)")
    return path.read_text()


# ----------------------------------------------------------------------------------------------------- trtexec


def test_trtexec_10_log_gives_summary_percentiles_throughput_and_version():
    log = parse_trtexec_log(fixture("trtexec_trt10.3_orin_b8.log"))
    assert log.passed is True and log.trt_version == "10.3.0" and log.device == "Orin"
    assert log.throughput_qps == 1179.67 and log.queries == 3540 and log.trace_s == 3.00084
    assert log.latency.median_ms == 0.84375
    assert log.latency.percentiles == {50.0: 0.84375, 90.0: 0.85547, 99.0: 0.90234}
    assert log.gpu_compute.percentiles[99.0] == 0.85156
    assert set(log.metrics) == {"latency", "enqueue", "h2d", "gpu_compute", "d2h"}
    assert log.walltime_s == 3.00084 and log.gpu_compute_total_s == 2.83749


def test_trtexec_8_2_log_with_end_to_end_line_and_only_p99():
    log = parse_trtexec_log(fixture("trtexec_trt8.2_nano_e2e_p99.log"))
    assert log.trt_version == "8.2.1" and log.device == "NVIDIA Tegra X1"
    assert log.latency.percentiles == {99.0: 2.5762}
    assert log.metrics["end_to_end"].median_ms == 2.1155


def test_failed_trtexec_log_keeps_its_error_lines():
    log = parse_trtexec_log(fixture("trtexec_trt10.3_build_failed.log"))
    assert log.passed is False and not log.has_summary
    assert "Assertion failed: scale must be positive" in log.errors[1]


@pytest.mark.parametrize("code, version", [("101602", "10.16.2"), ("8502", "8.5.2"), ("8400", "8.4.0"),
                                           ("100300", "10.3.0"), ("110400", "11.4.0")])
def test_trt_version_tag_decodes(code, version):
    assert parse_trt_version(code) == version


@pytest.mark.parametrize("name, version, median, p99, qps", [
    ("trtexec_jetson_orin_nano_super_jp7.2.1_trt10.16.2_fp16_onnx_build_and_run.log", "10.16.2", 1.72266, 2.25293,
     566.205),
    ("trtexec_desktop_h100_trt10.16.1_load_fp16_engine_cudagraph_nodatatransfers_verbose.log", "10.16.1", 0.0388184,
     0.0390625, 24896.9),
    ("trtexec_desktop_rtx3090_trt8.6.0_load_engine_verbose.log", "8.6.0", 0.0517578, 0.0630798, 21009.2),
    ("trtexec_desktop_rtx6000ada_trt10.16.0_fp32_onnx_build_and_run.log", "10.16.0", 0.0386963, 0.144043, 18392.0),
    ("trtexec_jetson_agx_xavier_trt8.4.0_perf_summary_only_excerpt.txt", "8.4.0", 0.401947, 0.420288, 41087.7),
    ("trtexec_jetson_trt7.x_int8_caffe_googlenet_legacy_format.txt", None, 95.1907, 102.536, 1333.49),
])
def test_real_trtexec_logs_parse_across_versions(name, version, median, p99, qps):
    log = parse_trtexec_log(sample(name))
    assert log.passed is True and log.trt_version == version
    assert log.latency.median_ms == median and log.latency.percentiles[99.0] == p99
    assert log.throughput_qps == qps


def test_real_verbose_log_ignores_the_explanation_block_and_trailing_warnings():
    log = parse_trtexec_log(sample("trtexec_desktop_h100_trt10.16.1_load_fp16_engine_cudagraph_nodatatransfers_"
                                   "verbose.log"))
    assert log.walltime_s == 3.00005 and log.gpu_compute.median_ms == 0.0388184
    assert log.metrics["h2d"].mean_ms == 0  # --noDataTransfers


def test_real_trt7_log_reads_the_legacy_blocks():
    log = parse_trtexec_log(sample("trtexec_jetson_trt7.x_int8_caffe_googlenet_legacy_format.txt"))
    assert log.precision == "FP32+INT8" and log.queries == 4352 and log.walltime_s == 3.26362
    assert log.gpu_compute.mean_ms == 92.2887 and log.gpu_compute.percentiles == {99.0: 98.9993}
    assert log.metrics["enqueue"].median_ms == 95.1918 and log.gpu_compute_total_s == 3.13782


@pytest.mark.parametrize("name", ["trtexec_jetson_xavier_nx_jp5.1.5_trt8.5.2_dumpProfile_verbose_no_perf_summary.log",
                                  "trtexec_desktop_h100_trt10.16.1_dumpProfile_exportTimes_no_perf_summary.log"])
def test_real_profiler_logs_have_no_summary(name):
    log = parse_trtexec_log(sample(name))
    assert log.passed is True and not log.has_summary and log.throughput_qps is None


def test_export_times_gives_per_query_latency_and_compute():
    times = parse_export_times(fixture("exportTimes_trt10.3_orin_b8.json"))
    assert len(times.latency_ms) == 12
    assert times.latency_ms[0] == pytest.approx(0.01367 + 0.79883 + 0.03027, abs=1e-5)
    assert max(times.compute_ms) == 2.38281


@pytest.mark.parametrize("name, count, first", [
    ("trtexec_exportTimes_rtx3060laptop_trt10_fp16_alexnet_first200.json", 200, 0.497559),
    ("trtexec_exportTimes_jetson_trt7.x_int8_googlenet_legacy_keys_first50.json", 50, 4.63152),
])
def test_real_export_times_parse_with_new_and_legacy_keys(name, count, first):
    times = parse_export_times(sample(name))
    assert len(times.latency_ms) == count and times.latency_ms[0] == first


def test_export_times_rejects_joined_arrays_and_foreign_json():
    text = fixture("exportTimes_trt10.3_orin_b8.json")
    with pytest.raises(ValueError, match="more than one"):
        parse_export_times(text + text)
    with pytest.raises(ValueError, match="latencyMs"):
        parse_export_times('[{"name": "conv1", "timeMs": 1.0}]')  # an --exportProfile file


def test_trtexec_timing_command_times_the_built_engine_and_exports_every_query():
    timing = time_args("b8.engine", input_name="input", chw=(3, 32, 32), batch=8, warmup_ms=500, seconds=3.0,
                       iterations=None, times_json="t.json")
    assert {"--separateProfileRun", "--percentile=50,90,99", "--exportTimes=t.json", "--shapes=input:8x3x32x32",
            "--warmUp=500", "--duration=3"} <= set(timing)
    fixed = time_args("b8.engine", input_name="input", chw=(3, 32, 32), batch=8, warmup_ms=500, seconds=None,
                      iterations=200, times_json="t.json")
    assert "--iterations=200" in fixed and "--duration=0" in fixed


# --------------------------------------------------------------------------------------------------- tegrastats


def test_tegrastats_jetpack6_line_gives_rails_gpu_load_ram_and_temperatures():
    samples = parse_tegrastats(fixture("tegrastats_orin_nano_jp6.log"))
    assert len(samples) == 4  # the blank line is skipped
    second = samples[1]
    assert second.timestamp == "03-02-2026 10:15:03"
    assert second.rails_mw == {"VDD_IN": 8790.0, "VDD_CPU_GPU_CV": 3820.0, "VDD_SOC": 2410.0}
    assert second.rails_avg_mw["VDD_IN"] == 7000.0
    assert second.total_power() == ("VDD_IN", 8790.0)
    assert second.gpu_load_pct == 93 and second.ram_used_mb == 2990 and second.temps_c["tj"] == 48.125


def test_tegrastats_jetpack4_line_without_units_uses_pom_5v_in():
    sample_ = parse_tegrastats(fixture("tegrastats_nano_jp4.log"))[0]
    assert sample_.timestamp is None
    assert sample_.total_power() == ("POM_5V_IN", 4871.0)
    assert "RAM" not in sample_.rails_mw and "IRAM" not in sample_.rails_mw and sample_.gpu_load_pct == 76


@pytest.mark.parametrize("name, lines, rail, first_mw", [
    ("tegrastats_orin_nano_super_8gb_jp6.2.1.txt", 12, "VDD_IN", 10510.0),
    ("tegrastats_xavier_nx_jp5.1.txt", 20, "VDD_IN", 5542.0),
    ("tegrastats_jetson_nano_4gb_jp4.txt", 20, "POM_5V_IN", 920.0),
    ("tegrastats_orin_nano_super_jp7.2.1_r39_idle.txt", 4, "VDD_IN", 3582.0),
    ("tegrastats_agx_orin_64gb_jp6.txt", 15, "VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0", 2798.0 + 799.0 + 3315.0),
])
def test_real_tegrastats_across_jetpacks_and_boards(name, lines, rail, first_mw):
    samples = parse_tegrastats(sample(name))
    assert len(samples) == lines
    assert samples[0].total_power() == (rail, first_mw)
    assert not {"RAM", "SWAP", "IRAM"} & set(samples[0].rails_mw)


def test_real_jetpack7_three_value_rails_take_the_current_reading():
    second = parse_tegrastats(sample("tegrastats_orin_nano_super_jp7.2.1_r39_idle.txt"))[1]
    assert second.rails_mw["VDD_IN"] == 3462.0 and second.rails_avg_mw["VDD_IN"] == 3522.0
    assert second.temps_c["cpu"] == 45.375


def test_foreign_lines_are_not_samples():
    assert parse_tegrastats_line("") is None
    assert parse_tegrastats_line("tegrastats: cannot open /sys/...") is None


def test_power_in_window_averages_only_the_samples_inside_it():
    line = "RAM 1/2MB GR3D_FREQ {load}% VDD_IN {mw}mW/{mw}mW"
    samples = [parse_tegrastats_line(line.format(mw=mw, load=load))
               for mw, load in [(3000, 0), (9000, 90), (11000, 100), (3000, 0)]]
    times = sample_times(4, started=0.0, stopped=4.0)  # taken at 1, 2, 3, 4
    assert times == [1.0, 2.0, 3.0, 4.0]
    reading = power_in_window(samples, times, (1.5, 3.5))
    assert reading.rail == "VDD_IN" and reading.samples == 2
    assert reading.mean_w == pytest.approx(10.0) and reading.gpu_load_pct == 95
    assert reading.energy_per_image_mj(images_per_s=2000) == pytest.approx(5.0)  # 10 W / 2000 img/s = 5 mJ
    assert power_in_window(samples, times, (10, 11)) is None


def test_a_sample_without_rails_has_no_total_power():
    assert TegrastatsSample(None, {}, {}, None, 1, 2).total_power() is None


# ------------------------------------------------------------------------------------ nvpmodel, clocks, release


def test_nvpmodel_query_gives_name_and_mode_number():
    assert parse_nvpmodel_query(fixture("nvpmodel_q_maxn.txt")).name == "MAXN"
    assert parse_nvpmodel_query(fixture("nvpmodel_q_maxn.txt")).mode_id == 0
    assert parse_nvpmodel_query("nvpmodel: command not found") is None


@pytest.mark.parametrize("name, mode, mode_id", [
    ("nvpmodel_q_agx_orin_jp5.1.2.txt", "MODE_30W", 2),
    ("nvpmodel_q_orin_nano_8gb_jp6.2.1.txt", "15W", 0),
    ("nvpmodel_q_modes_and_jetson_clocks_show_orin_nano_super_jp7.2.1.txt", "25W", 1),
    ("jetson_orin_nano_jp6.2.1_hardware_snapshot_full.txt", "15W", 0),
])
def test_real_nvpmodel_outputs(name, mode, mode_id):
    assert parse_nvpmodel_query(sample(name)) == parse_nvpmodel_query(f"NV Power Mode: {mode}\n{mode_id}\n")


def test_locked_clocks_are_recognised_and_offline_cores_ignored():
    clocks = parse_jetson_clocks_show(fixture("jetson_clocks_show_locked_orin_nx.txt"))
    assert clocks.locked and len(clocks.cpus) == 6
    assert clocks.gpu.max_mhz == 918.0 and clocks.emc_override is True and clocks.power_mode == "MAXN"


@pytest.mark.parametrize("name, cpus, gpu_max, locked", [
    ("jetson_clocks_show_agx_orin_64gb_jp5.1_maxn.txt", 12, 1300.5, False),
    ("nvpmodel_q_modes_and_jetson_clocks_show_orin_nano_super_jp7.2.1.txt", 6, 918.0, False),
    ("jetson_clocks_sh_show_tx1_l4t28.1_legacy.txt", 4, 998.4, True),
])
def test_real_jetson_clocks_outputs(name, cpus, gpu_max, locked):
    clocks = parse_jetson_clocks_show(sample(name))
    assert len(clocks.cpus) == cpus and clocks.gpu.max_mhz == gpu_max and clocks.locked is locked
    if not locked:
        assert any(reason.startswith("GPU MinFreq 306 MHz") for reason in clocks.unlocked_reasons())


def test_release_file_gives_the_l4t_version():
    release = parse_nv_tegra_release(fixture("nv_tegra_release_r36.3.txt"))
    assert release.l4t == "36.3.0" and release.board == "generic"
    assert parse_nv_tegra_release("Debian GNU/Linux 12") is None


@pytest.mark.parametrize("name, l4t", [
    ("nv_tegra_release_jp5.1.2_r35.4.1_agx_orin.txt", "35.4.1"),
    ("nv_tegra_release_jp6.2.1_r36.4.4_agx_orin.txt", "36.4.4"),
    ("nv_tegra_release_jp6.2.1_r36.4.7_orin_nano.txt", "36.4.7"),
    ("nv_tegra_release_jp7.2.1_r39.2.1_orin_nano_super.txt", "39.2.1"),
])
def test_real_release_files(name, l4t):
    assert parse_nv_tegra_release(sample(name)).l4t == l4t


def test_jetson_state_warns_when_clocks_are_unlocked_or_unknown():
    locked = jetson_state(fixture("nv_tegra_release_r36.3.txt"), fixture("nvpmodel_q_maxn.txt"),
                          fixture("jetson_clocks_show_locked_orin_nx.txt"))
    assert locked.warnings == [] and locked.to_dict()["clocks_locked"] is True
    assert locked.to_dict()["l4t"] == "36.3.0" and locked.to_dict()["power_mode"]["name"] == "MAXN"
    unknown = jetson_state(None, None, None)
    assert any("needs root" in w for w in unknown.warnings) and any("power mode" in w for w in unknown.warnings)
    unlocked = jetson_state(None, "NV Power Mode: 15W\n0\n", "GPU MinFreq=306000000 MaxFreq=918000000 "
                            "CurrentFreq=306000000\n")
    assert any(w.startswith("clocks are not locked (GPU MinFreq 306 MHz") for w in unlocked.warnings)
