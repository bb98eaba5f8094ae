"""Report figures drawn with matplotlib: training curves, confusion matrices and guidance / steps sweeps.

Every function builds a ``matplotlib.figure.Figure`` on its own Agg canvas, so nothing needs a display and nothing
global changes (no ``pyplot``, no ``matplotlib.use``): importing this module, or drawing, leaves other figures and
the process's backend alone. ``to_png`` turns a figure into PNG bytes (and writes them atomically if given a path)::

    png = to_png(curves({'img': [(0, 1.2), (50, 0.8)], 'text': [(0, 1.0), (50, 0.9)]}, 'losses', 'MSE'))
    to_png(confusion(matrix, labels, 'emotion, 7-way'), 'out/eval/confusion_7.png')
"""
import io
import math
from collections import defaultdict
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from libs.io import atomic_write_bytes

Series = Mapping[str, Sequence[Tuple[float, Optional[float]]]]  # {name: [(x, y), ...]}; y None = no value there

DPI = 100
PANEL_SIZE = (4.6, 3.0)   # inches per curve / sweep panel
CELL_INCHES = 0.32        # side of one confusion-matrix cell


def new_figure(width: float, height: float) -> Figure:
    """A figure attached to an Agg canvas (what ``to_png`` renders), laid out to fit its labels."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout='constrained')
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure, path: Optional[str] = None) -> bytes:
    """Render a figure as PNG bytes; with a path, also write them there atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=DPI)
    data = buffer.getvalue()
    if path is not None:
        atomic_write_bytes(path, data)
    return data


def grid_shape(n: int, ncols: int) -> Tuple[int, int]:
    """(rows, cols) of a panel grid holding n panels, at most ncols wide."""
    cols = max(1, min(ncols, n))
    return math.ceil(n / cols), cols


# ----------------------------------------------------------------------------------------------------------------
# Curves
# ----------------------------------------------------------------------------------------------------------------

def plot_series(ax, series: Series, title: str = '', ylabel: str = '', xlabel: str = 'step',
                log_y: bool = False) -> None:
    """Draw {name: [(x, y), ...]} as lines on ax (points with y None are skipped), with a legend if named."""
    drawn = 0
    for name, points in series.items():
        xy = [(x, y) for x, y in points if y is not None]
        if xy:
            xs, ys = zip(*xy)
            ax.plot(xs, ys, label=name, linewidth=1.4, marker='.' if len(xy) < 30 else None)
            drawn += 1
    if log_y and drawn:
        ax.set_yscale('log')
        # Plain numbers (0.3, 2) on the log axis rather than 3x10^-1: losses are read, not their exponents. Between
        # the decades only 2 and 5 are labelled, and only when the axis spans at most two decades (more would crowd).
        ax.yaxis.set_major_formatter(FormatStrFormatter('%g'))
        low, high = ax.get_ylim()
        if math.log10(high / low) <= 2:
            ax.yaxis.set_minor_locator(LogLocator(subs=(2., 5.)))
            ax.yaxis.set_minor_formatter(FormatStrFormatter('%g'))
        else:
            ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize='small')
    else:
        ax.text(0.5, 0.5, 'no data', ha='center', va='center', transform=ax.transAxes, color='grey')


def curves(series: Series, title: str = '', ylabel: str = '', xlabel: str = 'step', log_y: bool = False) -> Figure:
    """One panel of curves, e.g. the training losses {'img': [(step, loss), ...], 'clip': ..., 'text': ...}."""
    fig = new_figure(*PANEL_SIZE)
    plot_series(fig.add_subplot(), series, title, ylabel, xlabel, log_y)
    return fig


def curve_panels(panels: Sequence[Mapping], ncols: int = 3) -> Figure:
    """Several curve panels in one figure; each panel is a dict of ``plot_series`` arguments (series, title, ...)."""
    if not panels:
        raise ValueError('curve_panels needs at least one panel')
    rows, cols = grid_shape(len(panels), ncols)
    fig = new_figure(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        plot_series(ax, **panel)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# Confusion matrix
# ----------------------------------------------------------------------------------------------------------------

def row_shares(matrix) -> np.ndarray:
    """Each row of a count matrix divided by its sum (rows without samples stay 0)."""
    m = np.asarray(matrix, dtype=np.float64)
    sums = m.sum(1, keepdims=True)
    return np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)


def confusion(matrix, labels: Sequence[str], title: str = '') -> Figure:
    """Heat map of a confusion matrix (rows gold, columns predicted): colour = share of the gold row, cell = count.

    Colours are row-normalised because with skewed labels raw counts would leave every rare class blank; counts are
    printed in the non-empty cells so that the size of each row stays readable.
    """
    counts = np.asarray(matrix)
    k = len(labels)
    if counts.shape != (k, k):
        raise ValueError(f'matrix of shape {counts.shape} does not match {k} labels')
    share = row_shares(counts)
    side = max(3.0, CELL_INCHES * k + 2.0)
    fig = new_figure(side + 0.8, side)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap='Blues', vmin=0, vmax=1, interpolation='nearest')
    fontsize = 9 if k <= 10 else 6
    for i, j in zip(*np.nonzero(counts)):
        ax.text(j, i, str(int(counts[i, j])), ha='center', va='center', fontsize=fontsize,
                color='white' if share[i, j] > 0.5 else 'black')
    ax.set_xticks(range(k), labels, rotation=90, fontsize=fontsize + 1)
    ax.set_yticks(range(k), labels, fontsize=fontsize + 1)
    ax.set(xlabel='predicted', ylabel='gold', title=title or f'{int(counts.sum())} labelled samples')
    fig.colorbar(image, ax=ax, shrink=0.8, label='share of the gold row')
    return fig


# ----------------------------------------------------------------------------------------------------------------
# Guidance scale / steps sweep
# ----------------------------------------------------------------------------------------------------------------

def sweep(rows: Sequence[Mapping], metrics: Sequence[str], x: str = 'scale', group: str = 'steps',
          labels: Optional[Dict[str, str]] = None, ncols: int = 3) -> Figure:
    """One panel per metric: the metric against ``x`` with one line per value of ``group``.

    ``rows`` are one dict per evaluated setting, e.g. ``{'scale': 3.0, 'steps': 20, 'bleu4': 12.1, 'fine_acc': 0.4}``;
    ``x='scale', group='steps'`` gives the metrics against the guidance scale, one line per step count, and
    ``x='steps', group='scale'`` the metrics against the number of function evaluations. ``labels`` names keys
    for titles, axes and legends (default: the keys themselves); a row without a metric leaves a gap.
    """
    if not rows or not metrics:
        raise ValueError('sweep needs at least one row and one metric')
    missing = [key for key in (x, group) if any(key not in r for r in rows)]
    if missing:
        raise ValueError(f'every row needs the keys {missing}')
    name = lambda key: (labels or {}).get(key, key)  # noqa: E731
    lines = defaultdict(list)
    for r in rows:
        lines[r[group]].append(r)
    panels = []
    for metric in metrics:
        series = {f'{name(group)} {g}': [(r[x], r.get(metric)) for r in sorted(lines[g], key=lambda r: r[x])]
                  for g in sorted(lines)}
        panels.append(dict(series=series, title=name(metric), ylabel=name(metric), xlabel=name(x)))
    return curve_panels(panels, ncols)
