"""``distill study``: the statistics against hand-worked numbers, recipes and their errors, pairing
(same init, same batches), resume, determinism, ``--jobs``, and the CLI's files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from distill import engine, study, study_output, study_stats, training
from distill.students import train
from distill.teachers import acquire
from distill.cli import app
from distill.config_load import load_config
from distill.data import base as data_base
from distill.data.synthetic import load_synthetic
from distill.errors import DistillError
from distill.models.file import load_model

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
SMALL = dict(train_ids=8, test_ids=4, images_per_id=8, height=32, width=16)
TINY = dict(image_size="32x16", epochs=1, teacher_epochs=1, batch_size=16, min_steps=0, teacher_min_steps=0, retry_lr=False)
TINY_ARGS = ["--image-size", "32x16", "--epochs", "1", "--teacher-epochs", "1", "--batch-size", "16", "--min-steps", "0", "--teacher-min-steps", "0"]


@pytest.fixture
def tiny_data(monkeypatch):
    """`synthetic` shrunk to 8 train / 4 test identities (as in test_cli)."""
    monkeypatch.setitem(data_base._LOADERS, "synthetic", lambda path=None, **o: load_synthetic(path, **SMALL))


# ---------------------------------------------------------------- statistics


def test_paired_gain_matches_a_hand_worked_example():
    # d = recipe - baseline = 0.02, 0.04, 0.03, 0.05, 0.01: mean 0.03, sd = sqrt(0.001 / 4) = 0.015811,
    # t(0.975, 4) = 2.7764 (t table), half width = 2.7764 * 0.015811 / sqrt(5) = 0.019632
    baseline = {0: 0.50, 1: 0.60, 2: 0.55, 3: 0.70, 4: 0.65}
    recipe = {0: 0.52, 1: 0.64, 2: 0.58, 3: 0.75, 4: 0.66}
    gain = study_stats.paired_gain(recipe, baseline)
    assert gain["n"] == 5
    assert gain["mean"] == pytest.approx(0.03)
    assert gain["std"] == pytest.approx(0.0158114, abs=1e-6)
    assert gain["ci"] == pytest.approx([0.010368, 0.049632], abs=1e-5)
    assert (gain["wins"], gain["losses"], gain["ties"]) == (5, 0, 0)
    # the same interval from scipy's paired t-test
    test = stats.ttest_rel(list(recipe.values()), list(baseline.values()))
    assert gain["ci"] == pytest.approx(list(test.confidence_interval(0.95)), abs=1e-12)


def test_paired_gain_counts_wins_losses_ties_and_pairs_by_seed():
    # d = +0.1 (seed 1), -0.2 (seed 2), 0 (seed 3); seeds 0 and 4 have no partner and are left out.
    # mean -1/30, sd = sqrt((0.1333^2 + 0.1667^2 + 0.0333^2) / 2) = 0.152753, t(0.975, 2) = 4.3027
    gain = study_stats.paired_gain({0: 0.9, 1: 0.6, 2: 0.3, 3: 0.5}, {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.1})
    assert (gain["n"], gain["wins"], gain["losses"], gain["ties"]) == (3, 1, 1, 1)
    assert gain["mean"] == pytest.approx(-1 / 30)
    assert gain["std"] == pytest.approx(0.152753, abs=1e-6)
    half = 4.3027 * 0.152753 / math.sqrt(3)
    assert gain["ci"] == pytest.approx([-1 / 30 - half, -1 / 30 + half], abs=1e-4)


def test_one_seed_has_no_spread_and_no_interval():
    gain = study_stats.paired_gain({7: 0.4}, {7: 0.3})
    assert gain["n"] == 1 and gain["mean"] == pytest.approx(0.1)
    assert gain["std"] is None and gain["ci"] is None and gain["wins"] == 1
    assert study_stats.mean_std([0.25]) == (0.25, None)
    with pytest.raises(ValueError, match="no seed in common"):
        study_stats.paired_gain({0: 0.4}, {1: 0.3})


def test_mean_std_is_the_sample_std():
    mean, std = study_stats.mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(math.sqrt(5 / 3))  # sum of squares 5, over n - 1 = 3


def test_summarize_per_recipe_mean_std_and_paired_gain():
    results = [
        {"recipe": "baseline", "seed": s, "metrics": {"recall@1": b, "map": b / 2}} for s, b in enumerate([0.5, 0.6, 0.4])
    ] + [
        {"recipe": "kd", "seed": s, "metrics": {"recall@1": r, "map": r / 2, "nmi": 0.1 * s}} for s, r in enumerate([0.6, 0.6, 0.5])
    ]
    summary = study_stats.summarize(results)
    assert list(summary) == ["baseline", "kd"]
    assert summary["baseline"]["gain"] is None and summary["baseline"]["n"] == 3
    assert summary["kd"]["metrics"]["recall@1"]["mean"] == pytest.approx(17 / 30)
    assert summary["kd"]["metrics"]["recall@1"]["std"] == pytest.approx(study_stats.mean_std([0.6, 0.6, 0.5])[1])
    assert summary["kd"]["gain"]["recall@1"] == study_stats.paired_gain({0: 0.6, 1: 0.6, 2: 0.5}, {0: 0.5, 1: 0.6, 2: 0.4})
    assert summary["kd"]["gain"]["recall@1"]["ties"] == 1
    assert summary["kd"]["gain"]["map"]["mean"] == pytest.approx(1 / 30)
    assert "nmi" in summary["kd"]["metrics"] and "nmi" not in summary["kd"]["gain"]  # the baseline has no NMI


def test_a_seed_far_below_its_siblings_is_a_warning():
    # the CUHK03 study of 2026-12-01: one seed of five stalled at mAP 0.078 while the others learnt
    maps = {"kd": [0.152, 0.078, 0.139, 0.161, 0.144], "baseline": [0.05, 0.11, 0.09, 0.07, 0.08]}
    results = [{"recipe": r, "seed": s, "metrics": {"map": v}} for r, values in maps.items() for s, v in enumerate(values)]
    warnings = study_stats.stalled_seeds(results)
    # by hand: kd's others 0.139, 0.144, 0.152, 0.161 -> median 0.148, 0.75 x = 0.111 > 0.078 (47% below);
    # baseline seed 0: others 0.07, 0.08, 0.09, 0.11 -> median 0.085, 0.75 x = 0.06375 > 0.05 (41% below)
    assert warnings == [
        "kd seed 1: map 0.078 is 47% below the median of the other seeds (0.148): this training may have stalled "
        "(see its log); the mean and interval above include it",
        "baseline seed 0: map 0.050 is 41% below the median of the other seeds (0.085): this training may have "
        "stalled (see its log); the mean and interval above include it",
    ]
    assert study_stats.stalled_seeds(results, share=0.5) == []
    assert study_stats.stalled_seeds(results[:3]) == []  # fewer than 3 other seeds: no median to trust
    assert study_stats.stalled_seeds(results, metric="recall@1") == []  # a metric no result has


# ---------------------------------------------------------------- recipes


def test_builtin_recipes_and_the_baseline_is_always_first():
    base = load_config(None, distill="kd=2,darkrank=0.02", kd_temperature=2.0)
    default = study.recipe_configs(base)
    assert list(default) == ["baseline", "kd+darkrank"]
    overrides, cfg = default["baseline"]
    assert overrides == {"distill": "none"} and cfg.distill == "none" and cfg.kd_temperature == 2.0
    assert default["kd+darkrank"][1] == base  # the base config as given

    chosen = study.recipe_configs(base, ["darkrank-soft", "kd", "kd", "darkrank-hard"])
    assert list(chosen) == ["baseline", "darkrank-soft", "kd", "darkrank-hard"]
    assert (chosen["darkrank-soft"][1].darkrank, chosen["darkrank-soft"][1].distill) == ("soft", "darkrank=0.1")
    assert chosen["darkrank-soft"][1].darkrank_list_size == 8
    assert (chosen["kd"][1].distill, chosen["kd"][1].kd_temperature) == ("kd=3", 2.0)
    assert (chosen["darkrank-hard"][1].darkrank, chosen["darkrank-hard"][1].distill) == ("hard", "darkrank=0.02")
    unmixed = study.recipe_configs(base, ["kd+darkrank-unmixed"])["kd+darkrank-unmixed"][1]
    assert (unmixed.mix_rows, base.mix_rows, unmixed.distill) == (0, None, base.distill)  # the default less its mixed images


def test_recipes_file(tmp_path):
    path = tmp_path / "recipes.toml"
    path.write_text('[[recipe]]\nname = "kd-t2"\ndistill = "kd=1"\nkd_temperature = 2.0\n\n'
                    '[[recipe]]\nname = "dr.soft_w0.5"\ndarkrank = "soft"\ndarkrank_list_size = 8\ndistill = "darkrank=0.5"\nloss_options = {triplet_margin = 0.3}\n')
    recipes = study.load_recipes_file(path)
    assert recipes == {"kd-t2": {"distill": "kd=1", "kd_temperature": 2.0},
                       "dr.soft_w0.5": {"darkrank": "soft", "darkrank_list_size": 8, "distill": "darkrank=0.5", "loss_options": {"triplet_margin": 0.3}}}
    configs = study.recipe_configs(load_config(None), None, recipes)
    assert list(configs) == ["baseline", "kd-t2", "dr.soft_w0.5"]
    assert configs["kd-t2"][1].kd_temperature == 2.0 and configs["kd-t2"][1].darkrank == "hard"
    assert configs["dr.soft_w0.5"][1].loss_options == {"triplet_margin": 0.3}
    assert list(study.recipe_configs(load_config(None), ["kd", "kd-t2"], recipes)) == ["baseline", "kd", "kd-t2"]


def test_example_recipes_file_is_valid():
    path = Path(__file__).parent.parent / "examples" / "recipes.toml"
    configs = study.recipe_configs(load_config(None), None, study.load_recipes_file(path))
    assert list(configs) == ["baseline", "kd-w1", "kd-w3", "kd-w3+soft-darkrank", "kd-w3+rkd", "kd-w3+darkrank-full-list"]
    assert configs["kd-w3+soft-darkrank"][1].darkrank == "soft"
    assert configs["kd-w3+rkd"][1].distill == "kd=3,rkd_distance=10,rkd_angle=20"
    assert configs["kd-w3+darkrank-full-list"][1].darkrank_list_size is None  # "all": every other sample


@pytest.mark.parametrize("name, recipe, key, value", [
    ("unlabeled.toml", "kd+darkrank+unlabeled", "unlabeled", "/data/cuhk03_extra"),
    ("pretrain.toml", "kd+darkrank-pretrained", "student_weights", "runs/pre/student.pt"),
    ("low_label.toml", "kd+darkrank+unlabeled", "unlabeled", "/data/cuhk03_low/unlabeled"),
    ("low_label.toml", "kd+darkrank-1176steps", "steps", 1176),
])
def test_example_study_recipes_set_what_the_docs_say(name, recipe, key, value):
    path = Path(__file__).parent.parent / "examples" / name
    configs = study.recipe_configs(load_config(None), None, study.load_recipes_file(path))
    assert getattr(configs[recipe][1], key) == value
    assert configs[recipe][1].distill == load_config(None).distill  # the default recipe plus that one key


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[recipe]]\nname = "x"\nkd_wieght = 1\n', "recipe 'x': unknown config key(s): kd_wieght; known: "),
        ('[[recipe]]\nname = "x"\nkd_temperature = "high"\n', "recipe 'x': kd_temperature (--kd-temperature) must be a number, got 'high'"),
        ('[[recipe]]\nname = "x"\nkd_weight = 1\n', "recipe 'x': kd_weight was replaced by --distill: use --distill kd=1,darkrank=0.02 (in a TOML file: distill = \"kd=1,darkrank=0.02\")"),
        ('[[recipe]]\nname = "x"\ndistill = "kd=1,dark=2"\n', "recipe 'x': unknown distillation term 'dark' in 'kd=1,dark=2'; valid names: darkrank, kd, "),
        ('[[recipe]]\nname = "x"\nepochs = 2.5\n', "recipe 'x': epochs (--epochs) must be an integer, got 2.5"),
        ('[[recipe]]\nname = "x"\nloss_options = 5\n', "recipe 'x': loss_options (--loss-opt) must be a table of KEY = VALUE (e.g. triplet_margin = 0.3), got 5"),
        ('[[recipe]]\nname = "x"\nbaseline = "no"\n', "recipe 'x': baseline (--baseline) must be true or false, got 'no'"),
        ('recipe = [1, 2]\n', "recipe #1 must be a [[recipe]] table (name = \"...\" plus Config keys), got 1"),
        ('[[recipe]]\nname = "x"\nepochs = 0\n', "recipe 'x': epochs must be >= 1, got 0"),
        ('[[recipe]]\nname = "x"\nteacher = "big"\nseed = 3\n', "recipe 'x' sets seed, teacher: a study shares one teacher"),
        ('[[recipe]]\nkd_weight = 1\n', "recipe #1 needs name = \"...\" (letters, digits, . _ + -), got None"),
        ('[[recipe]]\nname = "a/b"\n', "recipe #1 needs name = \"...\" (letters, digits, . _ + -), got 'a/b'"),
        ('[[recipe]]\nname = "x"\n[[recipe]]\nname = "x"\n', "recipe 'x' is defined twice"),
        ('[[recipe]]\nname = "kd"\n', "recipe 'kd' is a built-in recipe; give yours another name"),
        ('kd_weight = 1\n', "expected only [[recipe]] tables (name = \"...\" plus Config keys), found top-level key(s) kd_weight"),
        ('[[recipe]\nname = "x"\n', "is not valid TOML"),
        (b'[[recipe]]\nname = "caf\xe9"\n', "is not UTF-8 text (byte 0xe9 at offset 22)"),
    ],
)
def test_bad_recipes_file_gives_one_clear_error(tmp_path, text, message):
    path = tmp_path / "recipes.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DistillError) as err:
        study.recipe_configs(load_config(None), None, study.load_recipes_file(path))
    assert message in str(err.value)


def test_unknown_recipe_name_and_missing_file(tmp_path):
    with pytest.raises(DistillError, match=r"unknown recipe\(s\) nope; known: baseline, kd, darkrank-hard, darkrank-soft, kd\+darkrank, kd\+darkrank-gradient, kd\+darkrank-unmixed"):
        study.recipe_configs(load_config(None), ["kd", "nope"])
    with pytest.raises(DistillError, match="recipes file not found: "):
        study.load_recipes_file(tmp_path / "missing.toml")
    with pytest.raises(DistillError, match="--seeds must be >= 1, got 0"):
        study.run_study(load_config(None), {}, seeds=0)
    with pytest.raises(DistillError, match="--jobs must be >= 1, got 0"):
        study.run_study(load_config(None), {}, jobs=0)


# ---------------------------------------------------------------- studies on tiny data


def test_pairs_share_init_and_batches_and_an_interrupted_study_resumes(tiny_data, tmp_path, monkeypatch):
    inits, batches, current = {}, {}, []
    real_fit, real_train = engine.fit, train.train_student

    def recording_fit(model, objective, dataset, sampler, settings, checkpoint, **kw):
        current[:] = [kw.get("desc")]
        inits[current[0]] = {k: v.clone() for k, v in model.state_dict().items()}
        return real_fit(model, objective, dataset, sampler, settings, checkpoint, **kw)

    class RecordingSampler(training.PKSampler):
        def __iter__(self):
            epoch = list(super().__iter__())
            batches.setdefault(current[0], []).append(epoch)
            return iter(epoch)

    monkeypatch.setattr(engine, "fit", recording_fit)
    monkeypatch.setattr(training, "PKSampler", RecordingSampler)
    base = load_config(None, out=str(tmp_path / "s"), **TINY)
    recipes = study.recipe_configs(base, ["kd"])
    first = study.run_study(base, recipes, seeds=2)

    def same_init(a: str, b: str) -> bool:
        return all(torch.equal(inits[a][k], inits[b][k]) for k in inits[a])

    b0, k0, b1 = "study/models/baseline-seed0", "study/models/kd-seed0", "study/models/baseline-seed1"
    assert set(inits) == {"teacher", b0, k0, b1, "study/models/kd-seed1"}
    assert same_init(b0, k0) and batches[b0] == batches[k0]
    assert not same_init(b0, b1) and batches[b0] != batches[b1]  # the check can fail
    assert [r["recipe"] for r in first["results"]] == ["baseline", "baseline", "kd", "kd"]

    # interrupt: one result lost, one made with another config; only those two are trained again
    results = tmp_path / "s" / "study" / "results"
    (results / "kd" / "seed-1.json").unlink()
    stale = json.loads((results / "baseline" / "seed-0.json").read_text())
    stale["identity"]["config"]["lr"] = 0.1
    (results / "baseline" / "seed-0.json").write_text(json.dumps(stale))
    trained = []

    def counting_train(cfg, data, device, teacher=None, name="student"):
        trained.append(name)
        return real_train(cfg, data, device, teacher=teacher, name=name)

    monkeypatch.setattr(train, "train_student", counting_train)
    again = study.run_study(base, recipes, seeds=2)
    assert sorted(trained) == [b0, "study/models/kd-seed1"]
    assert again["results"] == first["results"] and again["summary"] == first["summary"]
    assert json.loads((results / "kd" / "seed-1.json").read_text())["overrides"] == {"distill": "kd=3"}


def test_results_of_other_code_are_trained_again_and_said(tiny_data, tmp_path, monkeypatch, capsys):
    base = load_config(None, out=str(tmp_path / "s"), **TINY)
    recipes = study.recipe_configs(base, ["kd"])
    study.run_study(base, recipes, seeds=1)
    trained = []
    real_train = train.train_student

    def counting_train(cfg, data, device, teacher=None, name="student"):
        trained.append(name)
        return real_train(cfg, data, device, teacher=teacher, name=name)

    monkeypatch.setattr(train, "train_student", counting_train)
    capsys.readouterr()
    study.run_study(base, recipes, seeds=1)  # same code: both results reused
    assert trained == [] and "other code" not in capsys.readouterr().err
    monkeypatch.setattr(study, "code_fingerprint", lambda: "0123456789abcdef")  # as after an upgrade or an edit
    study.run_study(base, recipes, seeds=1)
    assert sorted(trained) == ["study/models/baseline-seed0", "study/models/kd-seed0"]
    err = " ".join(capsys.readouterr().err.split())
    assert "study: 2 stored result(s) were made by other code of distill (upgraded or edited since): training them again" in err
    stored = json.loads((tmp_path / "s" / "study" / "results" / "kd" / "seed-0.json").read_text())
    assert stored["identity"]["code"] == "0123456789abcdef"


def test_the_code_fingerprint_covers_every_source_file_of_the_package(tmp_path, monkeypatch):
    package = Path(study.__file__).resolve().parent
    real = study.code_fingerprint()
    assert len(real) == 16
    fake = tmp_path / "distill"
    for path in package.rglob("*.py"):
        (fake / path.relative_to(package)).parent.mkdir(parents=True, exist_ok=True)
        (fake / path.relative_to(package)).write_bytes(path.read_bytes())
    monkeypatch.setattr(study, "__file__", str(fake / "study.py"))
    study.code_fingerprint.cache_clear()
    try:
        same = study.code_fingerprint()
        (fake / "losses" / "darkrank.py").write_text((fake / "losses" / "darkrank.py").read_text() + "\n# edited\n")
        study.code_fingerprint.cache_clear()
        edited = study.code_fingerprint()
    finally:
        study.code_fingerprint.cache_clear()
    assert same == real and edited != same  # a copy hashes the same; one edited line changes it


def test_cli_study_writes_its_files_and_repeats_its_numbers(tiny_data, tmp_path):
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        result = runner.invoke(app, ["study", "--recipes", "kd", "--seeds", "1", "--out", str(out), *TINY_ARGS])
        assert result.exit_code == 0, result.output
        assert "One seed: no standard deviation and no confidence interval" in " ".join(result.output.split())
        for name in ("study.json", "study.md", "study.png"):
            assert (out / name).is_file(), name
        assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        md = (out / "study.md").read_text()
        assert "| recipe | seeds | R@1 | mAP | rank-1 | NMI | gain R@1 [95% CI] | gain mAP [95% CI] | W/L/T R@1 |" in md
        assert "| baseline | 1 |" in md and "| kd | 1 |" in md and "| teacher |" in md
        outputs.append(json.loads((out / "study.json").read_text()))
    a, b = outputs
    assert a["results"] == b["results"] and a["summary"] == b["summary"]  # a fresh teacher and students: same numbers
    assert a["teacher"]["metrics"] == b["teacher"]["metrics"]
    assert [(t["recipe"], t["seed"]) for t in a["timings"]] == [(r["recipe"], r["seed"]) for r in a["results"]]
    assert all(t["train_s"] >= 0 and t["evaluate_s"] >= 0 for t in a["timings"])  # the time of each training
    assert set(a["teacher"]["timings"]) == {"teacher", "teacher layer choice"}
    assert set(a["summary"]["kd"]["gain"]) >= {"recall@1", "map", "rank1", "nmi"}
    assert a["summary"]["kd"]["gain"]["recall@1"]["ci"] is None

    bad = runner.invoke(app, ["study", "--recipes", "kd,nope", "--out", str(tmp_path / "c"), *TINY_ARGS])
    assert bad.exit_code == 2 and "error: unknown recipe(s) nope; known: " in bad.output
    assert not (tmp_path / "c").exists()


def _imagefolder(root, tmp_path):
    """The tiny synthetic images as an on-disk ImageFolder, so spawned workers load the same data."""
    splits = load_synthetic(str(tmp_path / "render"), **SMALL)
    for i, s in enumerate([*splits.train, *splits.query, *splits.gallery]):
        folder = root / f"id{s.label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(s.path, folder / f"{i:04d}.png")
    return f"imagefolder:{root}"


def test_a_worker_shows_warnings_in_one_line_as_the_cli_does():
    # a spawned worker starts with Python's own format ("path.py:100: UserWarning: ...", then the source line)
    code = ("import multiprocessing, os, warnings; from distill import study_workers; study_workers.worker_init(multiprocessing.Event(), os.getppid()); "
            "warnings.warn('the teacher has 240 classes, the task 80: kd is off')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err == "warning: the teacher has 240 classes, the task 80: kd is off\n"


def test_parallel_jobs_give_the_numbers_of_one_job(tmp_path):
    data = _imagefolder(tmp_path / "folder", tmp_path)
    one = load_config(None, data=data, out=str(tmp_path / "one"), **TINY)
    serial = study.run_study(one, study.recipe_configs(one, ["kd"]), seeds=1, jobs=1)
    two = load_config(None, data=data, out=str(tmp_path / "two"), teacher_weights=str(tmp_path / "one" / "teacher.pt"), **TINY)
    torch.set_num_threads(2)
    try:
        parallel = study.run_study(two, study.recipe_configs(two, ["kd"]), seeds=1, jobs=2)
        assert torch.get_num_threads() == 2  # the study's one thread per training is undone afterwards
    finally:
        torch.set_num_threads(1)
    assert parallel["results"] == serial["results"]


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="reads /proc to see whether a process is still running")
def test_a_worker_stops_when_the_study_process_is_gone(tmp_path):
    # a stand-in study starts one "worker", waits until its watch runs, and dies; the watch must
    # interrupt the worker long before its 60 s of "training" are over
    ready = tmp_path / "watching"
    worker = (
        "import os, pathlib, threading, time\n"
        "from distill.study_workers import stop_with_parent\n"
        "threading.Thread(target=stop_with_parent, args=(os.getppid(), 0.1), daemon=True).start()\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    study = (
        "import os, subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {worker!r}], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        f"while not os.path.exists({str(ready)!r}): time.sleep(0.05)\n"
        "print(p.pid)\n"
    )
    assert _stops_within(_worker_of(study), 30)


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="reads /proc to see whether a process is still running")
def test_a_worker_still_starting_when_the_study_dies_stops_too(tmp_path):
    # the study dies while its worker is still starting (importing torch takes seconds); the worker's
    # watch, set up afterwards, must watch the study's pid as the study gave it, not its new parent's
    worker = (
        "import multiprocessing, os, sys, time\n"
        "study_pid = int(sys.argv[1])\n"
        "while os.getppid() == study_pid: time.sleep(0.05)\n"
        "from distill import study_workers\n"
        "study_workers.worker_init(multiprocessing.Event(), study_pid)\n"
        "time.sleep(60)\n"
    )
    study_code = (
        "import os, subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', {worker!r}, str(os.getpid())], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(p.pid)\n"
    )
    assert _stops_within(_worker_of(study_code), 60)


def _worker_of(study_code: str) -> int:
    """Run a stand-in study (Python code that starts a worker, prints its pid and exits); the worker's pid."""
    return int(subprocess.run([sys.executable, "-c", study_code], capture_output=True, text=True, check=True, cwd=ROOT,
                              timeout=300).stdout)


def _stops_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` is gone (or a zombie: stopped, only its exit status left) within ``seconds``."""
    def running() -> bool:
        try:
            return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    gone_by = time.monotonic() + seconds
    while running() and time.monotonic() < gone_by:
        time.sleep(0.1)
    return not running()


def test_a_failed_or_interrupted_study_interrupts_its_workers_and_starts_nothing_more():
    # a spawned pool of two workers as a study runs it: "trainings" of 60 s and one that fails after
    # 8 s. When it fails, one 60 s task is running on each worker and one more has been handed to a
    # worker early (beyond cancel's reach). The pool used to wait for the running ones and then run
    # that one; now the running ones are interrupted and the early-handed one never starts
    study_code = (
        "import os, subprocess, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from multiprocessing import get_context\n"
        "from distill import study_workers\n"
        "spawn = get_context('spawn')\n"
        "stop = spawn.Event()\n"
        "with ProcessPoolExecutor(2, mp_context=spawn, initializer=study_workers.worker_init, initargs=(stop, os.getpid())) as pool:\n"
        "    first = pool.submit(study_workers.unless_stopped, time.sleep, 60)\n"
        "    failing = pool.submit(study_workers.unless_stopped, subprocess.check_call,\n"
        "                          [sys.executable, '-c', 'import time; time.sleep(8); raise SystemExit(3)'])\n"
        "    slow = [first, *(pool.submit(study_workers.unless_stopped, time.sleep, 60) for _ in range(2))]\n"
        "    try:\n"
        "        study_workers.gather({f: () for f in [failing, *slow]}, lambda *a: None, stop)\n"
        "    except subprocess.CalledProcessError as err:\n"
        "        print('raised: exit status', err.returncode)\n"
        "print('slow ones:', [('cancelled' if f.cancelled() else type(f.exception()).__name__) for f in slow])\n"
    )
    # the timeout is the watchdog: without the interrupt, or with the early-handed task run, this takes >= 60 s
    out = subprocess.run([sys.executable, "-c", study_code], capture_output=True, text=True, timeout=50, cwd=ROOT).stdout
    assert "raised: exit status 3" in out
    assert out.split("slow ones: ")[1].strip() == "['KeyboardInterrupt', 'KeyboardInterrupt', 'KeyboardInterrupt']", out


def test_recipes_train_at_the_inputs_chosen_for_the_data(tiny_data, tmp_path):
    # no --image-size: the study chooses it from the data once, and every recipe trains at it
    base = load_config(None, out=str(tmp_path / "s"), **{k: v for k, v in TINY.items() if k != "image_size"})
    result = study.run_study(base, study.recipe_configs(base, ["kd"]), seeds=1, jobs=1, keep_models=True)
    assert {r["recipe"] for r in result["results"]} == {"baseline", "kd"}
    header = load_model(tmp_path / "s" / "study" / "models" / "kd-seed0.pt")[1]
    assert header["meta"]["image_size"] == [64, 32]


def test_a_training_that_did_not_learn_is_a_warning_of_the_study(tiny_data, tmp_path, monkeypatch):
    real_train = train.train_student

    def baseline_seed1_fails(cfg, data, device, teacher=None, name="student"):
        model, fit = real_train(cfg, data, device, teacher=teacher, name=name)
        fit = {k: v for k, v in fit.items() if k != "chance_note"}  # the tiny trainings' own notes aside
        if name == "study/models/baseline-seed1":  # as train_student reports a model no better than untrained
            fit |= {"chance_note": "study/models/baseline-seed1 is no better on validation than before training"}
        return model, fit

    monkeypatch.setattr(train, "train_student", baseline_seed1_fails)
    base = load_config(None, out=str(tmp_path / "s"), **TINY)
    result = study.run_study(base, study.recipe_configs(base, ["kd"]), seeds=2)
    expected = "baseline seed 1: study/models/baseline-seed1 is no better on validation than before training"
    assert result["warnings"] == [expected]
    assert f"**Warning**: {expected}" in (tmp_path / "s" / "study.md").read_text()
    stored = json.loads((tmp_path / "s" / "study" / "results" / "baseline" / "seed-1.json").read_text())
    assert stored["warning"] == expected.removeprefix("baseline seed 1: ")
    from io import StringIO

    from rich.console import Console

    console = Console(file=StringIO(), width=200, record=True)
    study_output.print_study(result, console)
    assert f"warning: {expected}" in console.export_text()


# ---------------------------------------------------------------- one teacher per seed


def test_one_teacher_per_seed_distils_each_seed_from_its_own_teacher(tiny_data, tmp_path, monkeypatch):
    used, real_train = {}, train.train_student

    def recording_train(cfg, data, device, teacher=None, name="student"):
        used[name] = None if teacher is None else teacher.fingerprint
        return real_train(cfg, data, device, teacher=teacher, name=name)

    monkeypatch.setattr(train, "train_student", recording_train)
    base = load_config(None, out=str(tmp_path / "s"), **TINY)
    result = study.run_study(base, study.recipe_configs(base, ["kd"]), seeds=2, teacher_per_seed=True)
    teachers = result["teacher"]["teachers"]
    assert [t["seed"] for t in teachers] == [0, 1]
    assert all((tmp_path / "s" / "teachers" / f"seed{s}" / "teacher.pt").is_file() for s in (0, 1))
    assert not (tmp_path / "s" / "teacher.pt").exists()
    assert teachers[0]["fingerprint"] != teachers[1]["fingerprint"]
    assert used == {"study/models/baseline-seed0": None, "study/models/baseline-seed1": None,
                    "study/models/kd-seed0": teachers[0]["fingerprint"], "study/models/kd-seed1": teachers[1]["fingerprint"]}
    for metric in ("recall@1", "map"):  # the teacher row: mean and sample std of the two teachers
        values = [t["metrics"][metric] for t in teachers]
        assert result["teacher"]["metrics"][metric] == pytest.approx(sum(values) / 2)
        assert result["teacher"]["std"][metric] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    md = (tmp_path / "s" / "study.md").read_text()
    assert "| teacher | 2 |" in md and "one teacher per seed (--teacher-per-seed)" in md

    # seed 1's teacher is the one a one-teacher study with --seed 1 trains
    one = load_config(None, out=str(tmp_path / "one"), seed=1, **TINY)
    single = study.run_study(one, study.recipe_configs(one, ["kd"]), seeds=1)
    assert single["teacher"]["fingerprint"] == teachers[1]["fingerprint"] and "std" not in single["teacher"]
    assert "another training of the teacher can move the gain" in (tmp_path / "one" / "study.md").read_text()
    kd1 = [r for r in result["results"] if (r["recipe"], r["seed"]) == ("kd", 1)]
    assert kd1 == [r for r in single["results"] if r["recipe"] == "kd"]


def test_teacher_per_seed_with_parallel_jobs_gives_the_numbers_of_one_job(tmp_path):
    data = _imagefolder(tmp_path / "folder", tmp_path)
    runs = {}
    for jobs in (1, 2):
        cfg = load_config(None, data=data, out=str(tmp_path / f"jobs{jobs}"), **TINY)
        runs[jobs] = study.run_study(cfg, study.recipe_configs(cfg, ["kd"]), seeds=2, jobs=jobs, teacher_per_seed=True)
    assert runs[2]["results"] == runs[1]["results"]
    assert runs[2]["teacher"]["fingerprint"] == runs[1]["teacher"]["fingerprint"]


def test_a_worker_trains_or_reads_a_teacher_without_searching_its_layers_again(tiny_data, tmp_path, monkeypatch):
    """The parent chooses each teacher's layer once; the worker that trains the teacher and the
    workers that distil from it are handed that choice (they ran the search again before)."""
    searched = []
    real_scores = acquire.layer_scores
    monkeypatch.setattr(acquire, "layer_scores", lambda *a: searched.append(1) or real_scores(*a))
    monkeypatch.setattr(study, "WORKER", {})  # the in-process stand-in for a worker's state
    base = load_config(None, out=str(tmp_path / "s"), **TINY)
    study._worker_teacher(base)
    assert (tmp_path / "s" / "teacher.pt").is_file() and searched == []
    _, data, device = study.setup(base)
    acquired = acquire.acquire_teacher(base, data, device)
    assert searched == [1] and acquired.layer_choice is not None
    handed = study.at_chosen_layer(base, acquired)
    assert handed.teacher_layer == acquired.layer_choice["chosen"] and base.teacher_layer == "auto"
    kd = study.recipe_configs(base, ["kd"])["kd"][1]
    study._worker_train(handed, replace(kd, seed=0), "kd", False)
    assert searched == [1]
    assert study.WORKER["teacher"].fingerprint == acquired.teacher.fingerprint


def test_teacher_per_seed_refuses_a_finished_teacher(tmp_path):
    base = load_config(None, out=str(tmp_path / "s"), teacher_weights=str(tmp_path / "t.pt"), **TINY)
    with pytest.raises(DistillError, match="--teacher-per-seed trains one teacher per seed; --teacher-weights gives a finished one"):
        study.teacher_configs(base, [0, 1], per_seed=True)
