"""The plots' reading of a trace: which span is the block the timeline figure shows."""

from __future__ import annotations

from benchmarks.plots import block_window


def _span(kind, start, end, **args):
    return {"lane": "compute", "kind": kind, "start": start, "end": end, **args}


def test_the_block_window_counts_a_resident_tables_two_embed_spans_as_one_step():
    """With the embedding table resident a step opens with two spans named embed (the row gather
    and the embedding); the window is the last step's last MoE layer, not the gap between them."""
    events = []
    for step in range(3):
        t = 10.0 * step
        events += [_span("embed", t, t + 0.1), _span("embed", t + 0.1, t + 0.2)]
        events += [_span("attention", t + 1, t + 2), _span("expert", t + 2, t + 3, layer=0)]
        events += [_span("attention", t + 4, t + 5, layer=1), _span("expert", t + 5, t + 6, layer=1, expert=3)]
    assert block_window(events) == (14.0, 16.0, 1)
