"""Draw a timeline's lanes over time (the paper's Fig. 15) to a PNG; matplotlib is a bench extra."""

from __future__ import annotations

from klotski.errors import KlotskiError
from klotski.timeline import Timeline

COLORS = {
    "attention": "#4c72b0",
    "gate": "#dd8452",
    "expert": "#55a868",
    "dense_mlp": "#8172b3",
    "embed": "#937860",
    "head": "#937860",
    "sample": "#937860",
    "wait": "#c44e52",
    "read": "#64b5cd",
}


def require_matplotlib() -> None:
    """Fail before a run whose --timeline could not be drawn after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise KlotskiError("--timeline needs matplotlib: pip install 'klotski-moe[bench]'") from None


def plot_timeline(
    timeline: Timeline, path: str, start: float | None = None, end: float | None = None, title: str = ""
) -> None:
    """One row per lane; compute ops coloured by kind, waits (bubbles) in red, transfers in blue."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KlotskiError("--timeline needs matplotlib: pip install 'klotski-moe[bench]'") from None
    events = [e for e in timeline.events if (start is None or e.end >= start) and (end is None or e.start <= end)]
    lanes = sorted({e.lane for e in events}, key=lambda l: (l != "compute", l))
    fig, ax = plt.subplots(figsize=(14, 1 + 0.6 * len(lanes)))
    for row, lane in enumerate(lanes):
        spans = [(e.start, e.end - e.start, COLORS.get(e.kind, "#999999")) for e in events if e.lane == lane]
        ax.broken_barh([(s, w) for s, w, _ in spans], (row - 0.4, 0.8), facecolors=[c for _, _, c in spans])
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_xlabel("seconds")
    ax.set_title(title or "klotski timeline (red: compute waiting on a transfer)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, list(COLORS), ncol=len(COLORS), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
