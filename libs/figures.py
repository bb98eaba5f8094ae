"""Report figures drawn with matplotlib on their own Agg canvas: no pyplot, no global backend switch, no display.

``sweep_figure`` draws an evaluation sweep (eval_avamerg.py ``--scales`` / ``--steps``): every metric against the
guidance scale (one line per step count) and against the number of network evaluations (one line per scale).
"""
import io
from collections import defaultdict
from typing import Mapping, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from libs.io import atomic_write_bytes

DPI = 100
PANEL_INCHES = (4.2, 2.8)  # width, height of one panel


def _line_label(key: str, value) -> str:
    """Legend entry of one line: 'steps 20', 'scale 3'."""
    return f'{key} {value:g}' if isinstance(value, (int, float)) else f'{key} {value}'


def _draw(ax, rows: Sequence[Mapping], metric: str, x: str, group: str, labels: Mapping[str, str]) -> None:
    """metric against x on ax, one line per value of group; rows without the metric (None) leave a gap."""
    ax.set(xlabel=labels.get(x, x), title=labels.get(metric, metric))
    ax.grid(True, alpha=0.3)
    if all(r.get(metric) is None for r in rows):
        ax.text(0.5, 0.5, 'not computed', ha='center', va='center', transform=ax.transAxes, color='grey')
        ax.set(xticks=[], yticks=[])
        return
    lines = defaultdict(list)
    for r in rows:
        lines[r[group]].append(r)
    for value in sorted(lines, key=lambda v: (v is None, v)):
        points = sorted(((r[x], r.get(metric)) for r in lines[value]), key=lambda point: point[0])
        xs, ys = zip(*[(a, float('nan') if b is None else b) for a, b in points])
        ax.plot(xs, ys, marker='o', linewidth=1.4, label=_line_label(labels.get(group, group), value))
    ax.legend(fontsize='small')


def sweep_figure(rows: Sequence[Mapping], metrics: Sequence[str], path: Optional[str] = None,
                 labels: Optional[Mapping[str, str]] = None) -> bytes:
    """A PNG of the sweep `rows` (dicts with 'scale', 'steps', 'nfe' and the metrics): one panel row per metric.

    Left: the metric against the guidance scale, one line per step count; right: against NFE, one line per scale.
    A column with a single x value (one scale, or one step count) is left out, unless both are single. Written
    atomically to `path` if given; returns the PNG bytes.
    """
    if not rows or not metrics:
        raise ValueError('a sweep figure needs at least one row and one metric')
    missing = [k for k in ('scale', 'steps', 'nfe') if any(k not in r for r in rows)]
    if missing:
        raise ValueError(f'every sweep row needs the keys {missing}')
    labels = dict(scale='guidance scale', nfe='NFE', **(labels or {}))
    columns = [(x, group) for x, group in (('scale', 'steps'), ('nfe', 'scale')) if len({r[x] for r in rows}) > 1]
    columns = columns or [('scale', 'steps')]
    fig = Figure(figsize=(PANEL_INCHES[0] * len(columns), PANEL_INCHES[1] * len(metrics)), dpi=DPI)
    FigureCanvasAgg(fig)
    # Fixed margins: an automatic layout measures every label first and doubles the drawing time.
    axes = fig.subplots(len(metrics), len(columns), squeeze=False,
                        gridspec_kw=dict(left=0.1, right=0.97, bottom=0.3 / len(metrics), top=1 - 0.3 / len(metrics),
                                         hspace=0.55, wspace=0.25))
    for metric, row_axes in zip(metrics, axes):
        for ax, (x, group) in zip(row_axes, columns):
            _draw(ax, rows, metric, x, group, labels)
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=DPI)
    if path is not None:
        atomic_write_bytes(path, buffer.getvalue())
    return buffer.getvalue()
