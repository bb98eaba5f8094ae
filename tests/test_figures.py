"""libs.figures: what each figure draws (read back from its artists), PNG output, and no global matplotlib state."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from libs import figures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lines_of(ax):
    """{legend label: (xs, ys)} of the lines drawn on ax."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_to_png_returns_bytes_and_writes_them_atomically(tmp_path):
    fig = figures.curves({'loss': [(0, 1.0), (10, 0.5)]}, 'title', 'MSE')
    path = tmp_path / 'sub' / 'curve.png'
    data = figures.to_png(fig, str(path))
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and path.read_bytes() == data
    assert not [p for p in os.listdir(path.parent) if p != 'curve.png']  # no temp file left
    image = Image.open(io.BytesIO(data))
    assert image.size == tuple(round(s * figures.DPI) for s in figures.PANEL_SIZE)


def test_curves_draw_every_series_and_skip_missing_values():
    series = {'img': [(0, 1.0), (50, 0.7), (100, 0.5)], 'text': [(0, 2.0), (50, None), (100, 1.0)],
              'empty': [(0, None)]}
    fig = figures.curves(series, 'EmpathDiffuser losses', 'MSE', log_y=True)
    ax = fig.axes[0]
    assert lines_of(ax) == {'img': ([0, 50, 100], [1.0, 0.7, 0.5]), 'text': ([0, 100], [2.0, 1.0])}
    assert ax.get_title() == 'EmpathDiffuser losses' and ax.get_ylabel() == 'MSE' and ax.get_xlabel() == 'step'
    assert ax.get_yscale() == 'log'
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ['img', 'text']
    figures.to_png(fig)  # renders with the log formatter


def test_curve_panels_lay_out_the_demo_curves():
    steps = range(0, 200, 50)
    panels = [dict(series={k: [(s, 1 / (1 + s)) for s in steps] for k in ('img', 'clip', 'text')},
                   title='noise-prediction losses', ylabel='MSE'),
              dict(series={'emotion CE': [(s, 3 - s / 100) for s in steps]}, title='emotion', ylabel='CE'),
              dict(series={'32-way': [(100, 0.2), (200, 0.4)], '7-way': [(100, 0.5), (200, 0.9)]},
                   title='validation accuracy', ylabel='accuracy'),
              dict(series={'L1': [(0, 0.3), (10, 0.1)]}, title='codec', ylabel='L1'),
              dict(series={'LM loss': []}, title='caption decoder', ylabel='CE')]
    fig = figures.curve_panels(panels, ncols=3)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(fig.axes) == 6 and [ax.get_title() for ax in visible] == [p['title'] for p in panels]
    assert set(lines_of(visible[0])) == {'img', 'clip', 'text'} and not visible[4].get_lines()
    assert 'no data' in [t.get_text() for t in visible[4].texts]
    assert Image.open(io.BytesIO(figures.to_png(fig))).size == (3 * 460, 2 * 300)
    with pytest.raises(ValueError):
        figures.curve_panels([])


def test_confusion_colours_are_row_shares_and_cells_show_counts():
    labels = ['happy', 'surprised', 'angry']
    counts = np.array([[5, 0, 1], [1, 3, 0], [0, 0, 0]])
    fig = figures.confusion(counts, labels, 'emotion, 3-way')
    ax = [a for a in fig.axes if a.get_title()][0]
    # Independent: each row divided by its own total, an empty row all zero.
    expected = np.array([[5 / 6, 0, 1 / 6], [1 / 4, 3 / 4, 0], [0, 0, 0]])
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), expected)
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells == {(0, 0): '5', (0, 2): '1', (1, 0): '1', (1, 1): '3'}  # empty cells stay blank
    assert [t.get_text() for t in ax.get_xticklabels()] == labels == [t.get_text() for t in ax.get_yticklabels()]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ('predicted', 'gold', 'emotion, 3-way')
    assert ax.images[0].get_clim() == (0, 1)
    assert figures.confusion(counts, labels).axes[0].get_title() == '10 labelled samples'
    with pytest.raises(ValueError, match='does not match 2 labels'):
        figures.confusion(counts, labels[:2])


def test_sweep_has_one_panel_per_metric_and_one_line_per_step_count():
    rows = [dict(scale=s, steps=n, bleu4=s + n, acc=None if (s, n) == (3, 20) else s * n / 100)
            for n in (20, 10) for s in (7, 0, 3)]
    fig = figures.sweep(rows, ['bleu4', 'acc'], labels=dict(scale='guidance scale', bleu4='BLEU-4'))
    bleu, acc = [ax for ax in fig.axes if ax.get_visible()]
    assert bleu.get_title() == 'BLEU-4' and bleu.get_xlabel() == 'guidance scale' and acc.get_title() == 'acc'
    assert lines_of(bleu) == {'steps 10': ([0, 3, 7], [10, 13, 17]), 'steps 20': ([0, 3, 7], [20, 23, 27])}
    assert lines_of(acc)['steps 20'] == ([0, 7], [0.0, 1.4])  # the missing value leaves a gap
    by_steps = figures.sweep(rows, ['bleu4'], x='steps', group='scale').axes[0]
    assert lines_of(by_steps)['scale 3'] == ([10, 20], [13, 23])
    with pytest.raises(ValueError, match='steps'):
        figures.sweep([dict(scale=1, bleu4=2)], ['bleu4'])


def test_drawing_changes_no_global_matplotlib_state():
    code = ('import sys, matplotlib; before = matplotlib.rcParams._get_backend_or_none(); '
            'from libs import figures; figures.to_png(figures.curves({"a": [(0, 1)]})); '
            'assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"; '
            'assert matplotlib.rcParams._get_backend_or_none() == before, "the backend changed"')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ''
