"""Figures of ``moesim plot``: line figures and heatmaps from the results table of
``moesim sweep``, expert popularity from a trace, and a transfer/compute timeline from an event
log.

Modules: :mod:`~simulator.figures.style` (series labels, colours, saving),
:mod:`~simulator.figures.table` (reading the table, ``--filter``, panels),
:mod:`~simulator.figures.curves` (hit rate, stall, time per token, bandwidth),
:mod:`~simulator.figures.heatmaps` (per-layer hit rate, popularity),
:mod:`~simulator.figures.timeline` (Gantt-style event timeline). Each figure has a ``*_data``
function returning the tidy frame that its ``draw_*`` function draws.
"""

#: Every figure kind, in the order ``--kind all`` makes them, with its file name.
KINDS = {
    "hit-rate": "hit_rate",
    "stall": "stall",
    "time-per-token": "time_per_token",
    "bandwidth": "bandwidth",
    "layer-heatmap": "layer_heatmap",
    "popularity": "popularity",
    "timeline": "timeline",
}
