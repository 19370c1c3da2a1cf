"""Config: defaults <- TOML <- overrides, and one clear error per bad value."""

from __future__ import annotations

import pytest

from distill.config import Config
from distill.config_load import distill_terms, export_precisions, load_config, student_specs, validate
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
        ({"darkrank": "medium"}, "^--darkrank must be one of hard, soft, got 'medium'$"),
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
        ({"distill": "kd=-1"}, r"^distillation term weight for 'kd' must be a finite number >= 0, got '-1'$"),
        ({"distill": "darkrank=inf"}, r"^distillation term weight for 'darkrank' must be a finite number >= 0, got 'inf'$"),
        ({"distill": "fitnet=1"}, r"^unknown distillation term 'fitnet' in 'fitnet=1'; valid names: darkrank, kd, rkd_distance, rkd_angle, pkt, regression, compat$"),
        ({"distill": "kd=1,"}, r"^malformed distillation term spec 'kd=1,'; expected NAME\[=WEIGHT\],\.\.\. with NAME one of darkrank, kd, "),
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
    ],
)
def test_bad_distillation_options(overrides, message):
    with pytest.raises(DistillError, match=message):
        load_config(None, **overrides)


def test_the_default_distillation_is_kd_and_hard_darkrank():
    cfg = Config()
    assert (cfg.distill, cfg.darkrank, cfg.kd_temperature) == ("kd=3,darkrank=0.02", "hard", 1.0)
    assert cfg.darkrank_topk is None and cfg.darkrank_samples == 128
    assert distill_terms(cfg) == {"kd": 3.0, "darkrank": 0.02}
    assert distill_terms(load_config(None, distill="none")) == {} and distill_terms(load_config(None, distill=" ")) == {}
    assert distill_terms(load_config(None, distill="kd=0,pkt")) == {"pkt": 1.0}  # a weight of 0 is off


@pytest.mark.parametrize(
    "values, message",
    [
        ({"kd_weight": 1.0}, 'kd_weight was replaced by --distill: use --distill kd=1,darkrank=0.02 (in a TOML file: distill = "kd=1,darkrank=0.02")'),
        ({"kd_weight": 0.0, "darkrank": "none"}, 'kd_weight, darkrank = "none" were replaced by --distill: use --distill none (in a TOML file: distill = "none")'),
        ({"darkrank": "none"}, 'darkrank = "none" was replaced by --distill: use --distill kd=3 (in a TOML file: distill = "kd=3")'),
        ({"kd_weight": 3.0, "darkrank": "none", "rkd_distance_weight": 10, "rkd_angle_weight": 20},
         "kd_weight, rkd_distance_weight, rkd_angle_weight, darkrank = \"none\" were replaced by --distill: use --distill kd=3,rkd_distance=10,rkd_angle=20 "),
        ({"pkt_weight": 1.0, "regression_weight": 0.5, "compat_weight": 2}, "pkt_weight, regression_weight, compat_weight were replaced by --distill: use --distill kd=3,darkrank=0.02,pkt=1,regression=0.5,compat=2 "),
        ({"kd_weight": "high"}, "kd_weight was replaced by --distill: use --distill kd=high,darkrank=0.02 "),
    ],
)
def test_replaced_options_name_the_distill_spec(values, message, tmp_path):
    """Old options fail with one line giving the --distill spec that means what they said, from the
    command line (or a study recipe) and from a TOML file alike."""
    with pytest.raises(DistillError) as err:
        load_config(None, **values)
    assert str(err.value).startswith(message)
    path = tmp_path / "old.toml"
    path.write_text("".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in values.items()))
    with pytest.raises(DistillError) as err:
        load_config(path)
    assert str(err.value).startswith(f"config file {path}: {message}")
    with pytest.raises(DistillError, match=r'^darkrank = "none" was replaced by --distill: use --distill kd=3 '):
        validate(Config(darkrank="none"))  # a Config built in Python


def test_a_run_on_unlabeled_images_alone_needs_distillation_terms():
    with pytest.raises(DistillError, match=r"^--data none trains the student through the distillation terms alone, and --distill is 'none': give some"):
        load_config(None, data="none", unlabeled="imgs", distill="none")
    assert load_config(None, data="none", unlabeled="imgs", distill="pkt=1").distill == "pkt=1"


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
        "loss", "loss_options", "seed", "amp", "channels_last",
    }
    assert set(fields_where("shared")) == {
        "teacher", "teacher_weights", "teacher_epochs", "teacher_lr", "data", "image_size", "strict", "cuhk03_variant",
        "bbox_crop", "split_file", "device", "seed", "out", "name", "resume", "fresh", "keep_checkpoints",
    }
    assert set(fields_where("result", False)) == {
        "out", "name", "resume", "fresh", "keep_checkpoints", "keep_comparison_files", "baseline", "export_precision",
        "bench_iters",
    }
    assert set(fields_where("trains", False)) == {
        "out", "name", "resume", "fresh", "keep_checkpoints", "keep_comparison_files", "baseline", "students",
        "export_precision", "bench_iters", "target_accuracy", "clustering", "require_better_teacher", "gate_margin", "device", "workers", "compile",
    }
    above = {f.name for f in fields(Config) if field_info(f.name)["above"] == 0.0}
    at_least = {f.name for f in fields(Config) if field_info(f.name)["at_least"] == 0.0}
    assert above == {"lr", "teacher_lr", "student_width", "kd_temperature", "darkrank_alpha", "darkrank_beta"}
    assert at_least == {"weight_decay", "gate_margin", "mix_rows"}
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
