"""Config: defaults <- TOML <- overrides, and one clear error per bad value."""

from __future__ import annotations

import pytest

from distill.config import Config, export_precisions, load_config, student_specs
from distill.errors import DistillError


def test_defaults_toml_and_overrides_in_that_order(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('epochs = 3\nimage_size = [128, 64]\nloss = "lifted=1"\n')
    cfg = load_config(path, epochs=5, lr=None)
    assert cfg.epochs == 5  # override wins
    assert cfg.image_size == (128, 64) and cfg.loss == "lifted=1"  # from the file
    assert cfg.lr == Config().lr  # None overrides nothing


def test_run_table_and_hxw_string(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[run]\nimage_size = "256x128"\n')
    assert load_config(path).image_size == (256, 128)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"darkrank": "medium"}, "--darkrank must be one of hard, soft, none"),
        ({"sampler": "random"}, "--sampler must be one of pk, importance, got 'random'"),
        ({"darkrank_method": "fast"}, "--darkrank-method must be one of exact, bruteforce, sampled, sampled_prefix"),
        ({"image_size": "64"}, "image_size must be HxW"),
        ({"image_size": "8x8"}, "too small"),
        ({"batch_size": 30, "images_per_id": 4}, "must be a multiple of images_per_id"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"darkrank_list_size": 64}, r"darkrank_list_size must be in \[2, batch_size\)"),
        ({"device": "tpu"}, r"^--device must be auto, cpu, cuda or cuda:N \(N a GPU index\), got 'tpu'$"),
        ({"bogus": 1}, "unknown config key"),
        ({"lr": -1}, r"^lr \(--lr\) must be > 0, got -1$"),
        ({"lr": 0}, r"^lr \(--lr\) must be > 0, got 0$"),
        ({"lr": float("nan")}, r"^lr \(--lr\) must be > 0, got nan$"),
        ({"lr": "fast"}, r"^lr \(--lr\) must be a number, got 'fast'$"),
        ({"teacher_lr": 0.0}, r"^teacher_lr \(--teacher-lr\) must be > 0, got 0$"),
        ({"weight_decay": -1e-4}, r"^weight_decay \(--weight-decay\) must be >= 0, got -0.0001$"),
        ({"kd_temperature": 0}, r"^kd_temperature \(--kd-temperature\) must be > 0, got 0$"),
        ({"kd_weight": -1}, r"^kd_weight \(--kd-weight\) must be >= 0, got -1$"),
        ({"darkrank_weight": float("inf")}, r"^darkrank_weight \(--darkrank-weight\) must be >= 0, got inf$"),
        ({"darkrank_alpha": 0}, r"^darkrank_alpha \(--darkrank-alpha\) must be > 0"),
        ({"darkrank_beta": -2}, r"^darkrank_beta \(--darkrank-beta\) must be > 0"),
        ({"student_width": 0}, r"^student_width \(--student-width\) must be > 0"),
        ({"student": "nin_bn@wide"}, "student spec 'nin_bn@wide' must be NAME or NAME@WIDTH with a finite WIDTH > 0"),
        ({"student": "nin_bn@0"}, "student spec 'nin_bn@0' must be NAME or NAME@WIDTH"),
        ({"student": "nin_bn,,nin_bn@0.25"}, "student spec '' must be NAME or NAME@WIDTH"),
        ({"student": "nin_bn@0.5,nin_bn", "student_width": 0.5}, "the same student is listed twice"),
        ({"students": []}, "students must be a non-empty list of specs"),
        ({"students": "nin_bn"}, r"^students must be a list of strings, got 'nin_bn'$"),
        ({"student": "nin_bn", "students": ["nin_bn@0.25"]}, "give either student .* or students .*, not both"),
        ({"export_precision": "fp32,int4"}, "export_precision must be a comma-separated list of distinct fp32, fp16, int8, int8-static"),
        ({"export_precision": "int8,int8"}, "export_precision must be a comma-separated list of distinct"),
        ({"target_accuracy": 1.5}, r"target_accuracy is a share of the teacher's accuracy in \(0, 1\], got 1.5"),
    ],
)
def test_bad_values(overrides, message):
    with pytest.raises(DistillError, match=message):
        load_config(None, **overrides)


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(DistillError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3")
    with pytest.raises(DistillError, match="is not valid TOML"):
        load_config(bad)


def test_loss_options_from_cli_pairs_and_toml_table(tmp_path):
    cfg = load_config(None, loss_options=["triplet_margin=0.3", "triplet_mining=semihard", "lsoftmax_margin=3"])
    assert cfg.loss_options == {"triplet_margin": 0.3, "triplet_mining": "semihard", "lsoftmax_margin": 3}
    path = tmp_path / "c.toml"
    path.write_text("[loss_options]\nlifted_margin = 0.5\n")
    assert load_config(path).loss_options == {"lifted_margin": 0.5}
    with pytest.raises(DistillError, match="--loss-opt takes KEY=VALUE, got 'margin'"):
        load_config(None, loss_options=["margin"])


def test_darkrank_list_size_none_means_every_other_sample(tmp_path):
    assert Config().darkrank_list_size is None and load_config(None).darkrank_list_size is None  # the measured default
    assert load_config(None, darkrank_list_size="all").darkrank_list_size is None  # the paper: never turned into 8
    assert load_config(None, darkrank_list_size="12").darkrank_list_size == 12  # the CLI passes text
    path = tmp_path / "c.toml"
    path.write_text('darkrank_list_size = "all"\ndarkrank_topk = 8\n')
    cfg = load_config(path)
    assert cfg.darkrank_list_size is None and cfg.darkrank_topk == 8
    assert load_config(None, darkrank_list_size="all", darkrank_topk=63).darkrank_topk == 63
    with pytest.raises(DistillError, match="darkrank_list_size must be an integer or 'all'"):
        load_config(None, darkrank_list_size="most")
    with pytest.raises(DistillError, match=r"darkrank_list_size must be in \[2, batch_size\) or 'all'"):
        load_config(None, darkrank_list_size=8, batch_size=8, images_per_id=2)


def test_soft_darkrank_list_size_limits():
    assert load_config(None, darkrank="soft", darkrank_method="sampled", darkrank_list_size=40).darkrank_list_size == 40
    assert load_config(None, darkrank="soft", darkrank_list_size=20).darkrank_list_size == 20
    assert load_config(None, darkrank="soft", darkrank_list_size="all", batch_size=20, images_per_id=4).darkrank_list_size is None
    cfg = load_config(None, darkrank="soft", darkrank_method="sampled_prefix", darkrank_list_size="all", darkrank_samples=16)
    assert cfg.darkrank_list_size is None and cfg.darkrank_samples == 16
    with pytest.raises(DistillError, match="handles lists of at most 20 candidates, got --darkrank-list-size 21"):
        load_config(None, darkrank="soft", darkrank_list_size=21)
    with pytest.raises(DistillError, match=r"got --darkrank-list-size all \(63 candidates in a batch of 64\): use a --darkrank-list-size <= 20 or --darkrank-method sampled_prefix"):
        load_config(None, darkrank="soft", darkrank_list_size="all")
    with pytest.raises(DistillError, match="at most 9 candidates"):
        load_config(None, darkrank="soft", darkrank_method="bruteforce", darkrank_list_size=10)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"darkrank_topk": 3, "darkrank": "soft"}, "--darkrank-topk is ListMLE@k, a hard DarkRank option"),
        ({"darkrank_topk": 9, "darkrank_list_size": 8}, r"darkrank_topk must be in \[1, 8\] \(the candidates per query\), got 9"),
        ({"darkrank_topk": 0}, r"darkrank_topk must be in \[1, 63\]"),  # all 63 others of a batch of 64
        ({"darkrank_samples": 0}, "darkrank_samples must be >= 1, got 0"),
        ({"pkt_weight": -1.0}, r"pkt_weight \(--pkt-weight\) must be >= 0, got -1"),
        ({"compat_weight": float("nan")}, r"compat_weight \(--compat-weight\) must be >= 0, got nan"),
        ({"rkd_angle_weight": float("inf")}, r"rkd_angle_weight \(--rkd-angle-weight\) must be >= 0, got inf"),
    ],
)
def test_bad_distillation_options(overrides, message):
    with pytest.raises(DistillError, match=message):
        load_config(None, **overrides)


def test_new_distillation_terms_are_off_by_default():
    cfg = Config()
    assert (cfg.rkd_distance_weight, cfg.rkd_angle_weight, cfg.pkt_weight, cfg.regression_weight, cfg.compat_weight) == (0, 0, 0, 0, 0)
    assert cfg.darkrank_topk is None and cfg.darkrank_samples == 128


@pytest.mark.parametrize("name", ["market1501.toml", "cub200.toml"])
def test_example_configs_load(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).parent.parent / "examples" / name)
    assert cfg.teacher == "inception_bn" and cfg.student == "nin_bn"
    assert cfg.data.partition(":")[0] in ("market1501", "cub200")


def test_student_specs_from_cli_list_and_toml_array(tmp_path):
    # one spec keeps today's meaning: --student nin_bn --student-width 0.25
    assert student_specs(load_config(None, student="nin_bn", student_width=0.25)) == [("nin_bn", 0.25)]
    cfg = load_config(None, student=" nin_bn@0.25, nin_bn@0.5 ,timm:mobilenetv3_small_100", student_width=0.75)
    # a bare timm:NAME is 1.0 whatever --student-width says (its name sets its size; build_model refuses others)
    assert student_specs(cfg) == [("nin_bn", 0.25), ("nin_bn", 0.5), ("timm:mobilenetv3_small_100", 1.0)]
    path = tmp_path / "c.toml"
    path.write_text('students = ["nin_bn@0.25", "nin_bn"]\nexport_precision = ["int8", "fp32"]\n')
    cfg = load_config(path)
    assert student_specs(cfg) == [("nin_bn", 0.25), ("nin_bn", Config().student_width)]
    assert export_precisions(cfg) == ["int8", "fp32"]  # the order given
    assert export_precisions(load_config(None, export_precision="fp32, int8-static")) == ["fp32", "int8-static"]


def test_the_lists_of_fields_come_from_their_metadata():
    """The name lists once kept by hand (pipeline.TEACHER_FIELDS, study.SHARED_KEYS/NOT_RESULT_KEYS,
    the number ranges) are now the fields' flags: pinned here to what they were."""
    from dataclasses import fields

    from distill.config import field_info, fields_where, teacher_fields

    assert set(teacher_fields()) == {
        "teacher", "teacher_weights", "embed_dim", "image_size", "augment", "flip", "val_fraction", "teacher_epochs",
        "teacher_steps", "teacher_min_steps", "teacher_lr", "weight_decay", "batch_size", "images_per_id", "sampler",
        "loss", "loss_options", "seed",
    }
    assert set(fields_where("shared")) == {
        "teacher", "teacher_weights", "teacher_epochs", "teacher_lr", "data", "image_size", "strict", "cuhk03_variant",
        "bbox_crop", "split_file", "device", "seed", "out", "name", "resume", "fresh", "keep_checkpoints",
    }
    assert set(fields_where("result", False)) == {
        "out", "name", "resume", "fresh", "keep_checkpoints", "baseline", "export_precision", "bench_iters",
    }
    assert set(fields_where("trains", False)) == {
        "out", "name", "resume", "fresh", "keep_checkpoints", "baseline", "students", "export_precision", "bench_iters",
        "target_accuracy", "clustering", "require_better_teacher", "gate_margin", "device", "workers", "compile",
    }
    above = {f.name for f in fields(Config) if field_info(f.name)["above"] == 0.0}
    at_least = {f.name for f in fields(Config) if field_info(f.name)["at_least"] == 0.0}
    assert above == {"lr", "teacher_lr", "student_width", "kd_temperature", "darkrank_alpha", "darkrank_beta"}
    assert at_least == {
        "weight_decay", "gate_margin", "kd_weight", "darkrank_weight", "rkd_distance_weight", "rkd_angle_weight",
        "pkt_weight", "regression_weight", "compat_weight",
    }
    assert all(field_info(n)["stage"] == "teacher" for n in teacher_fields())  # train-teacher takes them all


def test_one_list_of_precisions():
    from distill import config, export, report

    assert export.PRECISIONS is config.PRECISIONS and report.PRECISIONS is config.PRECISIONS
    assert config.PRECISIONS == ("fp32", "fp16", "int8", "int8-static")


def test_an_option_field_needs_a_known_section_and_stage():
    from distill.config import option

    with pytest.raises(ValueError, match="section must be one of"):
        option(1, "Help.", section="misc")
    with pytest.raises(ValueError, match="stage one of"):
        option(1, "Help.", section="run", stage="later")
