"""``--mix-rows`` (``distill.data.mixing``): mixed rows are convex mixes of two other rows of the
batch (recovered by brute force over every pair), with uniform pairs and mixing weights; the engine
adds them only when there is a teacher, the teacher scores them on the same view (live, or beside
the cached rows), the task losses never see them; a resumed training draws the same mixes, and one
with another number of them is refused."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distill.config_load import load_config
from distill.data.mixing import MIXED, with_mixed_rows
from distill.data.unlabeled import UNLABELED
from distill.engine import TrainSettings, fit
from distill.errors import DistillError
from distill.objective import distillation_fields
from distill.teachers.frozen import TorchTeacher
from distill.training import train_settings
from tests.test_engine import CrossEntropy, batches, dataset, steps_per_epoch, tiny_model  # noqa: F401 (fixture)


def recover_mix(row: torch.Tensor, images: torch.Tensor) -> tuple[int, int, float, float]:
    """The pair (a, b), a != b, and lam in [0, 1] with ``row = lam x_a + (1 - lam) x_b`` that fit best
    (least squares over every ordered pair, float64), and the residual."""
    best = None
    x = images.double().flatten(1)
    r = row.double().flatten()
    for a, b in itertools.permutations(range(len(images)), 2):
        d = x[a] - x[b]
        lam = float(((r - x[b]) @ d) / (d @ d))
        lam = min(max(lam, 0.0), 1.0)
        residual = float((r - lam * x[a] - (1 - lam) * x[b]).abs().max())
        if best is None or residual < best[3]:
            best = (a, b, lam, residual)
    return best


def test_each_mixed_row_is_a_convex_mix_of_two_other_rows_and_marked_unlabeled():
    torch.manual_seed(0)
    images, labels, indices = torch.randn(6, 3, 4, 2), torch.tensor([0, 0, 1, 1, 2, 2]), torch.arange(10, 16)
    out, out_labels, out_indices = with_mixed_rows(images, labels, indices, 5)
    assert out.shape == (11, 3, 4, 2)
    assert torch.equal(out[:6], images) and torch.equal(out_labels[:6], labels) and torch.equal(out_indices[:6], indices)
    assert out_labels[6:].tolist() == [UNLABELED] * 5 and out_indices[6:].tolist() == [MIXED] * 5
    for row in out[6:]:
        a, b, lam, residual = recover_mix(row, images)
        assert a != b and 0.0 <= lam <= 1.0 and residual < 1e-5


def test_pairs_are_uniform_over_distinct_rows_and_the_weights_uniform_on_0_1():
    torch.manual_seed(1)
    rows, n = 4, 6000
    images = torch.eye(rows).view(rows, 1, 1, rows)  # a mix's pixels are its weights: lam at a, 1 - lam at b
    out = with_mixed_rows(images, torch.zeros(rows, dtype=torch.long), torch.arange(rows), n)[0][rows:].view(n, rows)
    assert torch.allclose(out.sum(1), torch.ones(n)) and ((out > 0).sum(1) <= 2).all()
    first, second = out.argmax(1), (out - 2 * torch.nn.functional.one_hot(out.argmax(1), rows)).argmax(1)
    pairs = torch.stack([first, second], 1).sort(1).values  # the unordered pair
    counts = torch.tensor([int(((pairs[:, 0] == a) & (pairs[:, 1] == b)).sum()) for a, b in itertools.combinations(range(rows), 2)])
    assert counts.sum() == n and (abs(counts - n / 6) < 5 * (n / 6) ** 0.5).all()  # 6 pairs, each ~1000 +- 5 sd
    heavier = out.max(1).values  # max(lam, 1 - lam) is uniform on [0.5, 1] when lam is uniform on [0, 1]
    assert abs(float(heavier.mean()) - 0.75) < 0.01 and abs(float((heavier < 0.625).float().mean()) - 0.25) < 0.03


def test_no_rows_asked_returns_the_batch_itself_and_one_row_cannot_be_mixed():
    images, labels, indices = torch.randn(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), torch.arange(3)
    assert with_mixed_rows(images, labels, indices, 0) == (images, labels, indices)
    with pytest.raises(ValueError, match="mixing needs at least 2 rows in a batch, got 1"):
        with_mixed_rows(images[:1], labels[:1], indices[:1], 2)


class Recorder(CrossEntropy):
    """Cross-entropy of the labeled rows; records the labels and teacher outputs of every step."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, emb, logits, labels, teacher_out=None):
        self.seen.append((labels.clone(), None if teacher_out is None else teacher_out[0].clone()))
        lab = labels >= 0
        return super().forward(emb[lab], logits[lab], labels[lab])


class Teacher:
    """Scores any image (its embedding: the mean of each channel), and remembers the images and indices it got."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, images, indices):
        self.calls.append((images.clone(), indices.clone()))
        return images.mean((2, 3)), None


def test_the_engine_adds_mixed_rows_only_with_a_teacher_and_the_teacher_scores_the_mixed_view(dataset, tmp_path):
    settings = TrainSettings(epochs=1, lr=1e-2, seed=3, mix_rows=5)
    teacher, objective = Teacher(), Recorder()
    _, summary = fit(tiny_model(6), objective, dataset, batches(dataset), settings, tmp_path / "a.ckpt", teacher_fn=teacher)
    assert len(teacher.calls) == len(objective.seen) == steps_per_epoch(dataset)
    for (images, indices), (labels, t_emb) in zip(teacher.calls, objective.seen):
        assert len(images) == 12 + 5 and indices[12:].tolist() == [MIXED] * 5 and (indices[:12] >= 0).all()
        assert labels[12:].tolist() == [UNLABELED] * 5 and (labels[:12] >= 0).all()
        assert torch.equal(t_emb, images.mean((2, 3)))  # the teacher's outputs are on the rows the student gets
        for row in images[12:]:
            assert recover_mix(row, images[:12])[3] < 1e-5

    plain = Recorder()
    fit(tiny_model(6), plain, dataset, batches(dataset), settings, tmp_path / "b.ckpt")  # no teacher: nothing to match
    assert all(len(labels) == 12 and t_emb is None for labels, t_emb in plain.seen)


class Interrupted(Recorder):
    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after

    def forward(self, emb, logits, labels, teacher_out=None):
        if len(self.seen) == self.after:
            raise KeyboardInterrupt
        return super().forward(emb, logits, labels, teacher_out)


def test_a_resumed_training_with_mixed_rows_continues_bit_for_bit(dataset, tmp_path):
    def settings(resume: bool = False) -> TrainSettings:
        return TrainSettings(epochs=3, lr=1e-2, seed=3, mix_rows=4, resume=resume)

    straight, _ = fit(tiny_model(6), Recorder(), dataset, batches(dataset), settings(), tmp_path / "a.ckpt", teacher_fn=Teacher())
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(6), Interrupted(steps_per_epoch(dataset) + 1), dataset, batches(dataset), settings(),
            tmp_path / "b.ckpt", teacher_fn=Teacher())
    resumed, _ = fit(tiny_model(6), Recorder(), dataset, batches(dataset), settings(resume=True), tmp_path / "b.ckpt",
                     teacher_fn=Teacher())
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_cached_teacher_scores_the_mixed_rows_live_beside_the_stored_ones(tmp_path, monkeypatch):
    import distill.students.train as train_module

    class Frozen(nn.Module):
        embed_dim, num_classes = 3, 3

        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, images):
            return self.scale * images.mean((2, 3)), images.amax((2, 3))

    torch.manual_seed(0)
    stored = (torch.randn(10, 3), torch.randn(10, 3))  # the cache of a 10-image training set
    monkeypatch.setattr(train_module, "cached_outputs", lambda key, folder, compute: (stored, True))
    monkeypatch.setattr(train_module, "cache_key", lambda *args: "key")
    training_set = SimpleNamespace(samples=[])  # un-augmented: the training set is its own plain twin
    lookup = train_module.teacher_outputs(load_config(None, out=str(tmp_path)), TorchTeacher("frozen", Frozen(), "f"), training_set, training_set,
                                          None, torch.device("cpu"))
    rows = [0, 2, 4, 6, 8, 9]
    images, _, indices = with_mixed_rows(torch.randn(6, 3, 4, 2), torch.zeros(6, dtype=torch.long), torch.tensor(rows), 3)
    emb, logits = lookup(images, indices)
    assert torch.equal(emb[:6], stored[0][rows]) and torch.equal(logits[:6], stored[1][rows])
    assert torch.equal(emb[6:], 2 * images[6:].mean((2, 3))) and torch.equal(logits[6:], images[6:].amax((2, 3)))


def test_mix_rows_belongs_to_the_distillation_and_cannot_be_negative():
    assert "mix_rows" in distillation_fields()  # left out of a baseline's recipe: it never mixes
    with pytest.raises(DistillError, match=r"^mix_rows \(--mix-rows\) must be >= 0, got -1$"):
        load_config(None, mix_rows=-1)


def test_the_default_mixes_a_batch_of_images_into_the_distilled_student_and_nothing_into_the_teacher():
    cpu = torch.device("cpu")
    assert train_settings(load_config(None), cpu).mix_rows == 64  # batch 64
    assert train_settings(load_config(None, batch_size=12), cpu).mix_rows == 12
    assert train_settings(load_config(None, mix_rows=0), cpu).mix_rows == 0
    assert train_settings(load_config(None, mix_rows=5), cpu).mix_rows == 5
    assert train_settings(load_config(None), cpu, teacher=True).mix_rows == 0


def test_resume_refuses_a_checkpoint_made_with_another_number_of_mixed_rows(dataset, tmp_path):
    ckpt = tmp_path / "m.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(6), Interrupted(steps_per_epoch(dataset) + 1), dataset, batches(dataset),
            TrainSettings(epochs=3, lr=1e-2, seed=3, mix_rows=4), ckpt, teacher_fn=Teacher())
    with pytest.raises(DistillError, match=r"other settings or data: mix_rows=4 \(now 2\) \("):
        fit(tiny_model(6), Recorder(), dataset, batches(dataset), TrainSettings(epochs=3, lr=1e-2, seed=3, mix_rows=2, resume=True),
            ckpt, teacher_fn=Teacher())
    # without a teacher nothing is mixed, whatever mix_rows says: a training without one resumes under any
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(6), Interrupted(steps_per_epoch(dataset) + 1), dataset, batches(dataset),
            TrainSettings(epochs=3, lr=1e-2, seed=3, mix_rows=4), tmp_path / "plain.ckpt")
    fit(tiny_model(6), Recorder(), dataset, batches(dataset), TrainSettings(epochs=3, lr=1e-2, seed=3, mix_rows=2, resume=True),
        tmp_path / "plain.ckpt")
