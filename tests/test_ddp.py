"""DDP under torchrun (2 gloo processes on CPU, tests/ddp_worker.py): every rank ends with the same
model AND objective parameters, equal to one process trained on the concatenated batches; the
scaling rule (global batch = world_size x batch_size, lr as given, 1/world_size the steps per epoch);
losses logged as means over ranks; gradient-ratio distillation weights measured on every rank's
batches; the benchmark's thread count matches a single process's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.engine import seed_everything
from tests.ddp_worker import CASES, TinyData, balanced, build, gather_input, pk_sampler, run_under_torchrun, settings
from tests.test_balance import reference_norms

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    """Run the worker once under torchrun; its output folder."""
    out = tmp_path_factory.mktemp("ddp")
    run_under_torchrun(ROOT / "tests" / "ddp_worker.py", out, WORLD)
    return out


def load(out: Path, case: str, rank: int) -> dict:
    return torch.load(out / f"{case}-rank{rank}.pt", weights_only=True)


def reference(gather: bool) -> tuple[dict, dict, list[float]]:
    """One process, the same optimiser and schedule, stepping through the same global batches: step i
    takes P x K batches i*W .. i*W+W-1 of the single-process sampler (rank r's i-th batch is i*W+r).
    Its loss is the objective of the concatenated batch (``gather``), else the mean of the per-rank
    objectives (DDP averages gradients). Returns final parameters and each epoch's mean loss."""
    data, (model, objective) = TinyData(), build()
    s = settings(gather)
    seed_everything(s.seed)
    labels = torch.tensor(data.labels)
    sampler = pk_sampler(data.labels)
    steps = len(sampler) // WORLD
    params = [*model.parameters(), *objective.parameters()]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=s.lr, total_steps=s.epochs * steps, pct_start=0.15)
    epoch_losses = []
    for epoch in range(s.epochs):
        sampler.set_epoch(epoch)
        batches = [torch.tensor(b) for b in sampler]
        losses = []
        for i in range(steps):
            shards = batches[i * WORLD : (i + 1) * WORLD]
            shards = [torch.cat(shards)] if gather else shards
            loss = torch.stack([
                objective(*model(data.images[idx]), labels[idx], data.teacher(None, idx))[0] for idx in shards
            ]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
    return dict(model.named_parameters()), objective.state_dict(), epoch_losses


def test_all_gather_concatenates_in_rank_order_and_sums_the_gradient_over_ranks(ranks):
    """Every rank computes the same L = sum(w * x^3) of the gathered x; rank r's gradient is the sum of
    the ranks' dL/dx_r = world_size x 3 w x^2 (DDP's average then makes it the single-process one)."""
    x, w = gather_input(WORLD)
    for rank in range(WORLD):
        got = torch.load(ranks / f"allgather-rank{rank}.pt", weights_only=True)
        assert torch.equal(got["gathered"], x)
        torch.testing.assert_close(got["grad"], (WORLD * 3 * w * x.pow(2)).chunk(WORLD)[rank], rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_ends_with_the_same_model_and_objective(ranks, case):
    a, b = load(ranks, case, 0), load(ranks, case, 1)
    assert a["objective"].keys() == b["objective"].keys()
    if case != "unused":
        assert {"task.losses.verification.head.fc.weight", "distill.losses.regression.regression.projection.weight"} <= set(a["objective"])
    for part in ("model", "objective"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{case}: {part}.{name} differs between ranks"


@pytest.mark.parametrize("gather", [False, True])
def test_ranks_match_one_process_on_the_concatenated_batches(ranks, gather):
    """Without BatchNorm (its batch statistics are per rank) the result is the single process's up to
    rounding: with --gather-embeddings for every loss on the concatenated batch, without it for the
    mean of the per-rank losses. The logged losses are the means over both ranks."""
    case = "gather" if gather else "local"
    got = load(ranks, case, 0)
    model, objective, epoch_losses = reference(gather)
    for name, value in model.items():
        torch.testing.assert_close(got["model"][name], value.detach(), rtol=1e-7, atol=1e-9, msg=lambda m, name=name: f"model.{name}: {m}")
    for name, value in objective.items():
        torch.testing.assert_close(got["objective"][name], value, rtol=1e-7, atol=1e-9, msg=lambda m, name=name: f"objective.{name}: {m}")
    logged = [json.loads(line) for line in (ranks / f"{case}.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == pytest.approx(epoch_losses, rel=1e-9)


def test_gradient_ratio_weights_are_measured_on_every_ranks_batches_and_agree_across_ranks(ranks):
    """``--distill-scale gradient`` under torchrun: each rank sums the gradient norms of its first
    batches, the sums are added over ranks, so every rank gets the factors one process computes from
    the norms of both ranks' batches (one backward per loss and batch, tests/test_balance.py's
    reference), not its own."""
    data, (model, _) = TinyData(), build()
    objective = balanced()
    names = [name for name, _ in objective.distill.terms]
    per_rank = [reference_norms(model, objective, data, list(pk_sampler(data.labels, rank, WORLD)), data.teacher)
                for rank in range(WORLD)]
    task = sum(t for t, _ in per_rank)
    expected = [task / sum(terms[name] for _, terms in per_rank) for name in names]
    own = [per_rank[0][0] / per_rank[0][1][name] for name in names]  # what a missing sum over ranks would give
    for rank in range(WORLD):
        got = load(ranks, "balance", rank)
        assert got["scales"].tolist() == pytest.approx(expected, rel=1e-9)
        assert got["weights"] == pytest.approx({n: w * f for (n, w), f in zip(objective.distill.terms, expected)}, rel=1e-9)
    assert own != pytest.approx(expected, rel=1e-3)  # the check above can tell a per-rank measurement


def test_the_gathered_loss_differs_from_the_per_rank_mean():
    """The two references differ, so the test above tells the two modes apart."""
    local, gathered = reference(False), reference(True)
    assert local[2][0] != pytest.approx(gathered[2][0], rel=1e-3)
    assert not torch.allclose(local[0]["proj.weight"], gathered[0]["proj.weight"], atol=1e-6)


def test_scaling_rule_world_size_x_batch_size_with_the_lr_as_given(ranks):
    """Each rank takes every 2nd of the epoch's 6 batches: 3 steps per epoch, 2 epochs = 6 steps
    (a single process: 12); the rank's batches are disjoint and together the epoch's. The lr is
    not scaled: the schedule ends where a single process's ends (the reference above uses lr as given)."""
    s = settings(False)
    labels = TinyData().labels
    whole = pk_sampler(labels)
    per_rank = [pk_sampler(labels, r, WORLD) for r in range(WORLD)]
    assert len(whole) == 6 and [len(p) for p in per_rank] == [3, 3]
    assert sorted(b for p in per_rank for b in map(tuple, p)) == sorted(map(tuple, whole))
    for case in CASES:
        assert load(ranks, case, 0)["fit"] == {"epochs": s.epochs, "steps": s.epochs * len(whole) // WORLD}
    logged = [json.loads(line) for line in (ranks / "local.jsonl").read_text().splitlines()]
    one_process = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=s.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(one_process, max_lr=s.lr, total_steps=s.epochs * 3, pct_start=0.15)
    for _ in range(3):  # the first epoch's steps
        one_process.step()
        schedule.step()
    assert logged[0]["lr"] == pytest.approx(schedule.get_last_lr()[0])


def test_the_benchmark_under_torchrun_uses_the_threads_the_process_was_given(ranks):
    """torchrun set OMP_NUM_THREADS=1: rank 0 benchmarks with that one thread, not with more threads
    than it was given (which competes with the other ranks for the cores)."""
    threads = json.loads((ranks / "threads.json").read_text())
    assert threads["omp"] == "1" and threads["training"] == 1
    assert threads["benchmark"] == 1
