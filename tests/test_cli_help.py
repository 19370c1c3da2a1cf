"""What a person reads: ``--help`` by section at 80 columns, only the options a command reads,
docs/cli.md generated from the commands, and full lines in a log file."""

from __future__ import annotations

import dataclasses
import fcntl
import io
import os
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from distill.cli import app
from distill.cli_reference import REFERENCE, reference_markdown
from distill.config import COMMAND_STAGES, SECTIONS, Config, command_fields, field_info, flag_name
from distill.console import LOG_WIDTH, make_console

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def commands() -> dict:
    group = typer.main.get_command(app)
    ctx = group.make_context("distill", [], resilient_parsing=True)
    return {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}


def option_names(command) -> set[str]:
    """Every ``--name`` a command shows, ``--no-name`` switches included (not the hidden, replaced ones)."""
    shown = [p for p in command.params if not getattr(p, "hidden", False)]
    return {name for p in shown for name in (*p.opts, *p.secondary_opts) if name.startswith("--")}


def primary_names(command) -> set[str]:
    return {p.opts[0] for p in command.params if p.opts[0].startswith("--") and not getattr(p, "hidden", False)}


def config_flags(names) -> set[str]:
    return {flag_name(n) for n in names if field_info(n)["cli"]}


def test_run_help_at_80_columns_shows_every_option_whole_in_section_panels():
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in result.output
    words = set(result.output.replace("│", " ").replace(",", " ").split())
    missing = option_names(commands()["run"]) - words
    assert not missing, f"cut or missing at 80 columns: {sorted(missing)}"
    panels = [line.split("─ ")[1].split(" ─")[0] for line in lines if line.startswith("╭─ ")]
    assert panels == ["Options", *(s.capitalize() for s in SECTIONS)]
    assert "--teacher-min-steps INT" in result.output
    head = "\n".join(lines[:40])
    assert "╭─ Model" in head and "--teacher " in head  # grouped from the first screen on


def test_help_shows_defaults_as_the_docs_say():
    text = " ".join(runner.invoke(app, ["run", "--help"], env={"COLUMNS": "400"}).output.split())
    assert "(unset)" not in text
    for flag, shown in (("--darkrank-list-size INT", "all"), ("--image-size HxW", "auto: chosen from the data set"),
                        ("--val-fraction FLOAT", "0.2"), ("--teacher TEXT", "inception_bn"), ("--out TEXT", "runs/<name>"),
                        ("--epochs INT", "12 (24 with --augment standard), raised to --min-steps on small data sets")):
        after = text.split(flag, 1)[1]
        assert after.split("[default: ", 1)[1].startswith(shown + "]"), (flag, after[:200])


@pytest.mark.parametrize("command", list(COMMAND_STAGES))
def test_each_command_has_exactly_the_config_options_it_reads(command):
    names = primary_names(commands()[command])
    wanted = config_flags(command_fields(command))
    every = config_flags(f.name for f in dataclasses.fields(Config))
    assert names & every == wanted
    assert names - every <= {"--config", "--help", "--recipes", "--recipes-file", "--seeds", "--jobs", "--keep-models",
                                "--teacher-per-seed"}


def test_train_teacher_takes_no_student_distillation_or_export_option(tmp_path):
    names = option_names(commands()["train-teacher"])
    for flag in ("--export-precision", "--bench-iters", "--target-accuracy", "--distill", "--darkrank", "--student",
                 "--epochs", "--lr", "--unlabeled", "--baseline", "--gate-margin", "--clustering"):
        assert flag not in names, flag
    for flag in ("--teacher", "--teacher-epochs", "--teacher-lr", "--data", "--image-size", "--batch-size", "--seed", "--out"):
        assert flag in names, flag
    train = option_names(commands()["train"])
    assert not {"--export-precision", "--bench-iters", "--target-accuracy", "--clustering", "--gate-margin"} & train
    assert {"--distill", "--student", "--unlabeled", "--lr"} <= train
    result = runner.invoke(app, ["train-teacher", "--export-precision", "fp16", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "No such option: --export-precision" in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


def test_command_fields_follow_the_stages_of_a_run():
    order = ["train-teacher", "train", "study", "run"]
    sets = [set(command_fields(c)) for c in order]
    assert all(a < b for a, b in zip(sets, sets[1:]))  # each command reads more than the one before
    assert sets[-1] == {f.name for f in dataclasses.fields(Config)}
    assert all(field_info(n)["stage"] == "teacher" for n in command_fields("train-teacher"))
    assert not any(field_info(n)["section"] == "distillation" for n in command_fields("train-teacher"))
    assert not any(field_info(n)["section"] == "export and report" for n in command_fields("train"))


def test_every_field_has_help_a_known_section_and_is_an_option_of_run():
    run = option_names(commands()["run"])
    for f in dataclasses.fields(Config):
        meta = field_info(f.name)
        assert meta["help"].endswith(".") and meta["section"] in SECTIONS, f.name
        assert (flag_name(f.name) in run) == meta["cli"], f.name
    assert [f.name for f in dataclasses.fields(Config) if not field_info(f.name)["cli"]] == ["students"]


def test_docs_cli_md_is_generated_from_the_commands():
    assert REFERENCE == ROOT / "docs" / "cli.md"
    assert REFERENCE.read_text(encoding="utf-8") == reference_markdown(app), "run: python -m distill.cli_reference"


def test_every_option_of_every_command_is_in_docs_cli_md_with_help():
    text = REFERENCE.read_text(encoding="utf-8")
    parts = text.split("\n## distill ")[1:]
    documented = {part.split("\n", 1)[0]: part for part in parts}
    assert set(documented) == set(commands())
    for name, command in commands().items():
        for param in command.params:
            if param.hidden:
                continue
            assert param.help, f"distill {name} {param.name}: an option without help"
            for opt in (*param.opts, *param.secondary_opts) if param.opts[0].startswith("-") else (param.name.upper(),):
                assert f"`{opt}`" in documented[name], f"distill {name} {opt} is not in docs/cli.md"


def test_console_writes_full_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    buf = io.StringIO()
    console = make_console(file=buf)
    assert console.width == LOG_WIDTH
    console.print("word " * 60)
    assert buf.getvalue() == "word " * 60 + "\n"
    assert make_console(file=io.StringIO(), width=50).width == 50
    monkeypatch.setenv("COLUMNS", "70")
    assert make_console(file=io.StringIO()).width == 70  # asked for explicitly


def test_a_command_redirected_to_a_file_has_whole_lines_and_one_table(tmp_path):
    """``distill list`` (a table) and an error with a long path, stdout and stderr to files, stdin a
    60-column terminal (rich would take its width), no COLUMNS: nothing is wrapped or split."""
    primary, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"PYTHONPATH": str(ROOT)}
    missing = tmp_path / ("a-very-long-directory-name-" * 4) / "student.onnx"
    try:
        with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
            listed = subprocess.run([sys.executable, "-m", "distill.cli", "list"], stdin=secondary, stdout=out, stderr=err, env=env)
            failed = subprocess.run([sys.executable, "-m", "distill.cli", "eval", "--checkpoint", str(missing)],
                                    stdin=secondary, stdout=out, stderr=err, env=env)
    finally:
        os.close(primary)
        os.close(secondary)
    assert listed.returncode == 0 and failed.returncode == 2
    lines = (tmp_path / "out.log").read_text().splitlines()
    teachers = next(line for line in lines if "teachers" in line)
    assert "inception_bn, timm:NAME, torchvision:NAME, onnx:PATH" in teachers  # one row, not wrapped
    end = next(i for i, line in enumerate(lines) if line.startswith("└")) + 1
    names, losses = lines[:end], [line for line in lines[end:] if line.strip()]  # the names table, then the losses
    assert names[0].startswith("┏") and len(names) == 7  # top, header, rule, 3 rows, bottom
    for table in (names, losses):
        assert len({len(line) for line in table}) == 1  # one block: every line of the table as wide
    assert losses[0].startswith("┏") and losses[-1].startswith("└") and any(" darkrank " in line for line in losses)
    assert (tmp_path / "err.log").read_text() == f"error: ONNX file {missing} does not exist\n"
