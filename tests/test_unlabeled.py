"""Unlabeled images (--unlabeled): the image list, the joint dataset, the batch sampler's
composition, the objective (task losses on labeled rows only, distillation on all), resume, and
2-process torchrun on CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from distill.data import Sample
from distill.data.dataset import ImageDataset
from distill.data.samplers import PKSampler
from distill.data.unlabeled import UNLABELED, JointDataset, UnlabeledBatchSampler, load_unlabeled
from distill.engine import fit, seed_everything
from distill.errors import DistillError
from distill.losses.darkrank import DarkRank, DarkRankLoss
from distill.losses.kd import kd_loss
from distill.losses.registry import LossInputs
from distill.losses.relational import pkt_loss, rkd_distance_loss
from distill.objective import StudentObjective
from tests.ddp_unlabeled_worker import EXTRA, PER_STEP, WithUnlabeled, sampler
from tests.ddp_worker import build, run_under_torchrun, settings

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def write_images(folder: Path, names: list[str]) -> list[str]:
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 6, 3), (20 * i) % 256, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_a_folder_is_searched_recursively_and_test_images_are_refused(tmp_path):
    root = tmp_path / "u"
    paths = write_images(root, ["b.jpg", "a/x.png", "a/deeper/y.jpg"])
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # a link loop is walked once
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="skipping 1 unreadable image"):
        samples = load_unlabeled(str(root))
    assert sorted(os.path.realpath(s.path) for s in samples) == sorted(os.path.realpath(p) for p in paths)
    assert {s.label for s in samples} == {UNLABELED}
    (root / "broken.jpg").unlink()
    with pytest.raises(DistillError, match=r"--unlabeled .* holds 1 image\(s\) of the test set \(e.g. .*x.png\): leave them out"):
        load_unlabeled(str(root), exclude=[Sample(paths[1], 3)])
    with pytest.raises(DistillError, match=r"--unlabeled nowhere: no such folder \(or data spec NAME:PATH\)"):
        load_unlabeled("nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="no readable images found"):
        load_unlabeled(str(tmp_path / "empty"))
    assert {s.label for s in load_unlabeled("digits")} == {UNLABELED}  # a data spec: its training images


def test_joint_dataset_marks_unlabeled_items_and_keeps_global_indices(tmp_path):
    labeled = write_images(tmp_path / "l", ["p.png", "q.png"])
    extra = write_images(tmp_path / "u", ["r.png", "s.png", "t.png"])
    to_tensor = lambda img: torch.tensor(np.asarray(img), dtype=torch.float32).mean()  # noqa: E731
    train = ImageDataset([Sample(labeled[0], 7), Sample(labeled[1], 9)], to_tensor, {7: 0, 9: 1})
    joint = JointDataset(train, [Sample(p, UNLABELED) for p in extra], to_tensor)
    assert len(joint) == 5 and joint.labels == [0, 1, UNLABELED, UNLABELED, UNLABELED]
    assert [joint[i][1:] for i in range(5)] == [(0, 0), (1, 1), (UNLABELED, 2), (UNLABELED, 3), (UNLABELED, 4)]
    assert float(joint[3][0]) == pytest.approx(20.0)  # s.png, the second unlabeled image
    assert [s.path for s in joint.samples] == labeled + extra


def labeled_pk(labels, rank=0, world=1):
    return PKSampler(labels, p=3, k=2, seed=4, rank=rank, world_size=world)


def test_each_batch_is_the_pk_batch_plus_unlabeled_images_in_reshuffled_cycles():
    labels = [i // 4 for i in range(24)]  # 6 identities x 4 images: 4 P x K batches of 6
    n, count, per = len(labels), 7, 3
    composed = UnlabeledBatchSampler(labeled_pk(labels), n, count, per, seed=4)
    alone = labeled_pk(labels)
    for epoch in range(3):
        composed.set_epoch(epoch)
        alone.set_epoch(epoch)
        batches, pk = list(composed), list(alone)
        assert len(batches) == len(composed) == len(pk) == 4
        drawn = []
        for batch, pk_batch in zip(batches, pk):
            assert batch[:6] == pk_batch  # the labeled part is the P x K batch, unchanged
            assert len(batch) == 6 + per and all(n <= i < n + count for i in batch[6:])
            drawn += batch[6:]
        # 12 draws of 7 images: a whole cycle (each image once), then 5 of the next cycle, distinct
        assert sorted(drawn[:count]) == list(range(n, n + count)) and len(set(drawn[count:])) == len(drawn) - count
    composed.set_epoch(1)
    again = UnlabeledBatchSampler(labeled_pk(labels), n, count, per, seed=4)
    again.set_epoch(1)
    assert list(composed) == list(again)  # (seed, epoch) alone decide
    again.set_epoch(2)
    assert list(composed) != list(again)


def test_ranks_share_the_single_process_batches_and_a_label_free_epoch_is_one_pass():
    labels = [i // 4 for i in range(24)]
    single = list(UnlabeledBatchSampler(labeled_pk(labels), 24, 7, 3, seed=4))
    ranks = [list(UnlabeledBatchSampler(labeled_pk(labels, r, WORLD), 24, 7, 3, seed=4, rank=r, world_size=WORLD)) for r in range(WORLD)]
    assert [len(r) for r in ranks] == [2, 2]
    for r in range(WORLD):
        for j, batch in enumerate(ranks[r]):
            assert batch == single[j * WORLD + r]

    free = UnlabeledBatchSampler(None, 0, 20, 4, seed=1)
    assert len(free) == 5
    batches = list(free)
    assert sorted(i for b in batches for i in b) == list(range(20))  # one pass, each image once
    assert len(UnlabeledBatchSampler(None, 0, 20, 4, world_size=2)) == 2


def test_the_checkpoint_remembers_the_unlabeled_images():
    labels = [i // 4 for i in range(24)]
    state = UnlabeledBatchSampler(labeled_pk(labels), 24, 7, 3, fingerprint="abc").state_dict()
    UnlabeledBatchSampler(labeled_pk(labels), 24, 7, 3, fingerprint="abc").load_state_dict(state)
    with pytest.raises(DistillError, match=r"the checkpoint was trained with other unlabeled images \(or none\): give the same --unlabeled"):
        UnlabeledBatchSampler(labeled_pk(labels), 24, 7, 3, fingerprint="xyz").load_state_dict(state)


def batch(seed: int = 0, n: int = 12, unlabeled: int = 5, classes: int = 3, dim: int = 6):
    """Embeddings/logits with grad, labels (3 ids x 4, 4 of their images... then -1s), teacher outputs."""
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([i % classes for i in range(n - unlabeled)] + [UNLABELED] * unlabeled)
    t_emb = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    t_logits = torch.randn(n, classes, generator=g, dtype=torch.float64)
    return emb, logits, labels, t_emb, t_logits


def test_task_losses_see_the_labeled_rows_and_distillation_every_row():
    """Against a hand computation: the task loss of the labeled rows alone, plus KD, DarkRank, RKD
    and PKT of the whole batch (DarkRank's full list scaled by 7 labeled rows of 12)."""
    emb, logits, labels, t_emb, t_logits = batch()
    torch.manual_seed(0)
    darkrank = DarkRankLoss(mode="hard", list_size=None)
    objective = StudentObjective("softmax=1,triplet=1", 6, 3, distill="kd=2,darkrank=0.5,rkd_distance=0.3,pkt=0.7").double()
    loss, parts = objective(emb, logits, labels, (t_emb, t_logits))
    lab = labels >= 0
    task, _ = objective.task(emb[lab], logits[lab], labels[lab], teacher_emb=t_emb[lab])
    expected = (task + 2.0 * kd_loss(logits, t_logits, 1.0) + 0.5 * darkrank(emb, t_emb) * 7 / 12
                + 0.3 * rkd_distance_loss(emb, t_emb) + 0.7 * pkt_loss(emb, t_emb))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert set(parts) >= {"softmax", "triplet", "kd", "darkrank", "rkd_distance", "pkt"}

    # the task losses give the unlabeled rows no gradient at all; the distillation terms do
    emb.grad = logits.grad = None
    StudentObjective("softmax=1,triplet=1", 6, 3).double()(emb, logits, labels)[0].backward()
    assert torch.count_nonzero(emb.grad[~lab]) == 0 and torch.count_nonzero(logits.grad[~lab]) == 0
    assert torch.count_nonzero(emb.grad[lab]) > 0
    emb.grad = None
    objective(emb, logits, labels, (t_emb, t_logits))[0].backward()
    assert (emb.grad[~lab].abs().sum(1) > 0).all()


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_a_full_darkrank_list_lengthened_by_unlabeled_rows_keeps_the_labeled_batch_weight(mode):
    """Full list: the term is the plain DarkRank of every row times labeled rows / all rows; a batch all
    labeled or all unlabeled, and a list of fixed length, are not scaled."""
    emb, logits, labels, t_emb, t_logits = batch(n=8, unlabeled=3)

    def term(labels, list_size=None, topk=None):
        registered = DarkRank(mode, 3.0, 3.0, list_size, topk, "exact", 8)
        plain = DarkRankLoss(3.0, 3.0, mode, list_size, topk=topk)
        return registered(LossInputs(emb, logits, labels, t_emb, t_logits)), plain(emb, t_emb)

    scaled, plain = term(labels)
    torch.testing.assert_close(scaled, plain * 5 / 8, rtol=1e-12, atol=0)
    fixed_lists = [{"list_size": 4}] + ([{"topk": 2}] if mode == "hard" else [])
    for fixed in fixed_lists:
        scaled, plain = term(labels, **fixed)
        torch.testing.assert_close(scaled, plain, rtol=0, atol=0)
    for all_same in (torch.zeros(8, dtype=torch.long), torch.full((8,), UNLABELED)):
        scaled, plain = term(all_same)
        torch.testing.assert_close(scaled, plain, rtol=0, atol=0)


def test_a_batch_without_labels_has_distillation_terms_only():
    emb, logits, labels, t_emb, t_logits = batch(unlabeled=12)
    objective = StudentObjective("softmax=1,triplet=1", 6, 3, distill="kd=1.5").double()
    loss, parts = objective(emb, logits, labels, (t_emb, t_logits))
    torch.testing.assert_close(loss, 1.5 * kd_loss(logits, t_logits, 1.0), rtol=1e-12, atol=0)
    assert set(parts) == {"kd"}


def test_compat_takes_each_unlabeled_image_as_its_own_identity():
    """Slow reference: row i's positives are the teacher embeddings of its labeled identity, or only
    its own when it is unlabeled (two unlabeled images are not the same person)."""
    emb, logits, labels, t_emb, t_logits = batch(unlabeled=4)
    objective = StudentObjective("softmax=1", 6, 3, distill="compat=1").double()
    loss, parts = objective(emb, logits, labels, (t_emb, None))
    sims = F.normalize(emb, dim=1) @ F.normalize(t_emb, dim=1).T / 0.1
    terms = []
    for i in range(len(labels)):
        positives = [j for j in range(len(labels)) if (labels[i] >= 0 and labels[j] == labels[i]) or j == i]
        terms.append(torch.logsumexp(sims[i], 0) - torch.logsumexp(sims[i, positives], 0))
    lab = labels >= 0
    task, _ = objective.task(emb[lab], logits[lab], labels[lab])
    torch.testing.assert_close(loss, task + torch.stack(terms).mean(), rtol=1e-12, atol=0)


def interrupt(objective, after: int):
    """``objective``, raising KeyboardInterrupt at its ``after``-th call (its state dict unchanged)."""
    calls, forward = [0], objective.forward

    def interrupted(*args):
        calls[0] += 1
        if calls[0] == after:
            raise KeyboardInterrupt
        return forward(*args)

    objective.forward = interrupted
    return objective


def test_resume_with_unlabeled_images_continues_bit_for_bit(tmp_path):
    data = WithUnlabeled()
    model, objective = build()
    straight, _ = fit(model, objective, data, sampler(data), settings(False), tmp_path / "a.ckpt", teacher_fn=data.teacher)
    model, objective = build()
    steps = len(sampler(data))
    with pytest.raises(KeyboardInterrupt):
        fit(model, interrupt(objective, steps + 2), data, sampler(data), settings(False), tmp_path / "b.ckpt", teacher_fn=data.teacher)
    model, objective = build()
    resumed_settings = settings(False)
    resumed_settings.resume = True
    resumed, _ = fit(model, objective, data, sampler(data), resumed_settings, tmp_path / "b.ckpt", teacher_fn=data.teacher)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    other = sampler(data)
    other.fingerprint = "other images"
    with pytest.raises(DistillError, match="the checkpoint was trained with other unlabeled images"):
        fit(*build(), data, other, resumed_settings, tmp_path / "b.ckpt", teacher_fn=data.teacher)


def reference() -> dict:
    """One process stepping through the same global batches as 2 ranks (rank r's j-th batch is global
    batch j*2+r), the loss the mean of the per-rank objectives (DDP averages gradients)."""
    data = WithUnlabeled()
    model, objective = build()
    s = settings(False)
    seed_everything(s.seed)
    labels = torch.tensor(data.labels)
    whole = sampler(data)
    steps = len(whole) // WORLD
    params = [*model.parameters(), *objective.parameters()]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=s.lr, total_steps=s.epochs * steps, pct_start=0.15)
    for epoch in range(s.epochs):
        whole.set_epoch(epoch)
        batches = [torch.tensor(b) for b in whole]
        for i in range(steps):
            shards = batches[i * WORLD : (i + 1) * WORLD]
            assert all((labels[idx] == UNLABELED).sum() == PER_STEP for idx in shards)
            loss = torch.stack([objective(*model(data.images[idx]), labels[idx], data.teacher(None, idx))[0] for idx in shards]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return dict(model.named_parameters())


def test_torchrun_with_unlabeled_images_matches_one_process(tmp_path):
    run_under_torchrun(ROOT / "tests" / "ddp_unlabeled_worker.py", tmp_path, WORLD)
    ranks = [torch.load(tmp_path / f"unlabeled-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name in ranks[0]["model"]:
        assert torch.equal(ranks[0]["model"][name], ranks[1]["model"][name]), name
    for name, value in reference().items():
        torch.testing.assert_close(ranks[0]["model"][name], value.detach(), rtol=1e-7, atol=1e-9)
    assert EXTRA < PER_STEP * 6  # the unlabeled images cycle more than once per epoch


def tiny_teacher_and_images(root: Path) -> tuple[Path, Path]:
    """An (untrained) nin_bn@0.25 teacher model file and a folder of 24 small images in 3 sub-folders."""
    from distill.models import save_model
    from distill.students import create_student

    torch.manual_seed(0)
    teacher = save_model(root / "t.pt", create_student("nin_bn", 16, 5, width=0.25), arch="nin_bn", width=0.25)
    g = np.random.default_rng(0)
    for i in range(24):
        path = root / "unl" / f"d{i % 3}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 255, (32, 16, 3), dtype=np.uint8)).save(path)
    return teacher, root / "unl"


def test_a_run_on_unlabeled_images_alone_needs_no_labels_and_reports_no_test_set(tmp_path):
    """`distill run --data none --unlabeled DIR --teacher-weights T`: no --teacher (the file names it),
    no baseline, the student learns the teacher's classes (KD), the report says there is no test set."""
    import json

    from typer.testing import CliRunner

    from distill.cli import app
    from distill.models import load_model

    teacher, folder = tiny_teacher_and_images(tmp_path)
    out = tmp_path / "o"
    common = ["--data", "none", "--unlabeled", str(folder), "--out", str(out), "--device", "cpu"]
    result = CliRunner().invoke(app, ["run", *common, "--teacher-weights", str(teacher), "--student", "nin_bn@0.25",
                                      "--embed-dim", "16", "--steps", "2", "--min-steps", "0", "--unlabeled-batch", "8",
                                      "--image-size", "32x16", "--bench-iters", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["test_set"] is None and report["config"]["teacher"] == "nin_bn"
    assert {m["role"] for m in report["models"]} == {"teacher", "student"}
    assert all(v is None for m in report["models"] for v in m["metrics"].values())
    assert "no test set" in (out / "report.md").read_text()
    student, header = load_model(out / "student.pt")
    assert header["num_classes"] == 5 and header["meta"]["unlabeled"].endswith("x8")  # the teacher's classes, for KD
    log = [json.loads(line) for line in (out / "student.jsonl").read_text().splitlines()]
    assert set(log[0]) >= {"kd", "darkrank"} and "softmax" not in log[0] and "triplet" not in log[0]
    assert not (out / "student_baseline.pt").exists()

    result = CliRunner().invoke(app, ["run", *common])  # a teacher to train needs labels
    assert result.exit_code == 2 and "a run on unlabeled images alone learns from a finished teacher" in result.output
    result = CliRunner().invoke(app, ["run", "--data", "none", "--out", str(out)])
    assert result.exit_code == 2 and "--data none trains on unlabeled images only: give them with --unlabeled DIR" in result.output


def test_train_caches_the_teacher_on_labeled_and_unlabeled_images(tmp_path):
    """Un-augmented training: the cached teacher outputs cover the labeled images and the unlabeled
    ones, under a key that changes with the unlabeled images."""
    from typer.testing import CliRunner

    from distill.cli import app

    teacher, folder = tiny_teacher_and_images(tmp_path)
    out = tmp_path / "o"
    args = ["train", "--data", "digits", "--teacher-weights", str(teacher), "--student", "nin_bn@0.25", "--embed-dim", "16",
            "--steps", "1", "--min-steps", "0", "--augment", "none", "--image-size", "32x16", "--device", "cpu", "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert CliRunner().invoke(app, [*args, "--unlabeled", str(folder), "--unlabeled-batch", "4"]).exit_code == 0
    sizes = sorted(len(torch.load(p, weights_only=True)["embeddings"]) for p in (out / "cache").glob("teacher-*.pt"))
    assert len(sizes) == 2 and sizes[1] == sizes[0] + 24


def test_the_low_label_split_is_links_to_the_images_never_copies(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import cuhk03_low_label as split
    finally:
        sys.path.pop(0)
    market, extra = tmp_path / "market", tmp_path / "extra"
    names = [f"{pid:04d}_c{c}s1_00000{i}_00.jpg" for pid in range(1, 7) for c in (1, 2) for i in range(2)]
    write_images(market / "bounding_box_train", names)
    write_images(market / "query", ["0100_c1s1_000000_00.jpg"])
    write_images(market / "bounding_box_test", ["0100_c2s1_000001_00.jpg", "-1_c1s1_000002_00.jpg"])
    write_images(extra / "bounding_box_train", ["0301_c1s1_000000_00.jpg", "0302_c1s1_000001_00.jpg"])
    out = tmp_path / "low"
    split.main(["--market", str(market), "--extra", str(extra), "--out", str(out), "--labeled-ids", "2"])
    labeled = sorted(p.name for p in (out / "labeled" / "bounding_box_train").iterdir())
    assert len({n[:4] for n in labeled}) == 2 and len(labeled) == 8  # 2 people x 2 cameras x 2 images
    unlabeled = load_unlabeled(str(out / "unlabeled"))
    assert len(unlabeled) == 16 + 2 and not {Path(s.path).name for s in unlabeled} & set(labeled)
    every = [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
    assert len(every) == 8 + 3 + 18 and all(p.is_symlink() and p.resolve().is_relative_to(tmp_path) for p in every)
    with pytest.raises(SystemExit, match="exists already"):
        split.main(["--market", str(market), "--out", str(out)])
    with pytest.raises(SystemExit, match="is inside the repository"):
        split.main(["--market", str(market), "--out", str(ROOT / "low")])
