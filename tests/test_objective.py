"""build_objective: one Config -> the student's objective; every term weighted as configured."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from distill.config import Config, load_config
from distill.errors import DistillError
from distill.losses.darkrank import DarkRankLoss
from distill.losses.kd import kd_loss
from distill.losses.relational import compatibility_loss, pkt_loss, rkd_angle_loss, rkd_distance_loss
from distill.objective import EMBEDDING_TERMS, build_objective

N, D, T_DIM, C = 12, 8, 6, 4


def batch(seed: int = 0, teacher_dim: int = T_DIM):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(N, D, generator=g), dim=1)
    logits = torch.randn(N, C, generator=g)
    labels = torch.arange(C).repeat_interleave(N // C)
    t_emb = F.normalize(torch.randn(N, teacher_dim, generator=g), dim=1)
    return emb, logits, labels, (t_emb, torch.randn(N, C, generator=g))


def teacher(embed_dim: int = T_DIM, has_logits: bool = True) -> SimpleNamespace:
    return SimpleNamespace(embed_dim=embed_dim, has_logits=has_logits)


def test_without_a_teacher_only_the_task_losses() -> None:
    cfg = load_config(None, embed_dim=D, loss="softmax=1,triplet=1", pkt_weight=1.0)
    objective = build_objective(cfg, C)
    emb, logits, labels, t_out = batch()
    total, parts = objective(emb, logits, labels, t_out)
    assert set(parts) == {"softmax", "triplet"}
    assert objective.darkrank is None and objective.kd_weight == 0 and objective.embedding_weights == {}


def test_defaults_add_only_kd_and_darkrank() -> None:
    objective = build_objective(Config(embed_dim=D), C, teacher())
    assert objective.embedding_weights == {} and objective.regression is None
    assert objective.kd_weight == 3.0 and objective.darkrank.list_size is None and objective.darkrank_weight == 0.02 and objective.darkrank.mode == "hard"
    assert not list(objective.parameters())  # softmax + triplet, nothing learnable in the objective


def test_every_term_weighted_as_configured() -> None:
    weights = dict(rkd_distance_weight=0.5, rkd_angle_weight=2.0, pkt_weight=3.0, regression_weight=0.25)
    cfg = load_config(
        None, embed_dim=D, loss="softmax=1", kd_weight=1.5, darkrank_weight=0.2, darkrank_list_size="all",
        darkrank_topk=3, **weights,
    )
    torch.manual_seed(0)
    objective = build_objective(cfg, C, teacher())
    emb, logits, labels, (t_emb, t_logits) = batch(1)
    total, parts = objective(emb, logits, labels, (t_emb, t_logits))
    proj = objective.regression.projection
    ref = {
        "softmax": F.cross_entropy(logits, labels),
        "kd": kd_loss(logits, t_logits, 4.0),
        "darkrank": DarkRankLoss(mode="hard", topk=3)(emb, t_emb),
        "rkd_distance": rkd_distance_loss(emb, t_emb),
        "rkd_angle": rkd_angle_loss(emb, t_emb),
        "pkt": pkt_loss(emb, t_emb),
        "regression": (proj(emb) - t_emb).pow(2).sum(1).mean(),
    }
    w = {"softmax": 1.0, "kd": 1.5, "darkrank": 0.2} | {k.removesuffix("_weight"): v for k, v in weights.items()}
    torch.testing.assert_close(total, sum(w[k] * v for k, v in ref.items()))
    assert list(parts) == list(ref)
    for k, v in ref.items():
        assert parts[k] == pytest.approx(v.item(), rel=1e-5)
    # the projection (student 8 -> teacher 6) is trained and checkpointed with the objective
    assert proj.weight.shape == (T_DIM, D)
    assert {"regression.projection.weight", "regression.projection.bias"} <= set(objective.state_dict())
    total.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_compat_term_and_its_dimension_check() -> None:
    cfg = load_config(None, embed_dim=D, loss="softmax=1", kd_weight=0.0, darkrank="none", compat_weight=2.0)
    objective = build_objective(cfg, C, teacher(embed_dim=D, has_logits=False))
    emb, logits, labels, (t_emb, _) = batch(2, teacher_dim=D)
    total, parts = objective(emb, logits, labels, (t_emb, None))
    assert list(parts) == ["softmax", "compat"]
    torch.testing.assert_close(total, F.cross_entropy(logits, labels) + 2.0 * compatibility_loss(emb, t_emb, labels))
    with pytest.raises(DistillError, match=r"must be the teacher's: got 8 and 6 \(set --embed-dim 6\)"):
        build_objective(cfg, C, teacher(embed_dim=6))


def test_darkrank_options_reach_the_loss() -> None:
    cfg = load_config(None, darkrank="soft", darkrank_method="sampled_prefix", darkrank_list_size="all", darkrank_samples=7)
    dr = build_objective(cfg, C, teacher()).darkrank
    assert (dr.mode, dr.method, dr.list_size, dr.num_samples, dr.topk) == ("soft", "sampled_prefix", None, 7, None)


def test_unknown_embedding_term() -> None:
    from distill.objective import StudentObjective

    assert EMBEDDING_TERMS == ("rkd_distance", "rkd_angle", "pkt", "regression", "compat")
    with pytest.raises(DistillError, match="unknown distillation term.*fitnet"):
        StudentObjective("softmax", D, C, embedding_weights={"fitnet": 1.0})
