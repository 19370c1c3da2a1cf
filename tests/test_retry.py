"""--retry-lr: a student that has not learnt is trained once more, from the start and the same seed,
at a third of the learning rate; the retry is that fresh training exactly, recorded and reported."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from distill import protocols
from distill.config import Config
from distill.models.file import read_model_file
from distill.report import selection_lines
from distill.run import setup
from distill.report.text import retry_note
from distill.selection import has_not_learnt
from distill.students import train
from test_cli import tiny_data  # noqa: F401  (fixture)

TINY = dict(image_size=(32, 16), epochs=2, batch_size=16, min_steps=0)


def constant_validator(monkeypatch) -> None:
    """Every model scores the same on every query: no training ever beats the untrained model."""
    monkeypatch.setattr(protocols.Protocol, "validator", lambda self, data, device: (lambda model: [0.2, 0.3, 0.1, 0.25]))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_student_that_has_not_learnt_is_the_fresh_training_at_a_third_of_the_lr(tiny_data, tmp_path, monkeypatch, capsys):  # noqa: F811
    constant_validator(monkeypatch)
    cfg, data, device = setup(Config(out=str(tmp_path / "a"), **TINY))
    model, fit = train.train_student(cfg, data, device, name="student_baseline")
    assert fit["retry"]["lr"] == pytest.approx(cfg.lr / 3) and fit["retry"]["first_lr"] == cfg.lr
    assert fit["retry"]["first"]["learnt"] is False and "retry" not in fit["retry"]["first"]
    assert has_not_learnt(fit)  # the retry did not learn either: kept, warned, not retried again
    err = " ".join(capsys.readouterr().err.split())
    assert f"student_baseline has not learnt at lr {cfg.lr:g}: training it again from the start at lr {cfg.lr / 3:g}" in err
    assert err.count("training it again") == 1

    fresh_cfg, _, _ = setup(Config(out=str(tmp_path / "b"), lr=cfg.lr / 3, retry_lr=False, **TINY))
    fresh, fresh_fit = train.train_student(fresh_cfg, data, device, name="student_baseline")
    assert "retry" not in fresh_fit
    assert all(torch.equal(a, b) for a, b in zip(weights(model).values(), weights(fresh).values()))
    header, saved = read_model_file(tmp_path / "a" / "student_baseline.pt")
    assert all(torch.equal(saved[k], v) for k, v in weights(model).items()) and header["meta"]["fit"]["retry"]["lr"] == cfg.lr / 3
    assert not list((tmp_path / "a").glob("*.ckpt"))  # both trainings' checkpoints go once the model is written
    assert (tmp_path / "a" / "student_baseline.retry.jsonl").is_file()


def test_no_retry_without_the_option_and_checkpoints_kept_when_asked(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    constant_validator(monkeypatch)
    cfg, data, device = setup(Config(out=str(tmp_path), retry_lr=False, **TINY))
    _, fit = train.train_student(cfg, data, device)
    assert "retry" not in fit and fit["learnt"] is False
    cfg = replace(cfg, retry_lr=True, keep_checkpoints=True, out=str(tmp_path / "k"))
    cfg, _, _ = setup(cfg)
    train.train_student(cfg, data, device)
    assert sorted(p.name for p in (tmp_path / "k").glob("*.ckpt")) == ["student.ckpt", "student.retry.ckpt"]


def test_a_student_that_learns_is_not_retried(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    scores = iter(range(10**6))  # every validation round better than the last: the untrained one is the worst
    monkeypatch.setattr(protocols.Protocol, "validator",
                        lambda self, data, device: (lambda model: [0.1 * next(scores) + d for d in (0.0, 0.01, 0.02, 0.03)]))
    cfg, data, device = setup(Config(out=str(tmp_path), **TINY))
    _, fit = train.train_student(cfg, data, device)
    assert fit["learnt"] is True and "retry" not in fit


FIT = {"epochs": 12, "best_epoch": 12, "best_score": 0.090, "best_score_se": 0.01, "top_epoch": 12, "top_score": 0.090,
       "last_epoch": 12, "last_score": 0.090, "untrained_score": 0.011, "learnt": True,
       "retry": {"lr": 0.001, "first_lr": 0.003, "first": {"best_score": 0.016, "untrained_score": 0.011, "learnt": False}}}


def test_the_report_says_which_student_was_trained_again():
    assert retry_note(FIT) == ("trained again from the start at lr 0.001: at lr 0.003 it had not learnt "
                               "(kept 0.016, untrained 0.011)")
    line = selection_lines({"selection": {"student_baseline": FIT}})[0]
    assert line.endswith("untrained 0.011; trained again from the start at lr 0.001: at lr 0.003 it had not learnt "
                         "(kept 0.016, untrained 0.011)")
    assert retry_note({k: v for k, v in FIT.items() if k != "retry"}) is None


def test_a_run_stopped_during_the_retry_resumes_it_to_the_same_weights(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    from distill import engine

    constant_validator(monkeypatch)
    cfg, data, device = setup(Config(out=str(tmp_path / "whole"), **TINY))
    whole, _ = train.train_student(cfg, data, device)

    real_epoch, calls = engine._train_epoch, []

    def ctrl_c_in_the_retrys_second_epoch(*args):
        calls.append(1)
        if len(calls) == 4:  # 2 epochs of the first training, then the retry's 2nd
            raise KeyboardInterrupt
        return real_epoch(*args)

    monkeypatch.setattr(engine, "_train_epoch", ctrl_c_in_the_retrys_second_epoch)
    stopped_cfg, _, _ = setup(Config(out=str(tmp_path / "stopped"), **TINY))
    with pytest.raises(KeyboardInterrupt):
        train.train_student(stopped_cfg, data, device)
    assert sorted(p.name for p in (tmp_path / "stopped").glob("*.ckpt")) == ["student.ckpt", "student.retry.ckpt"]
    monkeypatch.setattr(engine, "_train_epoch", real_epoch)
    resumed, fit = train.train_student(replace(stopped_cfg, resume=True), data, device)
    assert fit["retry"]["lr"] == pytest.approx(cfg.lr / 3)
    assert all(torch.equal(a, b) for a, b in zip(weights(whole).values(), weights(resumed).values()))
