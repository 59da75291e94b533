"""Each stage's typed config is the one source of its options: the command line, the config-file and pipeline keys
and the help's defaults all come from its fields."""

from __future__ import annotations

import pytest
import typer
import yaml
from typer.testing import CliRunner

from rslad_edge.bench.core import TimingConfig
from rslad_edge.bench.suite import BenchConfig, bench_artifacts
from rslad_edge.cli import app
from rslad_edge.distill.config import DistillConfig, load_yaml
from rslad_edge.errors import ConfigError, PipelineConfigError
from rslad_edge.export.config import DEFAULT_OPSET, ExportConfig
from rslad_edge.options import key_table, read_mapping, specs
from rslad_edge.pipeline.config import ExportSection, VerifySection, check_pipeline_config, load_pipeline_config
from rslad_edge.verify.run import VerifyConfig

runner = CliRunner()
CONFIGS = [DistillConfig, ExportConfig, VerifyConfig, BenchConfig, TimingConfig, ExportSection, VerifySection]


def flat_help(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"], terminal_width=250)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda cls: cls.__name__)
def test_every_field_is_an_option_whose_help_leaves_the_default_to_the_field(cls):
    import dataclasses

    assert [f.name for f in dataclasses.fields(cls)] == list(specs(cls))
    for spec in specs(cls).values():
        assert spec.option.help and "default:" not in spec.option.help.lower(), spec.name


def test_help_shows_each_config_default_and_where_a_preset_or_method_differs():
    distill = flat_help("distill")
    for text in ["SGD learning rate. [default: 0.1; smoke: 0.2]",
                 "Epochs. [default: 300; fast: 50; cpu-30min: 3; smoke: 4; ard, iad: 200; trades: 76]",
                 "[default: 8/255]", "Attack step size, pixel units. [default: 2/255; smoke: 4/255; trades: 0.007]",
                 "Method weight. [default: the method's; rslad: 0.8333; ard, iad: 1; kd: 0.9]",
                 "Training method: rslad, ard, iad, sat, trades, kd, natural.", "paper, fast, cpu-30min, smoke",
                 "rslad-edge distill --preset smoke --out runs/smoke"]:
        assert text in distill, text
    assert f"ONNX opset. [default: {DEFAULT_OPSET}]" in flat_help("export")
    assert "L-inf budget in pixel units: 8/255 or 0.031. [default: 8/255]" in flat_help("verify")
    bench = flat_help("bench")
    assert "Batch sizes, comma-separated. [default: 1,8,64]" in bench and "[default: 3]" in bench


def test_every_command_option_is_a_config_field_or_one_of_the_commands_own():
    commands = typer.main.get_command(app).commands

    def names(command):
        return {param.name for param in commands[command].params} - {"help"}

    assert names("distill") == set(specs(DistillConfig)) | {"config", "resume", "force"}
    assert names("export") == set(specs(ExportConfig)) | {"dynamic"}
    assert names("verify") == set(specs(VerifyConfig))
    assert names("bench") == {name for name, spec in specs(BenchConfig).items() if spec.option.cli} | {
        "artifacts", "host", "port", "identity", "known_hosts", "connect_timeout", "arch", "num_classes",
        "verify_json", "json_out", "plot", "keep_remote", "remote_timeout"}
    assert names("pipeline") == {"preset", "config", "out", "resume", "force", "print_config", "teacher",
                                 "teacher_arch", "data_root", "device"}


def test_a_config_file_takes_the_options_text_forms_and_flag_names(tmp_path):
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump({"eps": "8/255", "input-size": 96, "milestones": "3,4", "arch": "resnet18",
                                    "student-kwargs": "width_mult=0.5", "lr": 1}))
    values = load_yaml(path)
    assert values == {"eps": pytest.approx(8 / 255), "input_size": [96, 96], "milestones": [3, 4],
                      "teacher_arch": "resnet18", "student_kwargs": {"width_mult": 0.5}, "lr": 1}


@pytest.mark.parametrize("values, message", [
    ({"epochz": 3}, "here: unknown key 'epochz' (did you mean 'epochs'?)"),
    ({"lr": "fast"}, "here, key 'lr': expected a number, got 'fast'"),
    ({"milestones": [1, "x"]}, "here, key 'milestones': expected a list of integers, got [1, 'x']"),
    ({"eps": "8"}, "here, key 'eps': --eps=8 is larger than 1"),
    ({"compile": "yes"}, "here, key 'compile': expected true or false, got 'yes'"),
])
def test_a_bad_key_or_value_is_one_line_naming_where_and_the_key(values, message):
    with pytest.raises(ConfigError) as caught:
        read_mapping(values, key_table(DistillConfig), where="here")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_pipeline_sections_are_typed_configs_taking_flag_names_as_keys(tmp_path):
    sections = load_pipeline_config("smoke", overrides={"distill": {"arch": "resnet18", "teacher": "t.pt"},
                                                        "export": {"workspace": 4.0, "precisions": "fp32"},
                                                        "bench": {"batch": "2,4", "min_iters": 3}})
    cfg = check_pipeline_config(sections, tmp_path)
    assert isinstance(cfg.distill, DistillConfig) and cfg.distill.teacher_arch == "resnet18"
    assert [(type(e), e.precision, e.workspace_gib) for e in cfg.exports] == [(ExportConfig, "fp32", 4.0)]
    assert isinstance(cfg.verify_checkpoint, VerifyConfig) and isinstance(cfg.verify_export, VerifyConfig)
    assert isinstance(cfg.bench, BenchConfig) and (cfg.bench.batch, cfg.bench.min_iters) == ([2, 4], 3)
    with pytest.raises(PipelineConfigError, match=r"pipeline section 'verify': unknown key 'json' \(the pipeline"):
        check_pipeline_config(load_pipeline_config("smoke", overrides={"verify": {"json": "v.json"}}), tmp_path)


def test_bench_config_offers_timing_configs_options_and_round_trips_its_keyword_form():
    for name, timing_name in [("batch", "batches"), ("warmup", "warmup"), ("seconds", "seconds"),
                              ("min_iters", "min_iters")]:
        assert specs(BenchConfig)[name].option == specs(TimingConfig)[timing_name].option
    assert BenchConfig().timing == TimingConfig()
    cfg = BenchConfig(batch=[2], iters=5, threads=1, precision=["fp32", "bf16"])
    assert BenchConfig.from_options(**cfg.options()) == cfg
    with pytest.raises(ConfigError, match="--batch sizes must be >= 1"):
        BenchConfig(batch=[0])
    with pytest.raises(TypeError, match="not both"):
        bench_artifacts(["student.onnx"], cfg, batches=(1,))


def test_pipeline_search_and_its_qat_apply_to_the_int8_exports_only(tmp_path):
    sections = load_pipeline_config("smoke", overrides={"export": {"search": True, "search-budget": 3,
                                                                   "qat-epochs": 2}})
    cfg = check_pipeline_config(sections, tmp_path)
    assert [(e.precision, e.search, e.search_budget, e.qat_epochs) for e in cfg.exports] == [
        ("fp32", False, 3, 0), ("int8", True, 3, 2)]
    phones = check_pipeline_config(load_pipeline_config("smoke", overrides={"export": {
        "formats": ["onnx", "executorch"], "search": True, "qat-epochs": 2}}), tmp_path / "phones")
    assert [(e.format, e.precision, e.search, e.qat_epochs) for e in phones.exports] == [
        ("onnx", "fp32", False, 0), ("onnx", "int8", True, 2), ("executorch", "fp32", False, 0),
        ("executorch", "int8", True, 2)]  # a .pte is searched and trained too
    for preset in ("cifar10-rslad", "cifar100-rslad"):
        assert load_pipeline_config(preset)["export"]["search"] is True
        assert load_pipeline_config(preset)["export"]["qat_epochs"] > 0
    smoke = load_pipeline_config("smoke")["export"]  # both off in the smoke demo: minutes on a CPU
    assert "search" not in smoke and "qat_epochs" not in smoke
