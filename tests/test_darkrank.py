"""DarkRank against slow, obviously-right references (Python loops, enumeration, float64)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import distill.losses.plackett_luce as plackett_luce
from distill.errors import DistillError
from distill.losses.darkrank import DarkRankLoss, darkrank_scores, hard_darkrank, soft_darkrank

F64 = torch.float64


def make_scores(kind: str, q: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher scores [q, m]: "normal", "ties" (few distinct values), or "large" (+-60)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        return (torch.randint(-2, 3, (2, q, m), generator=g).to(F64) * 0.5).unbind()
    scale = 20.0 if kind == "large" else 1.0
    return (torch.randn(2, q, m, generator=g, dtype=F64) * scale).unbind()


def py_logsumexp(xs: list[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def py_log_pl(scores: list[float], order: list[int]) -> float:
    """log Plackett-Luce probability of ranking ``order``, term by term."""
    return sum(scores[order[i]] - py_logsumexp([scores[j] for j in order[i:]]) for i in range(len(order)))


def py_hard(s: torch.Tensor, t: torch.Tensor) -> float:
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        order = sorted(range(len(trow)), key=lambda j: -trow[j])  # stable: ties keep candidate order
        total -= py_log_pl(srow, order)
    return total / len(s)


def py_soft(s: torch.Tensor, t: torch.Tensor) -> float:
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        for order in itertools.permutations(range(len(trow))):
            lt = py_log_pl(trow, list(order))
            total += math.exp(lt) * (lt - py_log_pl(srow, list(order)))
    return total / len(s)


def value_and_grad(fn, s: torch.Tensor, t: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    s = s.clone().requires_grad_(True)
    loss = fn(s, t, **kw)
    return loss.detach(), torch.autograd.grad(loss, s)[0]


@pytest.mark.parametrize("kind", ["normal", "ties", "large"])
@pytest.mark.parametrize("m", range(2, 9))
def test_exact_equals_bruteforce(kind: str, m: int) -> None:
    for seed in range(2):
        s, t = make_scores(kind, 4, m, seed + 10 * m)
        exact, g_exact = value_and_grad(soft_darkrank, s, t, method="exact")
        brute, g_brute = value_and_grad(soft_darkrank, s, t, method="bruteforce")
        torch.testing.assert_close(exact, brute, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(g_exact, g_brute, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", ["log", "float32"])
@pytest.mark.parametrize("m", [2, 5, 8])
def test_each_exact_path_equals_bruteforce(monkeypatch: pytest.MonkeyPatch, path: str, m: int) -> None:
    """Rows too wide for probabilities take the log-space DP; narrow float32 rows run in float32."""
    if path == "log":
        monkeypatch.setattr(plackett_luce, "F64_SPREAD", -1.0)
        s, t = make_scores("large", 5, m, m)
        tol = {"rtol": 1e-10, "atol": 1e-10}
    else:
        s, t = (x.float() for x in make_scores("normal", 5, m, m))
        tol = {"rtol": 2e-5, "atol": 2e-5}
    exact, g_exact = value_and_grad(soft_darkrank, s, t, method="exact")
    brute, g_brute = value_and_grad(soft_darkrank, s.double(), t.double(), method="bruteforce")
    torch.testing.assert_close(exact.double(), brute, **tol)
    torch.testing.assert_close(g_exact.double(), g_brute, **tol)


def test_rows_of_both_paths_in_one_batch_equal_each_row_alone() -> None:
    s, t = make_scores("normal", 6, 7, 3)
    s[::2] *= 1e3  # spread far beyond F64_SPREAD: the log-space DP
    both, g_both = value_and_grad(soft_darkrank, s, t)
    for i in range(len(s)):
        one, g_one = value_and_grad(soft_darkrank, s[i : i + 1], t[i : i + 1])
        torch.testing.assert_close(g_both[i] * len(s), g_one[0], rtol=1e-12, atol=1e-12)
    alone = torch.stack([soft_darkrank(s[i : i + 1], t[i : i + 1]) for i in range(len(s))]).mean()
    torch.testing.assert_close(both, alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", [10, 14])
def test_probability_dp_equals_log_space_dp_beyond_enumeration(m: int) -> None:
    """At M where enumeration is impossible, the two DPs (independent code) agree to 1e-10."""
    s, t = (x * 3 for x in make_scores("normal", 2, m, m))
    kl_p, g_p = plackett_luce._soft_exact_probs(s, t, True)
    kl_l, g_l = plackett_luce._soft_exact_log(s, t, True)
    torch.testing.assert_close(kl_p, kl_l, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_p, g_l, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["normal", "ties", "large"])
def test_bruteforce_equals_python_loop(kind: str) -> None:
    for seed in range(3):
        s, t = make_scores(kind, 3, 4, seed)
        assert soft_darkrank(s, t, method="bruteforce").item() == pytest.approx(py_soft(s, t), rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("kind", ["normal", "ties", "large"])
def test_hard_equals_python_loop(kind: str) -> None:
    for seed in range(3):
        s, t = make_scores(kind, 5, 7, seed)
        assert hard_darkrank(s, t).item() == pytest.approx(py_hard(s, t), rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("method", ["exact", "bruteforce"])
@pytest.mark.parametrize("kind", ["normal", "ties", "large"])
def test_soft_nonnegative_and_zero_iff_shift(method: str, kind: str) -> None:
    s, t = make_scores(kind, 6, 5, 3)
    per_row = torch.stack([soft_darkrank(s[i : i + 1], t[i : i + 1], method) for i in range(6)])
    differ = ~torch.isclose(s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)).all(1)
    assert differ.any()
    assert (per_row[differ] > 1e-6).all()
    assert (per_row[~differ].abs() < 1e-12).all()
    shifted = t + torch.randn(6, 1, dtype=F64) * 5
    assert soft_darkrank(shifted, t, method).abs().item() < 1e-12


@pytest.mark.parametrize("kind", ["normal", "ties", "large"])
def test_row_shift_invariance(kind: str) -> None:
    s, t = make_scores(kind, 5, 6, 4)
    shift_s, shift_t = torch.randn(5, 1, dtype=F64) * 10, torch.randn(5, 1, dtype=F64) * 10
    for fn in (hard_darkrank, soft_darkrank):
        torch.testing.assert_close(fn(s + shift_s, t + shift_t), fn(s, t), rtol=1e-10, atol=1e-10)


def test_sampled_is_unbiased_in_value_and_gradient() -> None:
    torch.manual_seed(0)
    s, t = make_scores("normal", 2, 6, 5)
    exact, g_exact = value_and_grad(soft_darkrank, s, t)
    runs = [value_and_grad(soft_darkrank, s, t, method="sampled", num_samples=64) for _ in range(300)]
    values = torch.stack([v for v, _ in runs])
    grads = torch.stack([g for _, g in runs])
    se = values.std() / math.sqrt(len(runs))
    assert se < 0.05 * exact  # the check below is sharp enough to see a bias
    assert (values.mean() - exact).abs() < 4 * se
    g_se = grads.std(0) / math.sqrt(len(runs))
    assert ((grads.mean(0) - g_exact).abs() < 5 * g_se).all()


def test_sampled_any_list_size_and_close_to_exact_at_m12() -> None:
    torch.manual_seed(1)
    s, t = make_scores("normal", 2, 12, 6)
    exact = soft_darkrank(s, t)
    assert soft_darkrank(s, t, method="sampled", num_samples=4000).item() == pytest.approx(exact.item(), rel=0.05)
    s, t = make_scores("normal", 3, 40, 7)
    assert torch.isfinite(soft_darkrank(s, t, method="sampled", num_samples=8))


def test_gradcheck() -> None:
    s, t = make_scores("normal", 3, 5, 8)
    t[:, 1] = t[:, 3]  # a tie in the teacher
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: soft_darkrank(x, t, method="exact"), (s,))
    assert torch.autograd.gradcheck(lambda x: soft_darkrank(x, t, method="bruteforce"), (s,))
    assert torch.autograd.gradcheck(lambda x: hard_darkrank(x, t), (s,))


def test_exact_chunking_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    s, t = make_scores("normal", 7, 9, 9)
    whole, g_whole = value_and_grad(soft_darkrank, s, t)
    monkeypatch.setattr(plackett_luce, "_CHUNK_BYTES", 1)  # one query per chunk
    chunked, g_chunked = value_and_grad(soft_darkrank, s, t)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_chunked, g_whole, rtol=1e-12, atol=1e-12)


def test_exact_inner_chunking_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    s, t = make_scores("normal", 7, 9, 19)
    whole, g_whole = value_and_grad(soft_darkrank, s, t)
    monkeypatch.setattr(plackett_luce, "_EXACT_CHUNK_BYTES", 1)  # one row per chunk of the probability DP
    chunked, g_chunked = value_and_grad(soft_darkrank, s, t)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_chunked, g_whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_extreme_scores_stay_finite(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(11)
    s = torch.randn(4, 7, generator=g).sign().to(dtype) * 1e4
    t = torch.randn(4, 7, generator=g).sign().to(dtype) * -1e4
    for fn, kw in [
        (hard_darkrank, {}),
        (soft_darkrank, {"method": "exact"}),
        (soft_darkrank, {"method": "bruteforce"}),
        (soft_darkrank, {"method": "sampled", "num_samples": 16}),
    ]:
        value, grad = value_and_grad(fn, s, t, **kw)
        assert value.dtype == dtype and torch.isfinite(value) and value > 0
        assert torch.isfinite(grad).all()


def test_float32_close_to_float64_and_low_precision_computed_in_float32() -> None:
    s, t = make_scores("normal", 4, 10, 12)
    ref = soft_darkrank(s, t)
    assert ref.dtype == F64
    assert soft_darkrank(s.float(), t.float()).item() == pytest.approx(ref.item(), rel=1e-5)
    low = soft_darkrank(s.bfloat16(), t.half())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(soft_darkrank(s.bfloat16().float(), t.half().float()).item(), rel=1e-6)


def test_teacher_scores_get_no_gradient() -> None:
    s, t = make_scores("normal", 3, 5, 13)
    s.requires_grad_(True)
    t.requires_grad_(True)
    (hard_darkrank(s, t) + soft_darkrank(s, t) + soft_darkrank(s, t, "sampled", 4)).backward()
    assert t.grad is None and s.grad is not None


def test_darkrank_scores_against_loop() -> None:
    g = torch.Generator().manual_seed(14)
    query, cand = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, 5, 4, generator=g, dtype=F64)
    scores = darkrank_scores(query, cand, alpha=2.0, beta=1.5)
    for i in range(3):
        for j in range(5):
            dist = math.sqrt(sum((a - b) ** 2 for a, b in zip(query[i].tolist(), cand[i, j].tolist())))
            assert scores[i, j].item() == pytest.approx(-2.0 * dist**1.5, rel=1e-12)
    shared = cand[0]
    torch.testing.assert_close(darkrank_scores(query, shared, 2.0, 1.5), darkrank_scores(query, shared.expand(3, 5, 4), 2.0, 1.5))


def test_darkrank_scores_zero_distance_has_finite_gradient() -> None:
    query = torch.randn(2, 3, dtype=F64, requires_grad=True)
    cand = torch.stack([query.detach(), torch.randn(2, 3, dtype=F64)], dim=1).requires_grad_(True)
    darkrank_scores(query, cand, 3.0, 3.0).sum().backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(cand.grad).all()


def hand_built_loss(student: torch.Tensor, teacher: torch.Tensor, alpha: float, beta: float, m: int, mode: str):
    """Each query's list built by a loop: the m others nearest to it in teacher space."""
    def dist(x: torch.Tensor, i: int, j: int) -> float:
        return math.sqrt(sum((a - b) ** 2 for a, b in zip(x[i].tolist(), x[j].tolist())))

    n = len(student)
    s_rows, t_rows = [], []
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: dist(teacher, i, j))[:m]
        s_rows.append([-alpha * dist(student, i, j) ** beta for j in others])
        t_rows.append([-alpha * dist(teacher, i, j) ** beta for j in others])
    s, t = torch.tensor(s_rows, dtype=F64), torch.tensor(t_rows, dtype=F64)
    return py_hard(s, t) if mode == "hard" else soft_darkrank(s, t, method="bruteforce").item()


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("list_size", [None, 3, 5])
def test_darkrank_loss_lists_match_hand_built(mode: str, list_size: int | None) -> None:
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        student = torch.randn(7, 4, generator=g, dtype=F64)
        teacher = torch.randn(7, 6, generator=g, dtype=F64)  # embedding sizes may differ
        loss = DarkRankLoss(alpha=2.0, beta=1.5, mode=mode, list_size=list_size)(student, teacher)
        ref = hand_built_loss(student, teacher, 2.0, 1.5, list_size or 6, mode)
        assert loss.item() == pytest.approx(ref, rel=1e-10)


def test_darkrank_loss_gradients_reach_only_the_student() -> None:
    student = torch.randn(6, 4, requires_grad=True)
    teacher = torch.randn(6, 8, requires_grad=True)
    DarkRankLoss(list_size=4)(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_darkrank_loss_under_autocast_computes_in_float32() -> None:
    torch.manual_seed(15)
    student, teacher = torch.randn(10, 8), torch.randn(10, 8)
    loss_fn = DarkRankLoss(list_size=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(student.bfloat16(), teacher.bfloat16())
    assert loss.dtype == torch.float32
    ref = loss_fn(student.bfloat16().float(), teacher.bfloat16().float())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: soft_darkrank(torch.zeros(3, 4), torch.zeros(3, 5)), r"same shape; got student \[3, 4\] and teacher \[3, 5\]"),
        (lambda: hard_darkrank(torch.zeros(4), torch.zeros(4)), r"must be \[Q, M\] tensors"),
        (lambda: hard_darkrank(torch.zeros(2, 0), torch.zeros(2, 0)), "at least one query and one candidate"),
        (lambda: soft_darkrank(torch.zeros(2, 10), torch.zeros(2, 10), "bruteforce"), r"supports M <= 9 \(got M=10\)"),
        (lambda: soft_darkrank(torch.zeros(1, 21), torch.zeros(1, 21)), r"at most 20 candidates per query \(got M=21\)"),
        (lambda: soft_darkrank(torch.zeros(2, 3), torch.zeros(2, 3), "greedy"), "unknown DarkRank method 'greedy'"),
        (lambda: soft_darkrank(torch.zeros(2, 3), torch.zeros(2, 3), "sampled", 0), "num_samples must be >= 1"),
        (lambda: DarkRankLoss(mode="medium"), "unknown DarkRank mode 'medium'; choose one of hard, soft"),
        (lambda: DarkRankLoss(method="greedy"), "unknown DarkRank method 'greedy'"),
        (lambda: DarkRankLoss(alpha=0.0), "alpha and beta must be > 0"),
        (lambda: DarkRankLoss(list_size=0), "list_size must be >= 1"),
        (lambda: DarkRankLoss(list_size=8)(torch.zeros(8, 4), torch.zeros(8, 4)), r"list_size=8 needs a batch of at least 9 samples \(got 8\)"),
        (lambda: DarkRankLoss()(torch.zeros(1, 4), torch.zeros(1, 4)), r"a batch of at least 2 samples \(got 1\)"),
        (lambda: DarkRankLoss()(torch.zeros(6, 4), torch.zeros(5, 4)), "same batch size; got"),
        (lambda: DarkRankLoss()(torch.zeros(22, 4), torch.zeros(22, 4)), r"at most 20 candidates per query \(got M=21\)"),
        (lambda: darkrank_scores(torch.zeros(3, 4), torch.zeros(3, 5, 6)), "with the same D"),
        (lambda: darkrank_scores(torch.zeros(3, 4), torch.zeros(2, 5, 4)), "lists for 2 queries but query_emb has 3"),
    ],
)
def test_bad_inputs(call, message: str) -> None:
    with pytest.raises(DistillError, match=message):
        call()


# --- ListMLE@k, the full list, sampled prefixes, beta < 1 -------------------------------------


def py_hard_topk(s: torch.Tensor, t: torch.Tensor, k: int) -> float:
    """ListMLE@k by a loop: the teacher's first k picks, each a softmax over all candidates left."""
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        order = sorted(range(len(trow)), key=lambda j: -trow[j])
        for i in range(min(k, len(order))):
            total -= srow[order[i]] - py_logsumexp([srow[j] for j in order[i:]])
    return total / len(s)


@pytest.mark.parametrize("kind", ["normal", "ties", "large"])
@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_hard_topk_equals_python_loop(kind: str, k: int) -> None:
    s, t = make_scores(kind, 5, 9, 20 + k)
    assert hard_darkrank(s, t, topk=k).item() == pytest.approx(py_hard_topk(s, t, k), rel=1e-10, abs=1e-10)


def test_hard_topk_equals_full_list_when_k_is_m() -> None:
    s, t = make_scores("normal", 6, 8, 21)
    full = hard_darkrank(s, t)
    for k in (7, 8, 50):  # the last pick's factor is 1, so k = M - 1 is the full list too
        torch.testing.assert_close(hard_darkrank(s, t, topk=k), full, rtol=1e-12, atol=1e-12)
    assert hard_darkrank(s, t, topk=3) < full


def test_hard_topk_gradcheck() -> None:
    s, t = make_scores("normal", 3, 6, 22)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: hard_darkrank(x, t, topk=3), (s,))


def pull_farthest_onto_query(student: torch.Tensor, teacher: torch.Tensor, query: int) -> torch.Tensor:
    """The student with the query's teacher-farthest sample moved onto the query."""
    far = torch.cdist(teacher, teacher)[query].argmax().item()
    moved = student.clone()
    moved[far] = student[query] + 1e-3
    return moved


@pytest.mark.parametrize(("list_size", "topk"), [(None, None), (None, 3), (None, 1)])
def test_pulling_an_outside_sample_in_front_raises_the_loss(list_size, topk) -> None:
    g = torch.Generator().manual_seed(23)
    teacher = torch.randn(12, 5, generator=g, dtype=F64)
    student = teacher[:, :4] * 1.1  # a student that ranks much like the teacher
    loss = DarkRankLoss(mode="hard", list_size=list_size, topk=topk, beta=1.0)
    before = loss(student, teacher)
    after = loss(pull_farthest_onto_query(student, teacher, 0), teacher)
    assert after > before + 0.1


def test_cut_list_does_not_see_an_outside_sample() -> None:
    """The documented limitation of list_size=M: PL on the M nearest ignores the query's far sample
    in the query's own row (only rows where that sample is a near candidate change)."""
    g = torch.Generator().manual_seed(23)
    teacher = torch.randn(12, 5, generator=g, dtype=F64)
    student = teacher[:, :4] * 1.1
    loss = DarkRankLoss(mode="hard", list_size=3, beta=1.0)
    idx = loss.candidates(teacher)
    moved = pull_farthest_onto_query(student, teacher, 0)
    far = torch.cdist(teacher, teacher)[0].argmax().item()
    s0 = darkrank_scores(student[:1], student[idx[:1]], 3.0, 1.0)
    s1 = darkrank_scores(moved[:1], moved[idx[:1]], 3.0, 1.0)
    assert far not in idx[0].tolist()
    torch.testing.assert_close(s0, s1)  # query 0's cut list is blind to the move


def test_darkrank_loss_topk_matches_hand_built() -> None:
    g = torch.Generator().manual_seed(24)
    student, teacher = torch.randn(7, 4, generator=g, dtype=F64), torch.randn(7, 6, generator=g, dtype=F64)
    loss = DarkRankLoss(alpha=2.0, beta=1.5, mode="hard", topk=2)(student, teacher)

    def rows(x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[-2.0 * (x[i] - x[j]).norm().item() ** 1.5 for j in range(7) if j != i] for i in range(7)], dtype=F64)

    assert loss.item() == pytest.approx(py_hard_topk(rows(student), rows(teacher), 2), rel=1e-10)


def test_sampled_prefix_is_unbiased_with_lower_variance() -> None:
    torch.manual_seed(25)
    s, t = make_scores("normal", 2, 6, 26)
    exact, g_exact = value_and_grad(soft_darkrank, s, t)
    runs = [value_and_grad(soft_darkrank, s, t, method="sampled_prefix", num_samples=8) for _ in range(400)]
    values, grads = torch.stack([v for v, _ in runs]), torch.stack([g for _, g in runs])
    se = values.std() / math.sqrt(len(runs))
    assert se < 0.02 * exact  # sharp enough to see a bias
    assert (values.mean() - exact).abs() < 4 * se
    g_se = grads.std(0) / math.sqrt(len(runs))
    assert ((grads.mean(0) - g_exact).abs() < 5 * g_se).all()
    plain = torch.stack([soft_darkrank(s, t, method="sampled", num_samples=8) for _ in range(400)])
    assert values.std() < 0.75 * plain.std()  # measured here: 0.29 vs 0.47


def test_sampled_prefix_single_row_against_python_loop() -> None:
    """One sampled ranking per row, replayed by a loop over its steps with the same Gumbel noise."""
    s, t = make_scores("normal", 3, 5, 27)
    torch.manual_seed(3)
    value = soft_darkrank(s, t, method="sampled_prefix", num_samples=1)
    torch.manual_seed(3)
    gumbel = -torch.empty(3, 1, 5, dtype=F64).exponential_().log()
    total = 0.0
    for i in range(3):
        ranked = sorted(range(5), key=lambda j: -(t[i, j] + gumbel[i, 0, j]).item())
        srow, trow = s[i].tolist(), t[i].tolist()
        for step in range(5):
            left = ranked[step:]
            lt, ls = py_logsumexp([trow[j] for j in left]), py_logsumexp([srow[j] for j in left])
            total += sum(math.exp(trow[j] - lt) * ((trow[j] - lt) - (srow[j] - ls)) for j in left)
    assert value.item() == pytest.approx(total / 3, rel=1e-10)


def test_sampled_prefix_gradcheck_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    s, t = make_scores("normal", 3, 5, 28)

    def seeded(x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)
        return soft_darkrank(x, t, method="sampled_prefix", num_samples=4)

    assert torch.autograd.gradcheck(seeded, (s.clone().requires_grad_(True),))
    whole = seeded(s)
    monkeypatch.setattr(plackett_luce, "_CHUNK_BYTES", 1)  # one row per chunk: other draws, same mean
    assert torch.isfinite(seeded(s)) and seeded(s).item() == pytest.approx(whole.item(), rel=0.5)


def test_sampled_prefix_any_list_size() -> None:
    s, t = make_scores("normal", 3, 40, 29)
    value, grad = value_and_grad(soft_darkrank, s, t, method="sampled_prefix", num_samples=8)
    assert torch.isfinite(value) and value > 0 and torch.isfinite(grad).all()
    loss = DarkRankLoss(mode="soft", method="sampled_prefix", num_samples=4)
    assert loss.num_samples == 4 and torch.isfinite(loss(torch.randn(30, 4), torch.randn(30, 8)))


@pytest.mark.parametrize("beta", [0.5, 1.0, 3.0])
def test_duplicated_images_give_finite_gradients_for_any_beta(beta: float) -> None:
    g = torch.Generator().manual_seed(30)
    student = torch.randn(6, 4, generator=g, dtype=F64)
    student[3] = student[1]  # a duplicated image
    student.requires_grad_(True)
    teacher = torch.randn(6, 5, generator=g, dtype=F64)
    for mode in ("hard", "soft"):
        DarkRankLoss(mode=mode, beta=beta)(student, teacher).backward()
        assert torch.isfinite(student.grad).all()
        student.grad = None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: hard_darkrank(torch.zeros(2, 3), torch.zeros(2, 3), topk=0), "topk must be >= 1"),
        (lambda: DarkRankLoss(mode="soft", topk=3), r"needs mode 'hard' \(ListMLE@k\); got topk=3, mode='soft'"),
        (lambda: DarkRankLoss(num_samples=0), "num_samples must be >= 1; got 0"),
        (lambda: soft_darkrank(torch.zeros(2, 3), torch.zeros(2, 3), "sampled_prefix", 0), "num_samples must be >= 1"),
    ],
)
def test_bad_topk_and_samples(call, message: str) -> None:
    with pytest.raises(DistillError, match=message):
        call()


def test_darkrank_gradient_is_the_same_every_time_on_a_multithreaded_cpu():
    """Same inputs, same gradient bit for bit (what makes `--seed` reproduce a distilled student)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        student, teacher = torch.randn(64, 128, generator=gen), torch.randn(64, 256, generator=gen)
        grads = []
        for loss in (DarkRankLoss(mode="hard", list_size=None), DarkRankLoss(mode="soft", list_size=12)):
            for _ in range(5):
                x = student.clone().requires_grad_(True)
                loss(x, teacher).backward()
                grads.append(x.grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:5])
    assert all(torch.equal(grads[5], g) for g in grads[6:])
