import typer
from typer.testing import CliRunner

from rslad_edge import __version__
from rslad_edge.cli import app

runner = CliRunner()


STAGES_AND_MODELS = {"distill", "export", "verify", "bench", "pipeline", "models"}


def commands_panel(help_text: str) -> set[str]:
    """The command names listed in the "Commands" panel of Rich's --help (not words from the help text)."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("╭─ Commands"))
    names = set()
    for line in lines[start + 1 :]:
        if line.startswith("╰"):
            break
        cell = line.strip("│")
        if cell.startswith(" ") and not cell.startswith("  "):  # a command's row; wrapped descriptions are indented
            names.add(cell.split()[0])
    return names


def test_help_lists_every_stage_and_models():
    assert set(typer.main.get_command(app).commands) == STAGES_AND_MODELS  # what is mounted
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert commands_panel(result.output) == STAGES_AND_MODELS  # what --help shows as commands


def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_models_lists_every_architecture_with_its_parameter_count():
    result = runner.invoke(app, ["models"], terminal_width=200)
    assert result.exit_code == 0
    rows = {cells[0]: cells[1] for line in result.output.splitlines()
            if len(cells := [cell.strip() for cell in line.strip("│┃ ").split("│")]) > 1}
    for name, count in [("resnet18", "11,173,962"), ("mobilenetv2", "2,296,922"), ("wrn-34-10", "46,160,474"),
                        ("wrn-70-16", "266,888,756"), ("resnet50", "23,520,842"), ("smallcnn", "61,338"),
                        ("smallcnn-wide", "242,474")]:
        assert rows.get(name) == count, (name, rows.get(name))  # the count on the architecture's own row


def test_unknown_command_is_a_usage_error():
    result = runner.invoke(app, ["distil"])
    assert result.exit_code == 2
