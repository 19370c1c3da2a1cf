"""Checkpoints: weights_only loading (no code from files), one-line refusals, RNG round trip,
stale temp files, a full disk, and a previous metrics log kept until a new one replaces it."""

from __future__ import annotations

import errno
import json
import os
import random
import warnings

import numpy as np
import pytest
import torch

from distill.checkpoint import load_checkpoint, remove_stale_temp_files, rng_state, save_checkpoint, set_rng_state
from distill.engine import fit
from distill.errors import DistillError
from tests.test_engine import CrossEntropy, Exploding, batches, dataset, settings, steps_per_epoch, tiny_model  # noqa: F401


class CreatesFile:
    """A pickle that, if ever unpickled without ``weights_only``, creates ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_refuses_a_malicious_pickle_without_running_it(dataset, tmp_path):
    ckpt, victim = tmp_path / "m.ckpt", tmp_path / "pwned"
    torch.save({"model": {}, "objective": {}, "optimizer": {}, "scheduler": {}, "rng": CreatesFile(str(victim)), "epoch": 0}, ckpt)
    with pytest.raises(DistillError) as err:
        fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(2, resume=True), ckpt)
    message = str(err.value)
    assert message.startswith(f"cannot resume from {ckpt}: it holds pickled objects, which are never loaded (")
    assert "open)" in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert "\n" not in message
    assert not victim.exists()


def one_line_refusal(ckpt, err) -> str:
    message = str(err.value)
    assert message.startswith(f"cannot resume from {ckpt}: ")
    assert message.endswith(f"(delete {ckpt} to start afresh, or run without --resume)")
    assert "\n" not in message
    return message


def test_resume_from_an_empty_or_garbage_file_is_one_line(tmp_path):
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(DistillError) as err:
        load_checkpoint(ckpt)
    assert "the file is empty or cut short" in one_line_refusal(ckpt, err)
    ckpt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(DistillError) as err:
        load_checkpoint(ckpt)
    one_line_refusal(ckpt, err)


def test_resume_from_a_truncated_checkpoint_is_one_line(dataset, tmp_path):
    ckpt = tmp_path / "m.ckpt"
    fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(1), ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(DistillError) as err:
        fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(2, resume=True), ckpt)
    one_line_refusal(ckpt, err)


def test_a_foreign_checkpoint_names_what_it_lacks(tmp_path):
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    with pytest.raises(DistillError, match=r"it is not a distill checkpoint \(no model, objective, optimizer, scheduler, rng, epoch\)"):
        load_checkpoint(ckpt)


def test_rng_state_loads_with_weights_only_and_restores_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # a cached Gaussian makes numpy's state carry has_gauss=1
    state = rng_state()
    expected = (random.random(), np.random.randn(), np.random.rand(3).tolist(), torch.rand(3))
    path = save_checkpoint(tmp_path / "r.ckpt", {"rng": state})
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    got = (random.random(), np.random.randn(), np.random.rand(3).tolist(), torch.rand(3))
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = save_checkpoint(tmp_path / "m.ckpt", {"epoch": 1})

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)  # atomic_torch_save imports torch when it saves
    with pytest.raises(DistillError, match=r"^cannot write checkpoint .*m\.ckpt: No space left on device; the previous"):
        save_checkpoint(ckpt, {"epoch": 2})
    assert torch.load(ckpt, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.ckpt"]


def test_stale_temp_files_are_removed_with_a_warning(tmp_path):
    (tmp_path / ".teacher.ckpt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "teacher.ckpt").write_bytes(b"kept")
    (tmp_path / "notes.tmp").write_text("not ours: no leading dot")
    with pytest.warns(UserWarning, match=r"removed 1 temp file\(s\) left by an interrupted run: \.teacher\.ckpt\.abc123\.tmp"):
        removed = remove_stale_temp_files(tmp_path)
    assert [p.name for p in removed] == [".teacher.ckpt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp", "teacher.ckpt"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert remove_stale_temp_files(tmp_path) == []


def test_a_failed_run_keeps_the_previous_log(dataset, tmp_path):
    ckpt = tmp_path / "m.ckpt"
    fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(2), ckpt)
    before = ckpt.with_suffix(".jsonl").read_text()
    with pytest.raises(DistillError, match="loss became nan at epoch 1"):
        fit(tiny_model(6), Exploding(good=steps_per_epoch(dataset) // 2), dataset, batches(dataset), settings(2), ckpt)
    assert ckpt.with_suffix(".jsonl").read_text() == before
    assert [json.loads(line)["epoch"] for line in before.splitlines()] == [1, 2]
