"""Model selection: the latest epoch within the noise of the best is kept (an early lucky epoch is
not), the chance level of a random ranking (against every permutation and against random
embeddings through the validation protocol), and the near-chance warning."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
import torch.nn.functional as F

from distill import selection
from distill.protocols import DISTRACTOR_METRIC
from distill.run import setup
from distill.training import chance_check
from distill.config import Config
from distill.engine import fit
from distill.report import build_report, print_report, selection_lines, to_markdown
from distill.selection import NOISE_SE, random_ranking_ap, update
from test_cli import tiny_data  # noqa: F401  (fixture)
from test_engine import CrossEntropy, Scripted, batches, dataset, settings, tiny_model  # noqa: F401  (fixture)


def average_precision(ranked: list[bool]) -> float:
    hits = [k for k, match in enumerate(ranked) if match]
    return sum((n + 1) / (k + 1) for n, k in enumerate(hits)) / len(hits)


@pytest.mark.parametrize("gallery", range(1, 7))
def test_the_chance_ap_is_the_mean_over_every_permutation(gallery):
    for relevant in range(1, gallery + 1):
        items = [True] * relevant + [False] * (gallery - relevant)
        aps = [average_precision(list(p)) for p in itertools.permutations(items)]
        assert float(random_ranking_ap([relevant], gallery)[0]) == pytest.approx(sum(aps) / len(aps), abs=1e-12)


def test_the_chance_ap_of_large_galleries_against_sampled_rankings():
    rng = random.Random(0)
    for relevant, gallery in ((3, 200), (12, 1000)):
        items = [True] * relevant + [False] * (gallery - relevant)
        aps = []
        for _ in range(4000):
            rng.shuffle(items)
            aps.append(average_precision(items))
        mean, se = selection.mean_and_se(aps)
        assert abs(float(random_ranking_ap([relevant], gallery)[0]) - mean) < 4 * se


def offline_keep(rounds: list[list[float]]) -> int:
    """The rule in its plainest form: the latest round within NOISE_SE paired standard errors of
    the (first) highest-scoring round; 1-based."""
    means = [sum(r) / len(r) for r in rounds]
    top = means.index(max(means))
    for e in reversed(range(len(rounds))):
        diffs = [a - b for a, b in zip(rounds[top], rounds[e])]
        mean = sum(diffs) / len(diffs)
        sd = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5
        if mean <= NOISE_SE * sd / len(diffs) ** 0.5:
            return e + 1
    raise AssertionError("the top round is always within its own noise")


def keep(rounds) -> dict:
    record = None
    for epoch, scores in enumerate(rounds, 1):
        record, _ = update(record, scores, epoch)
    return record


@pytest.mark.parametrize("seed", range(20))
def test_the_kept_epoch_is_the_latest_within_the_noise_of_the_best(seed):
    gen = torch.Generator().manual_seed(seed)
    queries, epochs = 30, 8
    skill = torch.rand(epochs, generator=gen).sort().values * 0.3  # a noisy learning curve
    rounds = [(s + 0.3 * torch.rand(queries, generator=gen)).clamp(0, 1).tolist() for s in skill[torch.randperm(epochs, generator=gen)]]
    record = keep(rounds)
    assert record["epoch"] == offline_keep(rounds)
    means = [sum(r) / len(r) for r in rounds]
    assert record["top"]["score"] == pytest.approx(max(means)) and record["last_score"] == pytest.approx(means[-1])


def test_an_early_lucky_epoch_is_not_kept():
    # a chance-level model scores high on a few queries by luck at epoch 1; the trained model of
    # epochs 2-4 is a little lower on average, well within the noise of 8 queries
    lucky = [0.9, 0.05, 0.8, 0.05, 0.9, 0.05, 0.05, 0.7]
    trained = [0.5, 0.4, 0.45, 0.35, 0.5, 0.4, 0.3, 0.45]  # mean 0.419 < 0.438
    record = keep([lucky, [v - 0.1 for v in trained], trained, trained])
    assert record["epoch"] == 4 and record["top"]["epoch"] == 1
    # an earlier epoch better by far more than the noise is kept
    record = keep([[0.9] * 4 + [0.8] * 4, [0.1] * 4 + [0.2] * 4])
    assert record["epoch"] == 1
    # one number per round (no noise estimate): the highest wins, ties to the later round
    assert keep([0.5, 0.4])["epoch"] == 1 and keep([0.5, 0.5])["epoch"] == 2


def test_fit_keeps_the_later_epoch_loads_its_weights_and_says_so(dataset, tmp_path, capsys):  # noqa: F811
    lucky = [0.9, 0.05, 0.8, 0.05, 0.9, 0.05, 0.05, 0.7]
    trained = [0.5, 0.4, 0.45, 0.35, 0.5, 0.4, 0.3, 0.45]
    untrained = [0.1] * 8
    validate = Scripted([untrained, lucky, trained, [0.0] * 8])  # the last epoch collapses: clearly worse, not kept
    model, summary = fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings(3), tmp_path / "m.ckpt", validate=validate, desc="student")
    assert summary["best_epoch"] == 2 and summary["top_epoch"] == 1 and summary["last_score"] == 0.0
    assert summary["untrained_score"] == pytest.approx(0.1) and summary["learnt"] is True
    for name, value in model.state_dict().items():
        assert torch.equal(value, validate.seen[2][name]), name
    err = " ".join(capsys.readouterr().err.split())
    assert "student: kept epoch 2 (validation 0.419 ± 0.025); the highest, 0.438 at epoch 1, is not better by more than 2" in err
    assert "last epoch 3: 0.000; untrained: 0.100" in err
    log = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["best_epoch"] for r in log] == [1, 2, 2]


def random_embedder(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda images: F.normalize(torch.randn(len(images), 8, generator=gen), dim=1)


def test_random_embeddings_score_the_chance_level_and_warn(tiny_data, tmp_path, capsys):
    _, data, device = setup(Config(out=str(tmp_path), image_size=(32, 16)))
    validate = data.protocol.validator(data, device)
    chance = data.protocol.distractor_chance(data)
    maps = [sum(aps) / len(aps) for aps in (validate(random_embedder(seed)) for seed in range(300))]
    mean, se = selection.mean_and_se(maps)
    assert abs(mean - chance) < 4 * se  # the formula, fed the protocol's match counts and gallery size
    capsys.readouterr()
    record, _ = update(None, validate(random_embedder(0)), 1)
    summary = selection.summary(record)
    checked = chance_check("student_baseline", summary, data)
    assert checked["near_chance"] is True and checked["chance"] == chance
    assert checked["chance_note"].startswith("student_baseline is near chance on validation: kept score")
    assert "warning: student_baseline is near chance" in " ".join(capsys.readouterr().err.split())


def test_a_model_that_separates_identities_does_not_warn(tiny_data, tmp_path, capsys):
    _, data, device = setup(Config(out=str(tmp_path), image_size=(32, 16)))
    by_path = {s.path: s.label for s in [*data.val, *data.train_plain.samples]}
    order = [s.path for s in [*data.val, *data.train_plain.samples]]
    calls = iter(range(10**6))

    def oracle(images):  # embeds each image by its identity (the extraction order is the dataset order)
        labels = [by_path[order[next(calls) % len(order)]] for _ in images]
        return F.one_hot(torch.tensor(labels) % 8, 8).float() + 0.01 * torch.randn(len(images), 8)

    scores = data.protocol.distractor_maps(oracle, data, device, count=1, per_query=True)[0]
    capsys.readouterr()
    checked = chance_check("student", selection.summary(update(None, scores, 1)[0]), data)
    assert checked == {"metric": DISTRACTOR_METRIC, "chance": data.protocol.distractor_chance(data), "near_chance": False}
    assert "near chance" not in capsys.readouterr().err


def test_the_report_shows_the_selection_and_the_warning():
    models = [{"name": n, "runtime": "torch", "metrics": {"recall@1": 0.5, "map": 0.4}} for n in ("teacher", "student")]
    fit = {"epochs": 12, "best_epoch": 9, "best_score": 0.031, "best_score_se": 0.004, "top_epoch": 3, "top_score": 0.035,
           "last_epoch": 12, "last_score": 0.030, "metric": "map with training distractors", "chance": 0.02, "near_chance": True,
           "chance_note": "student is near chance on validation: kept score 0.031"}
    report = build_report(models, {}, {}) | {"selection": {"student": fit}, "warnings": [fit["chance_note"]]}
    md = to_markdown(report)
    assert "**Warning**: student is near chance on validation: kept score 0.031" in md
    assert "## Model selection (validation map with training distractors)" in md
    assert ("- student: kept epoch 9 of 12 (0.031), last epoch 0.030, highest 0.035 at epoch 3, a random ranking 0.020 "
            "[NEAR CHANCE]") in md
    from io import StringIO

    from rich.console import Console

    console = Console(file=StringIO(), width=300, record=True)
    print_report(report, console)
    text = console.export_text()
    assert "warning: student is near chance on validation" in text and "model selection: student: kept epoch 9 of 12" in text


def offline_learnt(kept: list[float], untrained: list[float]) -> bool:
    """Plainly: the mean per-query gain over the untrained round above NOISE_SE standard errors and
    either MIN_LEARNT of the way from the untrained mean to 1 or UNTRAINED_FACTOR times it."""
    diffs = [a - b for a, b in zip(kept, untrained)]
    mean = sum(diffs) / len(diffs)
    sd = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5
    before = sum(untrained) / len(untrained)
    far = mean >= selection.MIN_LEARNT * (1 - before) or before + mean >= selection.UNTRAINED_FACTOR * before
    return mean > NOISE_SE * sd / len(diffs) ** 0.5 and far


@pytest.mark.parametrize("seed", range(12))
def test_learnt_is_the_kept_round_beating_the_untrained_one_beyond_the_noise(seed):
    gen = torch.Generator().manual_seed(seed)
    untrained = (0.3 * torch.rand(20, generator=gen)).tolist()
    rounds = [(torch.tensor(untrained) + 0.05 * seed / 11 * e + 0.1 * torch.randn(20, generator=gen)).tolist() for e in range(4)]
    record = selection.untrained(untrained)
    for epoch, scores in enumerate(rounds, 1):
        record, _ = update(record, scores, epoch)
    summary = selection.summary(record)
    assert record["epoch"] == keep(rounds)["epoch"]  # the untrained round changes nothing about which epoch is kept
    assert summary["untrained_score"] == pytest.approx(sum(untrained) / 20)
    assert summary["learnt"] is offline_learnt(rounds[record["epoch"] - 1], untrained)


def test_the_untrained_round_is_never_kept_and_a_model_that_did_not_learn_warns():
    untrained = [0.30, 0.10, 0.20, 0.25, 0.15, 0.30, 0.10, 0.20]
    record = selection.untrained(untrained)
    for epoch in (1, 2):
        record, keep_it = update(record, [v - 0.01 * (epoch % 2) for v in untrained], epoch)
    assert record["epoch"] == 2 and keep_it and "untrained" in record
    fit = selection.summary(record) | {"epochs": 2}
    assert fit["learnt"] is False
    note = selection.chance_note("student_baseline", fit, chance=0.01)  # 20x chance: the chance rule alone is silent
    assert note == ("student_baseline has learnt little or nothing on validation: kept score 0.200 (epoch 2) vs 0.200 "
                    "untrained (a model that learns doubles it or gets 5% of the way to 1, beyond the noise): train it longer "
                    "or with another learning rate, or check the data")
    assert not selection.near_chance(fit["best_score"], fit["best_score_se"], 0.01)
    line = selection_lines({"selection": {"student_baseline": fit | {"chance": 0.01}}})[0]
    assert line.endswith("at epoch 2, untrained 0.200, a random ranking 0.010 [NOT LEARNT]")


class Noisy(CrossEntropy):
    """Cross-entropy on logits scaled by a random draw: training that uses the global random numbers."""

    def forward(self, emb, logits, labels, teacher_out=None):
        return super().forward(emb, logits * (1 + torch.rand(())), labels)


class FirstCallDraws(Scripted):
    """A validator that draws random numbers on its first call (the untrained round)."""

    def __call__(self, model):
        if not self.seen:
            torch.rand(1000)
        return super().__call__(model)


def test_a_significant_but_tiny_gain_over_untrained_is_not_learning():
    # the CUHK03 student whose classifier stayed at ln C: 0.016 kept vs 0.011 untrained, every query a little up
    untrained = [0.011 + 0.001 * (i % 3) for i in range(30)]
    kept = [u + 0.005 for u in untrained]
    record, _ = update(selection.untrained(untrained), kept, 1)
    assert selection.clearly_better(kept, untrained) and selection.summary(record)["learnt"] is False
    assert selection.summary(update(selection.untrained(untrained), [u + 0.06 for u in untrained], 1)[0])["learnt"] is True
    # hard data, every score low: 0.036 vs 0.011 untrained is 3x (not 5% of the way to 1): learnt
    assert selection.summary(update(selection.untrained(untrained), [u + 0.024 for u in untrained], 1)[0])["learnt"] is True


def test_fit_validates_the_untrained_model_without_shifting_the_training_random_numbers(dataset, tmp_path):  # noqa: F811
    model = tiny_model(6)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    drawing = FirstCallDraws([0.0, 0.1, 0.2])
    trained, summary = fit(model, Noisy(), dataset, batches(dataset), settings(2), tmp_path / "a.ckpt", validate=drawing)
    assert all(torch.equal(drawing.seen[0][k], v) for k, v in initial.items())  # the untrained round saw the initial weights
    assert summary["untrained_score"] == 0.0 and summary["best_epoch"] == 2
    plain, _ = fit(tiny_model(6), Noisy(), dataset, batches(dataset), settings(2), tmp_path / "b.ckpt", validate=Scripted([0.0, 0.1, 0.2]))
    for (name, a), (_, b) in zip(trained.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_record_checkpointed_before_the_kept_queries_were_stored_still_updates():
    old = {"epoch": 2, "score": 0.5, "top": {"epoch": 2, "score": 0.5, "queries": [0.5] * 4}, "last_epoch": 2, "last_score": 0.5}
    record, keep_it = update(old, [0.1] * 4, 3)  # clearly worse: epoch 2 stays kept
    assert not keep_it and record["epoch"] == 2 and record["se"] == 0.0 and record["queries"] is None
    assert "learnt" not in selection.summary(record)
