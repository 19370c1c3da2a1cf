"""Checkpoints that cannot mix runs or lose progress (issue 20 items 1-3) and small run folders:
``--resume`` refuses a checkpoint made with other settings or data, a rerun without it never
throws an unfinished checkpoint away (``--fresh`` starts over, keeping it until passed), finished
checkpoints are deleted (``--keep-checkpoints`` keeps them), every command that writes into
``--out`` takes its lock, and a study keeps per-seed model files only with ``--keep-models``."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from typer.testing import CliRunner

from distill import bench, engine, study
from distill.cli import app
from distill.config_load import load_config
from distill.data import base
from distill.data.synthetic import load_synthetic
from distill.engine import TrainSettings, fit
from distill.errors import DistillError
from distill.outdir import locked_out_dir

from test_engine import CrossEntropy, Interrupted, batches, dataset, steps_per_epoch, tiny_model  # noqa: F401 (fixture)

runner = CliRunner()
TINY = ["--image-size", "32x16", "--epochs", "1", "--teacher-epochs", "2", "--batch-size", "16", "--bench-iters", "2",
        "--min-steps", "0", "--teacher-min-steps", "0", "--no-clustering", "--no-retry-lr"]


@pytest.fixture
def tiny_data(monkeypatch):
    """`synthetic` shrunk to 8 train / 4 test identities (as in test_cli)."""
    small = dict(train_ids=8, test_ids=4, images_per_id=8, height=32, width=16)
    monkeypatch.setitem(base._LOADERS, "synthetic", lambda path=None, **o: load_synthetic(path, **small))
    monkeypatch.setattr(bench, "BUDGET_S", 0.0)


def settings(epochs: int = 3, seed: int = 3, resume: bool = False, fresh: bool = False) -> TrainSettings:
    return TrainSettings(epochs=epochs, lr=1e-2, seed=seed, resume=resume, fresh=fresh)


def interrupted_run(dataset, ckpt, epochs: int = 3, after_epochs: int = 1, **kw) -> None:
    """Train until Ctrl-C in the epoch after ``after_epochs`` finished ones (their checkpoint is kept)."""
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(6), Interrupted(after=after_epochs * steps_per_epoch(dataset) + 1), dataset, batches(dataset),
            settings(epochs, **kw), ckpt)


# ---------------------------------------------------------------- item 1: --resume refuses another recipe


@pytest.mark.parametrize("changed, named", [
    (dict(seed=4), "seed=3 (now 4)"),
    (dict(epochs=5), "epochs=3 (now 5)"),
])
def test_resume_refuses_a_checkpoint_made_with_other_settings_naming_them(dataset, tmp_path, changed, named):
    ckpt = tmp_path / "m.ckpt"
    interrupted_run(dataset, ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(DistillError) as err:
        fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(**(dict(epochs=3, seed=3) | changed), resume=True), ckpt)
    message = str(err.value)
    assert message == (f"cannot resume from {ckpt}: it was made with other settings or data: {named} "
                       "(rerun with those to continue it, or start over with --fresh)")
    assert "\n" not in message and ckpt.read_bytes() == before


def test_resume_refuses_other_data_and_names_every_difference(dataset, tmp_path):
    ckpt = tmp_path / "m.ckpt"
    recipe = {"kd_weight": 3.0, "data_fingerprint": "aaaa"}
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(6), Interrupted(after=steps_per_epoch(dataset) + 1), dataset, batches(dataset), settings(), ckpt, recipe=recipe)
    with pytest.raises(DistillError, match=r"other settings or data: kd_weight=3.0 \(now 0.0\); data_fingerprint=\"aaaa\" \(now \"bbbb\"\) \("):
        fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(resume=True), ckpt,
            recipe={"kd_weight": 0.0, "data_fingerprint": "bbbb"})
    # the same recipe resumes
    fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(resume=True), ckpt, recipe=recipe)


def test_cli_resume_with_another_seed_or_loss_is_refused_and_keeps_teacher_pt(tiny_data, tmp_path):
    out = tmp_path / "r"
    first = runner.invoke(app, ["run", "--out", str(out), "--keep-checkpoints", *TINY])
    assert first.exit_code == 0, first.output
    teacher = (out / "teacher.pt").read_bytes()
    header = torch.load(out / "teacher.pt", weights_only=True)["meta"]["recipe"]
    assert header["seed"] == 0

    reseeded = runner.invoke(app, ["run", "--out", str(out), "--seed", "1", "--resume", *TINY])
    assert reseeded.exit_code == 2
    line = reseeded.output.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot resume from {out / 'teacher.ckpt'}: it was made with other settings or data: seed=0 (now 1)")
    assert (out / "teacher.pt").read_bytes() == teacher  # its recipe still says seed 0

    no_kd = runner.invoke(app, ["run", "--out", str(out), "--distill", "darkrank=0.02", "--darkrank", "soft", "--darkrank-list-size", "8", "--resume", *TINY])
    assert no_kd.exit_code == 2
    text = " ".join(no_kd.output.split())
    assert (f"error: cannot resume from {out / 'student.ckpt'}: it was made with other settings or data: "
            f"distill=\"kd=3,darkrank=0.02\" (now \"darkrank=0.02\"); darkrank=\"hard\" (now \"soft\"); darkrank_list_size=null (now 8)") in text
    assert (out / "teacher.pt").read_bytes() == teacher


# ---------------------------------------------------------------- item 2: no silent loss of progress


def test_a_rerun_without_resume_refuses_to_throw_away_an_unfinished_checkpoint(dataset, tmp_path):
    ckpt = tmp_path / "m.ckpt"
    interrupted_run(dataset, ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(DistillError) as err:
        fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(), ckpt)
    assert str(err.value) == (f"{ckpt} holds an unfinished training (1 of 3 epochs done): continue it with --resume, "
                              "or start over with --fresh (it is kept until the new run passes epoch 1)")
    with pytest.raises(DistillError, match=r"\(1 of 3 epochs done\): it was made with other settings or data \(seed=3 \(now 9\)\): "
                                           r"rerun with those and --resume to continue it, or start over with --fresh"):
        fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(seed=9), ckpt)
    assert ckpt.read_bytes() == before


def test_fresh_keeps_the_unfinished_checkpoint_until_the_new_run_passes_it(dataset, tmp_path):
    ckpt = tmp_path / "m.ckpt"
    interrupted_run(dataset, ckpt, epochs=4, after_epochs=2)  # the old run got 2 of 4 epochs done
    old = ckpt.read_bytes()
    interrupted_run(dataset, ckpt, epochs=4, after_epochs=2, seed=5, fresh=True)  # a fresh run killed at the same point
    assert ckpt.read_bytes() == old
    interrupted_run(dataset, ckpt, epochs=4, after_epochs=3, seed=5, fresh=True)  # this one passed it
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 2 and state["recipe"]["seed"] == 5
    # and it resumes bit-for-bit: the same as the seed-5 run straight through
    resumed, _ = fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(4, seed=5, resume=True), ckpt)
    straight, _ = fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(4, seed=5), tmp_path / "s.ckpt")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_long_trainings_checkpoint_at_the_validation_cadence_and_resume_bit_for_bit(dataset, tmp_path):
    """42 epochs: a checkpoint every ceil(42 / 20) = 3 epochs, so Ctrl-C in epoch 5 resumes from epoch 3."""
    ckpt = tmp_path / "m.ckpt"
    assert engine._val_every(42) == 3
    interrupted_run(dataset, ckpt, epochs=42, after_epochs=4)
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 2  # epochs 1-3 done (0-based 2): epoch 4 was not checkpointed
    assert len(ckpt.with_suffix(".jsonl").read_text().splitlines()) == 3  # the log matches the checkpoint
    resumed, _ = fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(42, resume=True), ckpt)
    straight, _ = fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(42), tmp_path / "s.ckpt")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_resume_and_fresh_together_are_refused():
    with pytest.raises(DistillError, match="give one of them"):
        load_config(None, resume=True, fresh=True)


# ---------------------------------------------------------------- issue 23: small run folders


def test_checkpoints_go_after_success_and_stay_after_an_interruption_for_resume(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_epoch, calls = engine._train_epoch, []

    def ctrl_c_in_teacher_epoch_2(*args):
        calls.append(inspect.signature(real_epoch).bind(*args).arguments["desc"])
        if calls.count("teacher") == 2:
            raise KeyboardInterrupt
        return real_epoch(*args)

    monkeypatch.setattr(engine, "_train_epoch", ctrl_c_in_teacher_epoch_2)
    stopped = runner.invoke(app, ["run", "--out", str(out), *TINY])
    assert stopped.exit_code == 130, stopped.output
    assert torch.load(out / "teacher.ckpt", weights_only=True)["epoch"] == 0
    kept = (out / "teacher.ckpt").read_bytes()
    monkeypatch.setattr(engine, "_train_epoch", real_epoch)

    rerun = runner.invoke(app, ["run", "--out", str(out), *TINY])
    assert rerun.exit_code == 2
    assert "holds an unfinished training (1 of 2 epochs done): continue it with --resume" in " ".join(rerun.output.split())
    assert (out / "teacher.ckpt").read_bytes() == kept

    resumed = runner.invoke(app, ["run", "--out", str(out), "--resume", *TINY])
    assert resumed.exit_code == 0, resumed.output
    assert sorted(p.name for p in out.glob("*.ckpt")) == []  # each deleted once its model file was written
    assert {"teacher.pt", "student.pt", "teacher.jsonl", "student.jsonl", "student_baseline.jsonl"} <= {p.name for p in out.iterdir()}
    assert [json.loads(line)["epoch"] for line in (out / "teacher.jsonl").read_text().splitlines()] == [1, 2]

    kept_run = runner.invoke(app, ["run", "--out", str(tmp_path / "k"), "--keep-checkpoints", *TINY])
    assert kept_run.exit_code == 0, kept_run.output
    assert sorted(p.name for p in (tmp_path / "k").glob("*.ckpt")) == ["student.ckpt", "student_baseline.ckpt", "teacher.ckpt"]
    assert (tmp_path / "k" / "cache").is_dir()  # the teacher-output cache too
    kept_all = runner.invoke(app, ["run", "--out", str(tmp_path / "k"), "--keep-comparison-files", *TINY])
    assert kept_all.exit_code == 0, kept_all.output
    assert "removed_files" not in json.loads((tmp_path / "k" / "report.json").read_text())
    assert all((tmp_path / "k" / name).is_file() for name in ("teacher.onnx", "student_baseline.pt", "student_baseline.onnx"))


def test_a_study_keeps_per_seed_models_only_when_asked(tiny_data, tmp_path):
    tiny = dict(image_size="32x16", epochs=1, teacher_epochs=1, batch_size=16, min_steps=0, teacher_min_steps=0, clustering=False,
                retry_lr=False)
    cfg = load_config(None, out=str(tmp_path / "s"), **tiny)
    study.run_study(cfg, study.recipe_configs(cfg, ["kd"]), seeds=1)
    models = tmp_path / "s" / "study" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["baseline-seed0.jsonl", "kd-seed0.jsonl"]
    assert not list((tmp_path / "s").glob("*.ckpt"))

    kept = load_config(None, out=str(tmp_path / "k"), **tiny)
    study.run_study(kept, study.recipe_configs(kept, ["kd"]), seeds=1, keep_models=True)
    assert sorted(p.name for p in (tmp_path / "k" / "study" / "models").glob("*.pt")) == ["baseline-seed0.pt", "kd-seed0.pt"]


# ---------------------------------------------------------------- item 3: the --out lock


def test_study_takes_the_out_lock_like_run(tiny_data, tmp_path):
    out = tmp_path / "L2"
    with locked_out_dir(out):  # a run holds it
        at = TINY.index("--bench-iters")
        study_args = TINY[:at] + TINY[at + 2:]  # a study benchmarks nothing: it has no --bench-iters
        result = runner.invoke(app, ["study", "--recipes", "kd", "--seeds", "1", "--out", str(out), *study_args])
    assert result.exit_code == 2
    assert " ".join(result.output.split()).startswith(f"error: output directory {out} is in use by another distill run (pid ")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written into it
