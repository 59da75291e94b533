import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from rslad_edge.cli import app
from rslad_edge.errors import ConfigError, GateFailedError, PipelineConfigError, RunDirError
from rslad_edge.models import create_model, save_checkpoint
from rslad_edge.pipeline import load_pipeline_config, preset_text, run_pipeline
from rslad_edge.record import RunRecord

runner = CliRunner()


def tiny_sections(teacher, **changes):
    """A whole pipeline in well under a minute: 256 synthetic images, one epoch, small attack budgets."""
    sections = {
        "distill": {"preset": "smoke", "method": "rslad", "teacher": str(teacher), "train_subset": 256, "epochs": 1,
                    "batch_size": 64, "eval_n": 64, "attack_steps": 2, "precision": "fp32", "device": "cpu"},
        "export": {"precisions": ["fp32", "int8"], "calib_n": 64, "parity_n": 64, "min_agreement": 0.5},
        "verify": {"n": 48, "square_queries": 20, "device": "cpu",
                   "attacks": ["fgsm", "pgd_sat", "transfer_pgd", "divergence", "square"]},
        "bench": {"device": "cpu", "batch": [1, 8], "seconds": 0.2, "warmup": 2, "warmup_seconds": 0.05,
                  "min_iters": 5, "threads": 1},
    }
    for stage, values in changes.items():
        sections[stage].update(values)
    return sections


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    return save_checkpoint(path, create_model("smallcnn-wide"), "smallcnn-wide", num_classes=10, input_size=(32, 32))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, teacher):
    out = tmp_path_factory.mktemp("pipe") / "run"
    stages = []
    result = run_pipeline(tiny_sections(teacher), out, on_stage=lambda stage, status: stages.append((stage, status)))
    return out, result, stages


def test_pipeline_runs_every_stage_and_writes_the_run_directory(finished_run):
    out, result, stages = finished_run
    assert [s for s, status in stages if status == "run"] == ["distill", "export", "verify", "bench", "report"]
    assert (out / "student.pt").exists() and (out / "metrics.jsonl").exists()
    assert {p.name for p in (out / "export").glob("*.onnx")} == {"student.onnx", "student.int8.onnx"}
    verify = {p.name: json.loads(p.read_text()) for p in (out / "verify").glob("*.json")}
    assert set(verify) == {"student.pt.json", "student.onnx.json", "student.int8.onnx.json"}
    int8 = verify["student.int8.onnx.json"]
    assert int8["reference"]["artifact"].endswith("student.pt")
    # Every artifact faces the same white-box columns (an export through its twin) and Square; exports also
    # transfer and divergence. The drop is the checkpoint's own worst case minus the export's, on the same images.
    assert set(verify["student.pt.json"]["robust_acc"]) == {"fgsm", "pgd_sat", "square"}
    assert set(int8["robust_acc"]) == {"fgsm", "pgd_sat", "transfer_pgd", "divergence", "square"}
    assert int8["twin"]["n"] == 48 and int8["attack_details"]["pgd_sat"]["artifact_gradients"] == "twin"
    assert int8["reference"]["worst_case_acc"] == verify["student.pt.json"]["worst_case_acc"]
    # ...because the checkpoint's row is taken from its own verify, not attacked once more per export
    assert any("fgsm, pgd_sat, square taken from its own verify" in note for note in int8["notes"])
    record = RunRecord.load(out)
    entry = next(v for v in record.verify if v.json_path.name == "student.int8.onnx.json")
    expected = 100 * (verify["student.pt.json"]["worst_case_acc"] - int8["worst_case_acc"])
    assert entry.drop_pp == pytest.approx(expected)
    bench = json.loads((out / "bench" / "cpu.json").read_text())
    assert {r["batch"] for r in bench["results"]} == {1, 8} and len(bench["results"]) == 6


def test_report_shows_every_artifact_with_accuracy_and_latency(finished_run):
    out, result, _ = finished_run
    html = result.report_html.read_text()
    for name in ["student.pt", "student.onnx", "student.int8.onnx"]:
        assert f"<td>{name}</td>" in html
    assert html.count("<table") == 2 and "data:image/png;base64," in html  # self-contained figures
    md = result.report_md.read_text()
    assert "| student.int8.onnx |" in md and "## Gates" in md and "twin agreement %" in md
    # every worst case with its 95 % interval, every drop with its paired one
    int8_row = next(line for line in md.splitlines() if line.startswith("| student.int8.onnx |"))
    assert re.search(r"\| \d+\.\d \[\d+\.\d, \d+\.\d\] \|", int8_row)
    assert re.search(r"\| [+-]\d+\.\d( ± \d+\.\d)? \|", int8_row)


def test_rerun_with_resume_skips_every_unchanged_stage(finished_run, teacher):
    out, _, _ = finished_run
    stages = []
    run_pipeline(tiny_sections(teacher), out, resume=True, on_stage=lambda s, status: stages.append((s, status)))
    assert stages == [("distill", "skip"), ("export", "skip"), ("verify", "skip"), ("bench", "skip"),
                      ("report", "run")]


@pytest.mark.slow  # 12 s: a second pipeline run through the CLI
def test_cli_ends_with_a_summary_table_of_every_artifact(finished_run, teacher, tmp_path, monkeypatch):
    from rslad_edge.console import console

    monkeypatch.setattr(console, "width", 200)  # a wide terminal: one artifact name per cell, unwrapped
    out, _, _ = finished_run
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_sections(teacher)))
    result = runner.invoke(app, ["pipeline", "--config", str(config), "--out", str(out), "--resume"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    summary = result.output[result.output.index("artifacts: accuracy"):]
    for name in ("student.pt", "student.onnx", "student.int8.onnx", "worst", "drop", "p50"):
        assert name in summary
    assert "done: report" in summary
    assert "[" not in summary.split("done: report")[0]  # the intervals stay in report.md: a terminal is too narrow


def test_existing_run_is_refused_without_resume_or_force(finished_run, teacher):
    out, _, _ = finished_run
    with pytest.raises(RunDirError, match="--resume"):
        run_pipeline(tiny_sections(teacher), out)


def test_interrupted_export_resumes_without_redoing_distillation(tmp_path, teacher, monkeypatch):
    import rslad_edge.export

    real_export = rslad_edge.export.export

    def killed_during_export(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rslad_edge.export, "export", killed_during_export)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(tiny_sections(teacher), tmp_path / "run")
    student_bytes = (tmp_path / "run" / "student.pt").read_bytes()

    monkeypatch.setattr(rslad_edge.export, "export", real_export)
    stages = []
    run_pipeline(tiny_sections(teacher, verify={"n": 16}), tmp_path / "run", resume=True,
                 on_stage=lambda s, status: stages.append((s, status)))
    assert stages[:2] == [("distill", "skip"), ("export", "run")]
    assert (tmp_path / "run" / "student.pt").read_bytes() == student_bytes


@pytest.mark.slow
def test_a_copied_run_with_a_changed_export_config_reruns_export_but_not_distill(finished_run, teacher, tmp_path):
    out, _, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    stages = []
    result = run_pipeline(tiny_sections(teacher, export={"precisions": ["fp32"]}), copy, resume=True,
                          on_stage=lambda s, status: stages.append((s, status)))
    assert stages[0] == ("distill", "skip") and stages[1] == ("export", "run")
    # Only this configuration's results remain: the int8 export and its verify JSON went with the old config.
    assert not (copy / "export" / "student.int8.onnx").exists()
    assert sorted(p.name for p in (copy / "verify").iterdir()) == ["student.onnx.json", "student.pt.json"]
    assert "student.int8.onnx" not in result.report_md.read_text()
    assert [a.name for a in RunRecord.load(copy).artifacts] == ["student.pt", "student.onnx"]


@pytest.mark.slow
def test_resume_with_new_bench_batches_reports_exactly_them_not_a_stale_bench_file(finished_run, teacher, tmp_path):
    out, _, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    # A result left by an earlier configuration sorts first: the report must not pick it up.
    shutil.copy(copy / "bench" / "cpu.json", copy / "bench" / "a-previous.json")
    stages = []
    result = run_pipeline(tiny_sections(teacher, bench={"batch": [2, 4]}), copy, resume=True,
                          on_stage=lambda s, status: stages.append((s, status)))
    assert ("bench", "run") in stages
    md = result.report_md.read_text()
    latency = md[md.index("## Latency"):md.index("## Configuration")]
    batches = {int(line.split("|")[5]) for line in latency.splitlines() if line.startswith("| student")}
    assert batches == {2, 4}
    assert result.record.bench.batches == [2, 4]


def test_a_misspelt_key_in_any_section_is_one_line_exit_2_and_writes_nothing(tmp_path, teacher):
    for stage, key, expected in [("distill", "epochz", "did you mean 'epochs'"),
                                 ("export", "calib_nn", "did you mean 'calib-n'"),
                                 ("verify", "squre_queries", "did you mean 'square-queries'"),
                                 ("bench", "secondz", "did you mean 'seconds'")]:
        sections = tiny_sections(teacher)
        sections[stage][key] = 2
        config = tmp_path / f"{stage}.yaml"
        config.write_text(yaml.safe_dump(sections))
        out = tmp_path / f"run-{stage}"
        result = runner.invoke(app, ["pipeline", "--config", str(config), "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert f"pipeline section '{stage}'" in result.output and expected in result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
        assert not out.exists()


@pytest.mark.parametrize("stage, key, value, expected", [
    ("export", "calib_n", "many", "key 'calib-n': expected an integer, got 'many'"),
    ("bench", "batch", [1, "x"], "key 'batch': expected a list of integers"),
    ("bench", "seconds", -1, "--seconds must be > 0"),
    ("verify", "checkpoint_attacks", ["pgd_sta"], "key 'checkpoint-attacks'"),
    ("distill", "epochs", 0, "--epochs must be positive"),
])
def test_a_wrong_type_or_impossible_value_names_its_section(tmp_path, teacher, stage, key, value, expected):
    sections = tiny_sections(teacher)
    sections[stage][key] = value
    with pytest.raises(PipelineConfigError, match=f"pipeline section '{stage}'") as caught:
        run_pipeline(sections, tmp_path / "run")
    assert expected in str(caught.value) and not (tmp_path / "run").exists()


def test_a_truncated_or_newer_record_is_refused_on_resume_naming_the_file(finished_run, teacher, tmp_path):
    out, _, _ = finished_run
    for name, damage in [("truncated", lambda text: text[: len(text) // 2]),
                         ("newer", lambda text: text.replace('"version": 1', '"version": 99'))]:
        copy = tmp_path / name
        shutil.copytree(out, copy)
        record = copy / "run.json"
        record.write_text(damage(record.read_text()))
        with pytest.raises(RunDirError, match=str(record)) as caught:
            run_pipeline(tiny_sections(teacher), copy, resume=True)
        assert ("newer rslad-edge" if name == "newer" else "truncated") in str(caught.value)
        assert record.read_text() == damage((out / "run.json").read_text())  # left as it was


def test_a_failed_gate_still_writes_the_report_and_then_exits_3(tmp_path, teacher):
    # Any drop at all fails the gate; int8 of a one-epoch model usually drops somewhere.
    sections = tiny_sections(teacher, verify={"max_drop": 0.0}, export={"precisions": ["int8"]})
    try:
        run_pipeline(sections, tmp_path / "run")
    except GateFailedError as exc:
        assert exc.exit_code == 3 and "student.int8.onnx" in str(exc)
        html = (tmp_path / "run" / "report.html").read_text()
        assert 'class="fail"' in html
    else:  # no drop at all on these 48 images: then the gate must say PASS
        html = (tmp_path / "run" / "report.html").read_text()
        assert 'class="pass"' in html


@pytest.mark.slow  # 40 s: a pipeline whose int8 search runs one candidate
def test_an_int8_search_that_ships_nothing_keeps_the_other_artifacts_going_and_reports_it(tmp_path, teacher):
    """A gate no candidate can meet (100% agreement's lower bound): the fp32 export is verified and benched as
    usual, the closest int8 candidate is kept under its failed-gate name, the report shows the search table and a
    FAIL line, and the run exits 3 at the end."""
    sections = tiny_sections(teacher, export={"search": True, "search_budget": 1, "search_n": 64, "confirm_n": 64,
                                              "min_agreement": 1.0, "min_speedup": 0})
    out = tmp_path / "run"
    with pytest.raises(GateFailedError) as failed:
        run_pipeline(sections, out)
    assert failed.value.exit_code == 3 and "student.int8.failed-gate.onnx: no int8 recipe passed" in str(failed.value)
    assert (out / "export" / "student.int8.failed-gate.onnx").is_file()
    assert not (out / "export" / "student.int8.onnx").exists()
    record = json.loads((out / "run.json").read_text())
    assert [Path(a["path"]).name for a in record["exports"]] == ["student.onnx"]
    assert len(record["verify"]) == 2 and record["bench"] is not None  # the checkpoint and the fp32 ONNX
    md = (out / "report.md").read_text()
    assert "## int8 search: student.int8.failed-gate.onnx (nothing shipped)" in md
    assert "- FAIL: student.int8.failed-gate.onnx: no int8 recipe passed the gate in 1 candidate(s)" in md


def test_print_config_is_the_complete_commented_preset():
    result = runner.invoke(app, ["pipeline", "--print-config", "--preset", "cifar10-rslad"])
    assert result.exit_code == 0
    assert result.output == preset_text("cifar10-rslad") and "# " in result.output
    sections = load_pipeline_config("cifar10-rslad")
    assert sections["distill"]["student"] == "mobilenetv2" and sections["verify"]["square_queries"] == 5000


def test_config_file_overrides_the_preset_key_by_key(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("verify:\n  n: 50\n")
    sections = load_pipeline_config("smoke", path)
    assert sections["verify"]["n"] == 50 and sections["verify"]["square_queries"] == 100


def test_unknown_section_or_preset_is_a_clear_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("verfy:\n  n: 50\n")
    with pytest.raises(ConfigError, match="did you mean 'verify'"):
        load_pipeline_config("smoke", path)
    with pytest.raises(ConfigError, match="smoke, cifar10-rslad, cifar100-rslad"):
        load_pipeline_config("smok")


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium_with_tables_and_images(finished_run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium)")
    out, result, _ = finished_run
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", result.report_html.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    assert len(re.findall(r"<table", dom)) == 2 and "student.int8.onnx" in dom
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', dom)) >= 1
    screenshot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={screenshot}", "--window-size=1300,2400",
                    result.report_html.as_uri()], capture_output=True, timeout=120)
    assert screenshot.exists() and screenshot.stat().st_size > 20_000  # a rendered page, not a blank one
