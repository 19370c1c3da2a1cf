"""build_objective: one Config -> the student's objective; every term weighted as configured, the
default giving exactly the numbers of the hand-written sum it replaced, and a term registered
anywhere driving it by name."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.config import Config
from distill.config_load import load_config
from distill.errors import DistillError
from distill.losses import registry
from distill.losses.darkrank import DarkRankLoss
from distill.losses.kd import kd_loss
from distill.losses.metric import batch_triplet_loss
from distill.losses.registry import LossInputs, entries, number, register_loss
from distill.losses.relational import compatibility_loss, pkt_loss, rkd_angle_loss, rkd_distance_loss
from distill.objective import StudentObjective, build_objective, distillation_fields, unusable_logits

N, D, T_DIM, C = 12, 8, 6, 4


def batch(seed: int = 0, teacher_dim: int = T_DIM, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(N, D, generator=g, dtype=dtype), dim=1)
    logits = torch.randn(N, C, generator=g, dtype=dtype)
    labels = torch.arange(C).repeat_interleave(N // C)
    t_emb = F.normalize(torch.randn(N, teacher_dim, generator=g, dtype=dtype), dim=1)
    return emb, logits, labels, (t_emb, torch.randn(N, C, generator=g, dtype=dtype))


def teacher(embed_dim: int = T_DIM, has_logits: bool = True, num_classes: int | None = C) -> SimpleNamespace:
    return SimpleNamespace(embed_dim=embed_dim, has_logits=has_logits, num_classes=num_classes)


def test_without_a_teacher_only_the_task_losses() -> None:
    cfg = load_config(None, embed_dim=D, loss="softmax=1,triplet=1", distill="kd=3,pkt=1")
    objective = build_objective(cfg, C)
    emb, logits, labels, t_out = batch()
    total, parts = objective(emb, logits, labels, t_out)
    assert set(parts) == {"softmax", "triplet"} and objective.distill.terms == []


def test_defaults_are_kd_and_hard_darkrank() -> None:
    objective = build_objective(Config(embed_dim=D), C, teacher())
    assert objective.distill.terms == [("kd", 3.0), ("darkrank", 0.02)]
    dr = objective.distill.losses["darkrank"].loss
    assert (dr.mode, dr.list_size, dr.topk) == ("hard", None, None)
    assert objective.distill.losses["kd"].temperature == 1.0
    assert not list(objective.parameters())  # softmax + triplet, KD, DarkRank: nothing learnable in the objective


@pytest.mark.parametrize("seed", [0, 1])
def test_the_default_objective_is_the_old_hand_written_sum_bit_for_bit(seed: int) -> None:
    """The objective before the registry: ``task + 3 * kd + 0.02 * darkrank`` added in that order, the
    task ``0 + softmax + triplet`` (batch-hard, margin 0.2); the same float32 value and gradients."""
    emb, logits, labels, (t_emb, t_logits) = batch(seed)
    leaves = [emb.clone().requires_grad_(), logits.clone().requires_grad_()]
    loss, parts = build_objective(Config(embed_dim=D), C, teacher())(*leaves, labels, (t_emb, t_logits))
    loss.backward()
    e, lg = emb.clone().requires_grad_(), logits.clone().requires_grad_()
    softmax, triplet = F.cross_entropy(lg, labels), batch_triplet_loss(e, labels, 0.2, "hard")
    task = e.new_zeros(()) + 1.0 * softmax + 1.0 * triplet
    kd = kd_loss(lg, t_logits, 1.0)
    dr = DarkRankLoss(3.0, 3.0, mode="hard", list_size=None)(e, t_emb)
    ref = task + 3.0 * kd
    ref = ref + 0.02 * dr
    ref.backward()
    assert torch.equal(loss, ref) and torch.equal(leaves[0].grad, e.grad) and torch.equal(leaves[1].grad, lg.grad)
    assert parts == {"softmax": softmax.item(), "triplet": triplet.item(), "kd": kd.item(), "darkrank": dr.item()}


def test_every_term_weighted_as_configured() -> None:
    spec = "darkrank=0.2,kd=1.5,rkd_distance=0.5,rkd_angle=2,pkt=3,regression=0.25"
    cfg = load_config(
        None, embed_dim=D, loss="softmax=1", distill=spec, darkrank_list_size="all", darkrank_topk=3, kd_temperature=2.5
    )
    torch.manual_seed(0)
    objective = build_objective(cfg, C, teacher())
    emb, logits, labels, (t_emb, t_logits) = batch(1)
    total, parts = objective(emb, logits, labels, (t_emb, t_logits))
    proj = objective.distill.losses["regression"].regression.projection
    ref = {
        "softmax": F.cross_entropy(logits, labels),
        "darkrank": DarkRankLoss(mode="hard", topk=3)(emb, t_emb),
        "kd": kd_loss(logits, t_logits, 2.5),
        "rkd_distance": rkd_distance_loss(emb, t_emb),
        "rkd_angle": rkd_angle_loss(emb, t_emb),
        "pkt": pkt_loss(emb, t_emb),
        "regression": (proj(emb) - t_emb).pow(2).sum(1).mean(),
    }
    w = {"softmax": 1.0, "darkrank": 0.2, "kd": 1.5, "rkd_distance": 0.5, "rkd_angle": 2.0, "pkt": 3.0, "regression": 0.25}
    torch.testing.assert_close(total, sum(w[k] * v for k, v in ref.items()))
    assert list(parts) == list(ref)  # the task losses, then the terms in the spec's order
    for k, v in ref.items():
        assert parts[k] == pytest.approx(v.item(), rel=1e-5)
    # the projection (student 8 -> teacher 6) is trained and checkpointed with the objective
    assert proj.weight.shape == (T_DIM, D)
    assert {"distill.losses.regression.regression.projection.weight"} <= set(objective.state_dict())
    total.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_a_zero_weight_turns_a_term_off() -> None:
    objective = build_objective(load_config(None, embed_dim=D, distill="kd=0,pkt=1"), C, teacher())
    assert objective.distill.terms == [("pkt", 1.0)]
    assert build_objective(load_config(None, embed_dim=D, distill="none"), C, teacher()).distill.terms == []


def test_compat_term_and_its_dimension_check() -> None:
    cfg = load_config(None, embed_dim=D, loss="softmax=1", distill="compat=2")
    objective = build_objective(cfg, C, teacher(embed_dim=D, has_logits=False))
    emb, logits, labels, (t_emb, _) = batch(2, teacher_dim=D)
    total, parts = objective(emb, logits, labels, (t_emb, None))
    assert list(parts) == ["softmax", "compat"]
    torch.testing.assert_close(total, F.cross_entropy(logits, labels) + 2.0 * compatibility_loss(emb, t_emb, labels))
    with pytest.raises(DistillError, match=r"must be the teacher's: got 8 and 6 \(set --embed-dim 6\)"):
        build_objective(cfg, C, teacher(embed_dim=6))


def test_darkrank_options_reach_the_loss() -> None:
    cfg = load_config(None, darkrank="soft", darkrank_method="sampled_prefix", darkrank_list_size="all", darkrank_samples=7)
    dr = build_objective(cfg, C, teacher()).distill.losses["darkrank"].loss
    assert (dr.mode, dr.method, dr.list_size, dr.num_samples, dr.topk) == ("soft", "sampled_prefix", None, 7, None)


def test_unknown_terms_and_options() -> None:
    with pytest.raises(DistillError, match=r"unknown distillation term 'fitnet' in 'kd=1,fitnet=1'; valid names: darkrank, kd, rkd_distance"):
        StudentObjective("softmax", D, C, distill="kd=1,fitnet=1")
    with pytest.raises(DistillError, match=r"^distillation term 'kd' appears twice in 'kd,kd=2'; give each distillation term once$"):
        load_config(None, distill="kd,kd=2")
    with pytest.raises(DistillError, match=r"^distillation term weight for 'pkt' must be a finite number >= 0, got '-1'$"):
        load_config(None, distill="pkt=-1")
    with pytest.raises(DistillError, match=r"^unknown distill-loss hyper-parameter\(s\) kd_temp; valid: darkrank, "):
        StudentObjective("softmax", D, C, distill="kd", distill_options={"kd_temp": 2.0})
    with pytest.raises(DistillError, match=r"^kd_temperature must be > 0, got 0$"):
        StudentObjective("softmax", D, C, distill="kd", distill_options={"kd_temperature": 0.0})


def test_unusable_teacher_logits_turn_kd_off_with_one_message() -> None:
    """One rule (``unusable_logits``) and one message, naming the reason, only when a term needs them."""
    assert unusable_logits(teacher(), C) is None
    assert unusable_logits(teacher(num_classes=1000), C) == f"the teacher has 1000 classes, the task {C}"
    assert unusable_logits(teacher(num_classes=1000), 0) is None  # no labeled data: the student takes its classes
    assert unusable_logits(teacher(has_logits=False, num_classes=None), C) == "the teacher has no classifier logits"
    for t, reason in ((teacher(has_logits=False, num_classes=1000), "the teacher has 1000 classes, the task 4"),
                      (teacher(has_logits=False, num_classes=None), "the teacher has no classifier logits")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            objective = build_objective(Config(embed_dim=D), C, t)
        assert [str(w.message) for w in caught] == [f"{reason}: kd is off (the embedding-level terms still apply)"]
        assert objective.distill.terms == [("darkrank", 0.02)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no KD asked for: nothing to say
        build_objective(load_config(None, embed_dim=D, distill="pkt=1"), C, teacher(has_logits=False, num_classes=None))


def test_a_term_registered_anywhere_is_driven_by_the_distill_spec(monkeypatch) -> None:
    """Adding a distillation term is one class and its decorator: ``--distill toy=2`` then configures,
    builds and weighs it; its hyper-parameter takes the registered default when Config has no field."""
    monkeypatch.setattr(registry, "_REGISTRY", {kind: dict(known) for kind, known in registry._REGISTRY.items()})

    @register_loss("toy", kind="distill", defaults={"toy_power": 2.0}, checks={"toy_power": number(0.0, strict=True)},
                   needs=("teacher_emb",))
    class Toy(nn.Module):
        """match the norms of the teacher's embeddings"""

        def __init__(self, toy_power: float) -> None:
            super().__init__()
            self.power = toy_power

        def forward(self, x: LossInputs) -> Tensor:
            return (x.emb.norm(dim=1) - x.teacher_emb.norm(dim=1)).abs().pow(self.power).mean()

    cfg = load_config(None, embed_dim=D, loss="softmax", distill="toy=2")
    assert {"toy_power", "distill_scale"} <= set(distillation_fields())  # left out of a baseline's checkpoint recipe like every term's
    objective = build_objective(cfg, C, teacher())
    emb, logits, labels, (t_emb, t_logits) = batch(3)
    t_emb = 2 * t_emb  # norms 1 (student) and 2 (teacher): the toy term is exactly 1
    emb.requires_grad_()
    total, parts = objective(emb, logits, labels, (t_emb, t_logits))
    assert parts["toy"] == pytest.approx(1.0) and list(parts) == ["softmax", "toy"]
    torch.testing.assert_close(total, F.cross_entropy(logits, labels) + 2.0)
    total.backward()
    assert emb.grad.abs().sum() > 0
    with pytest.raises(DistillError, match="a distillation term named 'toy' is registered twice"):
        register_loss("toy", kind="distill")(Toy)


def test_registry_entries_are_consistent() -> None:
    """Every distillation term's hyper-parameters default to the Config's; ``learnable`` is true exactly
    for the losses that have parameters; ``needs`` only names known needs."""
    cfg = Config()
    for name, entry in entries("distill").items():
        assert {k: getattr(cfg, k) for k in entry.defaults} == entry.defaults, name
        assert set(entry.defaults) <= set(distillation_fields())
    for kind in ("task", "distill"):
        for name, entry in entries(kind).items():
            module = entry.build(registry.hyperparameters(kind), embed_dim=D, num_classes=C, teacher_dim=D if name == "compat" else T_DIM)
            assert bool(list(module.parameters())) == entry.learnable, name
            assert entry.needs <= set(registry.NEEDS) and entry.summary
