"""Every ``distill ...`` command shown in README.md and docs/*.md parses and validates: options
exist and have the right types, the config (files, recipes, students, teacher) passes the checks
a run does before training. So a documented command never fails with a bad-option error."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
import typer
from typer.testing import CliRunner

from distill.cli import app
from distill.models import save_model
from distill.students import create_student

ROOT = Path(__file__).resolve().parents[1]
CONFIG_COMMANDS = ("run", "study", "train", "train-teacher")
FILE_SUFFIXES = (".pt", ".pth", ".safetensors", ".onnx")


SHELL_BLOCKS = ("", "bash", "sh", "console", "shell")


def documented_commands() -> list[tuple[str, list[str]]]:
    """``(where, argv after 'distill')`` for each command line in the fenced code blocks of the docs.

    Shell blocks only (no language, bash, sh, console). Lines joined at a trailing backslash, comments dropped; ``torchrun ... -m distill.cli ARGS`` counts
    as ``distill ARGS``. Lines with placeholders (``...``, ``a|b`` alternatives) are not commands."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        fenced, shell, pending = False, False, ""
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                shell = fenced and line.strip()[3:] in SHELL_BLOCKS
                continue
            if not shell:  # prose, or a block of TOML or Python (``distill = "kd=3"`` is not a command)
                continue
            line = pending + line.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            for segment in line.split("&&"):
                if not segment.strip().startswith(("distill ", "torchrun ")):
                    continue
                argv = shlex.split(segment, comments=True)
                if "distill.cli" in argv:
                    argv = ["distill", *argv[argv.index("distill.cli") + 1:]]
                if argv[:1] != ["distill"] or "..." in segment or re.search(r"\w\|\w", segment):
                    continue
                found.append((f"{path.name}:{number}", argv[1:]))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    shown = {argv[0] for _, argv in COMMANDS if argv}
    assert {"run", "study", "eval", "export", "bench", "report", "list", "train-teacher"} <= shown, shown


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working directory with the repository's examples, where a command's outputs go, and
    stand-ins for the pipeline stages after the checks (nothing trains)."""
    from distill import run, study, study_output
    from distill.students import train
    from distill.teachers import acquire

    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    checked = []

    def setup(cfg, scratch_teacher=False):
        run.check_models(cfg, scratch_teacher)
        checked.append(cfg)
        return cfg, None, None

    monkeypatch.setattr(run, "run", setup)
    monkeypatch.setattr(run, "setup", setup)
    monkeypatch.setattr(acquire, "acquire_teacher", lambda *a, **k: SimpleNamespace(teacher=None))
    monkeypatch.setattr(train, "train_student", lambda *a, **k: None)
    monkeypatch.setattr(study, "run_study", lambda base, recipes, **k: checked.extend([base, *(c for _, c in recipes.values())]))
    monkeypatch.setattr(study_output, "print_study", lambda result: None)
    return checked


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses_and_validates(where, argv, sandbox):
    for option, arg in zip(("",) + tuple(argv), argv):  # files the command names: stand-ins (check_models looks for them)
        path = Path(arg.removeprefix("onnx:"))
        if path.suffix in FILE_SUFFIXES and not path.is_absolute() and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            if option == "--student-weights" and path.suffix == ".pt":  # read before training: a real student file
                save_model(path, create_student("nin_bn", 16, 2, width=0.25), arch="nin_bn", width=0.25)
            else:
                path.write_bytes(b"")
    if argv[0] in CONFIG_COMMANDS:
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, f"{where}: distill {shlex.join(argv)}\n{result.output}"
        assert sandbox, "the command checked no config"
    else:  # eval/export/bench/report read files the docs only name: their options must parse
        group = typer.main.get_command(app)
        with group.make_context("distill", list(argv)) as ctx:
            command = group.get_command(ctx, argv[0])
            assert command is not None, f"{where}: no command {argv[0]}"
            try:
                command.make_context(argv[0], list(argv[1:]), parent=ctx)
            except click.UsageError as err:
                pytest.fail(f"{where}: distill {shlex.join(argv)}: {err.format_message()}")
