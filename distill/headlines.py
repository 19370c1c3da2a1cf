"""What the report says of each evaluation protocol, by the protocol's name and without torch: the
two headline metrics of its drop/gain/kept columns, the accuracy axis of its Pareto front and plot,
and the note under its table. ``distill.protocols`` gives its ``Protocol`` objects these values;
``distill.report`` reads them here, so that ``distill report`` re-prints a report without torch."""

from __future__ import annotations

REID, RETRIEVAL = "reid", "retrieval"
HEADLINE: dict[str, tuple[str, str]] = {REID: ("rank1", "map"), RETRIEVAL: ("recall@1", "map")}
PARETO_METRIC: dict[str, str] = {REID: "map", RETRIEVAL: "recall@1"}
NOTE: dict[str, str | None] = {
    REID: (
        "re-ID data: drop, gain and kept use rank-1 (each query searched in the gallery with its same-camera "
        "matches removed, the Market-1501 protocol), not R@1 (query and gallery pooled, no camera filter), "
        "because same-camera near-duplicates make pooled R@1 easy for every model"
    ),
    RETRIEVAL: None,
}
