"""Engine: training reduces the loss, resume is bit-for-bit on CPU, NaN stops with the checkpoint kept."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.data import load_dataset
from distill.data.dataset import ImageDataset, make_label_map
from distill.data.importance import ImportanceBatchSampler
from distill.data.samplers import PKSampler
from distill.data.transforms import build_transform
from distill.embedding import EmbeddingNet
from distill.engine import TrainSettings, extract, fit
from distill.errors import DistillError


class CrossEntropy(nn.Module):
    def forward(self, emb, logits, labels, teacher_out=None):
        loss = F.cross_entropy(logits, labels)
        return loss, {"ce": loss.item()}


class Exploding(CrossEntropy):
    """Finite for the first ``good`` steps, then NaN."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good, self.calls = good, 0

    def forward(self, emb, logits, labels, teacher_out=None):
        self.calls += 1
        loss, parts = super().forward(emb, logits, labels)
        return (loss if self.calls <= self.good else loss * float("nan")), parts


def tiny_model(num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    return EmbeddingNet(backbone, 8, 16, num_classes)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    s = load_dataset(f"synthetic:{root}", train_ids=6, test_ids=2, images_per_id=8, height=32, width=16)
    return ImageDataset(s.train, build_transform((32, 16), train=False, kind="reid"), make_label_map(s.train), preload=True)


def steps_per_epoch(dataset) -> int:
    return len(PKSampler(dataset.labels, p=3, k=4))


def batches(dataset, kind: str = "pk"):
    """Batches of 12: 3 identities x 4 images, or importance-sampled."""
    if kind == "importance":
        return ImportanceBatchSampler(dataset.labels, 12, seed=3)
    return PKSampler(dataset.labels, p=3, k=4, seed=3)


def settings(epochs: int, resume: bool = False) -> TrainSettings:
    return TrainSettings(epochs=epochs, lr=1e-2, seed=3, resume=resume)


def test_training_reduces_the_loss_and_logs_every_epoch(dataset, tmp_path):
    ckpt = tmp_path / "m.ckpt"
    fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(4), ckpt)
    log = [json.loads(line) for line in ckpt.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert log[-1]["loss"] < log[0]["loss"]
    assert {"ce", "lr", "images_per_s"} <= set(log[0])


def test_a_fresh_run_starts_a_fresh_log(dataset, tmp_path):
    ckpt = tmp_path / "m.ckpt"
    fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(2), ckpt)
    fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(1), ckpt)
    assert [json.loads(line)["epoch"] for line in ckpt.with_suffix(".jsonl").read_text().splitlines()] == [1]


def test_penalty_is_added_to_the_loss_and_logged(dataset, tmp_path):
    def weights(model):
        return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1])

    plain, _ = fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(2), tmp_path / "a.ckpt")
    shrunk, _ = fit(
        tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(2), tmp_path / "b.ckpt",
        penalty=lambda m: 10.0 * sum(p.pow(2).sum() for n, p in m.named_parameters() if n.endswith("weight") and p.dim() > 1),
    )
    assert weights(shrunk).norm() < 0.9 * weights(plain).norm()
    log = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert all(r["weight_l2"] > 0 and r["loss"] > r["ce"] for r in log)


class Interrupted(CrossEntropy):
    """Ctrl-C in the middle of the second epoch (after ``after`` steps)."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.calls = after, 0

    def forward(self, emb, logits, labels, teacher_out=None):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return super().forward(emb, logits, labels)


@pytest.mark.parametrize("sampler", ["pk", "importance"])
def test_resume_after_ctrl_c_continues_bit_for_bit(dataset, tmp_path, sampler):
    straight, _ = fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset, sampler), settings(3), tmp_path / "a.ckpt")
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(6), Interrupted(after=steps_per_epoch(dataset) + 1), dataset, batches(dataset, sampler), settings(3), tmp_path / "b.ckpt")
    state = torch.load(tmp_path / "b.ckpt", weights_only=True)
    assert state["epoch"] == 0  # epoch 1 finished and saved; epoch 2 was interrupted
    assert ("sampler" in state) == (sampler == "importance")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    resumed, _ = fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset, sampler), settings(3, resume=True), tmp_path / "b.ckpt")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(dataset, tmp_path):
    ckpt = tmp_path / "m.ckpt"
    with pytest.raises(DistillError, match=r"loss became nan at epoch 2, step 1; the last good checkpoint is kept"):
        fit(tiny_model(6), Exploding(good=steps_per_epoch(dataset)), dataset, batches(dataset), settings(3), ckpt)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 0


def test_extract_keeps_order_and_none_outputs(dataset):
    model = tiny_model(6).eval()
    emb, logits = extract(model, dataset, torch.device("cpu"), batch_size=5)
    direct = model(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    torch.testing.assert_close(emb, direct[0])
    torch.testing.assert_close(logits, direct[1])
    only, missing = extract(lambda x: (model(x)[0], None), dataset, torch.device("cpu"), batch_size=7)
    assert missing is None and only.shape == (len(dataset), 16)


@pytest.mark.parametrize(
    "epochs, steps, min_steps, expected",
    [(4, None, 0, 4), (4, None, 10, 4), (4, None, 30, 10), (4, 7, 0, 3), (4, 9, 0, 3), (4, 10, 0, 4), (1, 2, 30, 10)],
)
def test_the_step_budget_rounds_up_to_whole_epochs(epochs, steps, min_steps, expected):
    # 3 steps per epoch: ceil(steps / 3) epochs when steps is set, and never fewer than min_steps need
    assert TrainSettings(epochs=epochs, lr=1.0, steps=steps, min_steps=min_steps).num_epochs(3) == expected


def test_a_small_set_trains_for_the_minimum_number_of_steps(dataset, tmp_path):
    ckpt = tmp_path / "m.ckpt"
    per_epoch = steps_per_epoch(dataset)
    _, summary = fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), TrainSettings(**{**vars(settings(1)), "min_steps": 5 * per_epoch + 1}), ckpt)
    assert summary == {"epochs": 6, "steps": 6 * per_epoch}
    assert len(ckpt.with_suffix(".jsonl").read_text().splitlines()) == 6


class Scripted:
    """A validator that returns a scripted score per call and remembers the weights it saw."""

    def __init__(self, scores):
        self.scores, self.seen = list(scores), []

    def __call__(self, model):
        self.seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return self.scores[len(self.seen) - 1]


def test_the_best_validated_epoch_is_kept_and_logged(dataset, tmp_path):
    ckpt = tmp_path / "m.ckpt"
    # untrained 0.7 (the reference, never kept), then up, down, a tie (the later one wins), down
    validate = Scripted([0.7, 0.2, 0.6, 0.5, 0.6, 0.1])
    model, summary = fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(5), ckpt, validate=validate)
    assert summary == {"epochs": 5, "steps": 5 * steps_per_epoch(dataset), "best_epoch": 4, "best_score": 0.6,
                       "best_score_se": 0.0, "top_epoch": 2, "top_score": 0.6, "last_epoch": 5, "last_score": 0.1,
                       "untrained_score": 0.7, "learnt": False}
    for name, value in model.state_dict().items():
        assert torch.equal(value, validate.seen[4][name]), name
    log = [json.loads(line) for line in ckpt.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["val_score"] for r in log] == [0.2, 0.6, 0.5, 0.6, 0.1]
    assert [r["best_epoch"] for r in log] == [1, 2, 2, 4, 4]


def test_resume_keeps_the_best_checkpoint(dataset, tmp_path):
    straight, _ = fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(3), tmp_path / "a.ckpt", validate=Scripted([0.0, 0.9, 0.1, 0.2]))
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(6), Interrupted(after=steps_per_epoch(dataset) + 1), dataset, batches(dataset), settings(3), tmp_path / "b.ckpt",
            validate=Scripted([0.0, 0.9]))
    resumed, summary = fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(3, resume=True), tmp_path / "b.ckpt", validate=Scripted([0.1, 0.2]))
    assert summary["best_epoch"] == 1
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_validation_runs_at_most_max_validations_times_and_after_the_last_epoch(dataset, tmp_path, monkeypatch):
    import distill.engine as engine

    monkeypatch.setattr(engine, "MAX_VALIDATIONS", 2)
    validate = Scripted([0.0, 0.1, 0.2, 0.3])
    fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(5), tmp_path / "m.ckpt", validate=validate)
    log = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "val_score" in r] == [3, 5]


def test_channels_last_is_off_on_cpu_unless_asked_and_is_deterministic(dataset, tmp_path):
    from distill.config_load import load_config
    from distill.training import train_settings

    assert train_settings(load_config(), torch.device("cpu")).channels_last is False  # the CPU default: measured results
    assert train_settings(load_config(), torch.device("cuda")).channels_last is True
    assert train_settings(load_config(channels_last=True), torch.device("cpu")).channels_last is True
    # a config whose input is set follows the same rule as the inputs chosen for a run (prepare.choose_inputs)
    assert train_settings(load_config(image_size="128x64"), torch.device("cpu")).channels_last is True
    assert train_settings(load_config(image_size="64x32"), torch.device("cpu")).channels_last is False
    outputs = []
    for run, fmt in enumerate((True, True, False)):
        model = tiny_model(6)
        ckpt = tmp_path / f"m{run}.ckpt"
        fit(model, CrossEntropy(), dataset, batches(dataset), TrainSettings(epochs=3, lr=1e-2, seed=3, channels_last=fmt), ckpt)
        conv = model.backbone[0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == fmt and conv.is_contiguous() != fmt
        log = [json.loads(line) for line in ckpt.with_suffix(".jsonl").read_text().splitlines()]
        assert log[-1]["loss"] < log[0]["loss"]
        assert torch.load(ckpt, weights_only=False)["recipe"]["channels_last"] is fmt  # resumed only in its own format
        outputs.append(extract(model, dataset, torch.device("cpu"))[0])
    assert torch.equal(outputs[0], outputs[1])  # the same format twice: the same model
    assert not torch.equal(outputs[0], outputs[2])  # another rounding (AdamW turns it into other steps)


def test_amp_trains_the_model_and_a_live_teacher_under_bf16_autocast_on_cpu(dataset, tmp_path):
    seen = {}
    for amp in (True, False):
        model = tiny_model(6)
        conv_dtypes, teacher_autocast = [], []
        model.backbone[0].register_forward_hook(lambda m, i, out: conv_dtypes.append(out.dtype) if m.training else None)

        def teacher_fn(images, indices):
            teacher_autocast.append(torch.is_autocast_enabled("cpu"))
            return torch.zeros(len(images), 4), None

        ckpt = tmp_path / f"amp{amp}.ckpt"
        fit(model, CrossEntropy(), dataset, batches(dataset), TrainSettings(epochs=2, lr=1e-2, seed=3, amp=amp), ckpt,
            teacher_fn=teacher_fn)
        assert set(conv_dtypes) == {torch.bfloat16 if amp else torch.float32}
        assert set(teacher_autocast) == {amp} and len(teacher_autocast) == 2 * steps_per_epoch(dataset)
        assert model.backbone[0].weight.dtype == torch.float32  # autocast: the weights and optimiser stay float32
        assert torch.load(ckpt, weights_only=False)["recipe"]["amp"] is amp  # resumed only under its own arithmetic
        seen[amp] = extract(model, dataset, torch.device("cpu"))[0]
    assert not torch.equal(seen[True], seen[False])
