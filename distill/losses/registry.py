"""One registry of losses: every task loss and every distillation term is a small ``nn.Module``
registered once, with its hyper-parameters' defaults and what it needs, and composed by a weighted
spec (``--loss softmax=1,triplet=1``, ``--distill kd=3,darkrank=0.02``):

    @register_loss("pkt", kind="distill", defaults={"pkt_eps": 1e-7}, checks={"pkt_eps": number(0, strict=True)},
                   needs=("teacher_emb",))
    class PKT(nn.Module):
        def __init__(self, pkt_eps: float) -> None: ...
        def forward(self, x: LossInputs) -> Tensor: ...

A loss's ``__init__`` takes its hyper-parameters (the keys of ``defaults``; task losses share one
namespace, so ``triplet_margin`` means the same for ``triplet`` and ``hdml-triplet``) and whichever
of ``embed_dim``, ``num_classes``, ``teacher_dim`` it names. ``forward`` takes one ``LossInputs``
(task losses see the labeled rows only, distillation terms every row) and returns the unweighted
value, or a ``Term`` that adds stats to log or the number of terms its value is a mean over.
Adding a loss is one new module in ``distill/losses`` with its decorated class: the package imports
every module in it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

from distill.errors import DistillError

KINDS = {"task": ("loss", "--loss"), "distill": ("distillation term", "--distill")}  # kind: (noun, option)
NEEDS = {
    "labels": "class labels of the rows",
    "positives": "two or more images of an identity in a batch",
    "teacher_emb": "the teacher's embeddings",
    "teacher_logits": "teacher logits over the task's classes",
}
DIMS = ("embed_dim", "num_classes", "teacher_dim")  # sizes a loss's __init__ may ask for
Check = Callable[[str, Any], None]


class LossInputs(NamedTuple):
    """One minibatch as every loss sees it (float32 or wider)."""

    emb: Tensor
    logits: Tensor
    labels: Tensor
    teacher_emb: Tensor | None = None
    teacher_logits: Tensor | None = None


class Term(NamedTuple):
    """A loss's value with ``stats`` logged as ``"<name>.<key>"`` and, for a mean over tuples,
    ``count``, their number (Deep Ranking's weight penalty is divided by it)."""

    value: Tensor
    stats: dict[str, Tensor | float] = {}
    count: Tensor | None = None


@dataclass(frozen=True)
class LossEntry:
    name: str
    kind: str
    cls: type[nn.Module]
    defaults: dict[str, Any]
    checks: dict[str, Check]
    needs: frozenset[str]
    learnable: bool

    @property
    def summary(self) -> str:
        """The first line of the class's docstring."""
        return (inspect.getdoc(self.cls) or self.name).splitlines()[0]

    def build(self, params: dict[str, Any], **dims: int) -> nn.Module:
        """An instance with its hyper-parameters from ``params`` and the sizes its ``__init__`` names."""
        wanted = inspect.signature(self.cls).parameters
        return self.cls(**{k: params[k] for k in self.defaults}, **{k: v for k, v in dims.items() if k in wanted})


_REGISTRY: dict[str, dict[str, LossEntry]] = {kind: {} for kind in KINDS}


def register_loss(
    name: str,
    kind: str,
    defaults: dict[str, Any] | None = None,
    checks: dict[str, Check] | None = None,
    needs: tuple[str, ...] = (),
    learnable: bool = False,
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register ``cls`` as the ``kind`` ("task" or "distill") loss ``name``, with the
    defaults of its hyper-parameters, a check per hyper-parameter, what it ``needs`` (keys of ``NEEDS``)
    and whether it has ``learnable`` parts (trained and checkpointed with the objective)."""
    defaults, checks = dict(defaults or {}), dict(checks or {})
    if kind not in KINDS:
        raise DistillError(f"unknown loss kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not set(needs) <= NEEDS.keys() or not set(checks) <= defaults.keys():
        raise DistillError(f"loss {name!r}: needs must be among {', '.join(NEEDS)} and checks among its defaults")

    def register(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY[kind]:
            raise DistillError(f"a {KINDS[kind][0]} named {name!r} is registered twice")
        for key, value in defaults.items():
            other = next((e for e in _REGISTRY[kind].values() if key in e.defaults), None)
            if other is not None and other.defaults[key] != value:
                raise DistillError(f"{name!r} and {other.name!r} share {key} but not its default ({value!r}, {other.defaults[key]!r})")
        _REGISTRY[kind][name] = LossEntry(name, kind, cls, defaults, checks, frozenset(needs), learnable)
        return cls

    return register


def entries(kind: str) -> dict[str, LossEntry]:
    """The registered losses of ``kind``, in registration order."""
    return dict(_REGISTRY[kind])


def hyperparameters(kind: str) -> dict[str, Any]:
    """Every hyper-parameter of the ``kind`` losses with its default (task losses share one namespace)."""
    return {k: v for entry in _REGISTRY[kind].values() for k, v in entry.defaults.items()}


def parse_spec(spec: str, kind: str) -> list[tuple[str, float]]:
    """``"softmax=1,triplet=1,lifted=0.5"`` -> ``[("softmax", 1.0), ...]``; a bare name weighs 1.
    A distillation spec may be ``none`` (or empty): no terms."""
    noun, _ = KINDS[kind]
    known = _REGISTRY[kind]
    valid = ", ".join(known)
    if kind == "distill" and spec.strip().lower() in ("", "none"):
        return []
    terms: list[tuple[str, float]] = []
    for item in spec.split(","):
        name, sep, weight_text = (part.strip() for part in item.partition("="))
        if not name or (sep and not weight_text):
            raise DistillError(f"malformed {noun} spec {spec!r}; expected NAME[=WEIGHT],... with NAME one of {valid}")
        if name not in known:
            raise DistillError(f"unknown {noun} {name!r} in {spec!r}; valid names: {valid}")
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            raise DistillError(f"{noun} weight {weight_text!r} for {name!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise DistillError(f"{noun} weight for {name!r} must be a finite number >= 0, got {weight_text!r}")
        if name in (n for n, _ in terms):
            raise DistillError(f"{noun} {name!r} appears twice in {spec!r}; give each {noun} once")
        terms.append((name, weight))
    return terms


def check_params(kind: str, params: dict[str, Any], own: dict[str, Any] | None = None, own_checks: dict[str, Check] | None = None) -> dict[str, Any]:
    """``params`` over the defaults of every ``kind`` loss (and ``own``, the composer's), each checked."""
    defaults = hyperparameters(kind) | (own or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise DistillError(f"unknown {kind}-loss hyper-parameter(s) {', '.join(unknown)}; valid: {', '.join(defaults)}")
    merged = defaults | params
    checks = {k: c for entry in _REGISTRY[kind].values() for k, c in entry.checks.items()} | (own_checks or {})
    for key, check in checks.items():
        check(key, merged[key])
    return merged


def number(low: float = 0.0, strict: bool = False, high: float | None = None, optional: bool = False) -> Check:
    """A finite number ``> low`` (``strict``) or ``>= low``, below ``high`` when given; None when ``optional``."""

    def check(key: str, value: Any) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DistillError(f"{key} must be a finite number, got {value!r}")
        if value < low or (strict and value == low) or (high is not None and value >= high):
            bound = f"{'>' if strict else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")
            raise DistillError(f"{key} must be {bound}, got {value:g}")

    return check


def integer(low: int) -> Check:
    def check(key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DistillError(f"{key} must be an integer >= {low}, got {value!r}")

    return check


def one_of(*choices: Any) -> Check:
    def check(key: str, value: Any) -> None:
        if value not in choices:
            raise DistillError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")

    return check


def boolean(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise DistillError(f"{key} must be true or false, got {value!r}")


class WeightedSum(nn.Module):
    """``sum_i w_i * loss_i`` over the terms of one spec, each an instance of its registered class
    (in ``self.losses``, so learnable parts are trained and checkpointed with it); ``add_to`` adds
    them to a running total. A term that needs teacher outputs the batch lacks is left out of it.

    ``scaled``: each weight is multiplied by a factor measured before training (``scales``, a
    buffer checkpointed with it, NaN until ``distill.balance`` sets it: ``--distill-scale gradient``)."""

    def __init__(self, kind: str, terms: list[tuple[str, float]], params: dict[str, Any], scaled: bool = False,
                 **dims: int) -> None:
        super().__init__()
        self.kind, self.terms = kind, terms
        known = _REGISTRY[kind]
        self.needs = {name: known[name].needs for name, _ in terms}
        self.losses = nn.ModuleDict({name: known[name].build(params, **dims) for name, _ in terms})
        self.scales: Tensor | None
        self.register_buffer("scales", torch.full((len(terms),), float("nan")) if scaled else None)

    def add_to(self, x: LossInputs, total: Tensor) -> tuple[Tensor, dict[str, Tensor | float], Tensor | None]:
        """``(total + the weighted terms, {name: value, "name.stat": value}, count)``: the terms are added
        to ``total`` one by one (so the sum's rounding does not depend on how terms are grouped);
        ``count`` is the last ``Term.count`` given, else None."""
        parts: dict[str, Tensor] = {}
        stats: dict[str, Tensor | float] = {}
        count = None
        for i, (name, weight) in enumerate(self.terms):
            needs = self.needs[name]
            if ("teacher_emb" in needs and x.teacher_emb is None) or ("teacher_logits" in needs and x.teacher_logits is None):
                continue
            out = self.losses[name](x)
            if isinstance(out, Term):
                stats.update({f"{name}.{k}": v for k, v in out.stats.items()})
                count = out.count if out.count is not None else count
                out = out.value
            parts[name] = out
            total = total + (weight if self.scales is None else weight * self.scales[i]) * out
        return total, parts | stats, count


def floats(values: dict[str, Tensor | float]) -> dict[str, float]:
    """Logged values as Python floats, the tensors among them with one device sync."""
    tensors = {k: v for k, v in values.items() if isinstance(v, Tensor)}
    synced = torch.stack([v.detach().float() for v in tensors.values()]).tolist() if tensors else []
    done = dict(zip(tensors, synced))
    return {k: done[k] if k in done else float(v) for k, v in values.items()}
