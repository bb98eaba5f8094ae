"""Draw the README's overview figure of EmpathDiffuser (assets/empathdiffuser.png).

    python scripts/make_figures.py                     # rewrites assets/empathdiffuser.png

The figure is a diagram, not a result: the two faces in it are the synthetic example faces of assets/, drawn by rule.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from libs import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('out', 'assets/empathdiffuser.png', 'where the overview figure is written (PNG)')
flags.DEFINE_integer('dpi', 110, 'resolution of the PNG; the figure is 11 x 4.4 inches')

FIGSIZE = (11, 4.4)  # inches; the canvas below is drawn in these units
SPEAKER_FACE, LISTENER_FACE = 'assets/speaker_sad.png', 'assets/listener_caring.png'
# One colour per role, so that the reader follows the speaker's path from input to attention.
SPEAKER, RESPONSE, FROZEN, HEAD = '#f6d5c8', '#cfe3f5', '#e9e9e9', '#d9ecd0'


def box(ax, x, y, w, h, text, color, size=9, weight='normal'):
    """A rounded box with centred text; (x, y) is its lower left corner."""
    from matplotlib.patches import FancyBboxPatch
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle='round,pad=0.02,rounding_size=0.08', fc=color, ec='#444444',
                                lw=0.9))
    ax.text(x + w / 2, y + h / 2, text, ha='center', va='center', fontsize=size, weight=weight, wrap=True)


def arrow(ax, start, end, color='#333333', style='-|>', rad=0.0):
    """An arrow from ``start`` to ``end``; ``rad`` bends it."""
    from matplotlib.patches import FancyArrowPatch
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=11, color=color, lw=1.1,
                                 connectionstyle=f'arc3,rad={rad}', shrinkA=2, shrinkB=2))


def face(fig, path, left, bottom, size):
    """Show the image at ``path`` in a square of ``size`` inches at (left, bottom) inches."""
    from PIL import Image
    ax = fig.add_axes([left / FIGSIZE[0], bottom / FIGSIZE[1], size / FIGSIZE[0], size / FIGSIZE[1]])
    with Image.open(path) as im:
        ax.imshow(im.convert('RGB'), interpolation='nearest')
    ax.set_xticks([])
    ax.set_yticks([])


def draw():
    """The overview figure: speaker turn -> U-ViT with a speaker prefix -> listener face, utterance and emotion."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=FIGSIZE)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, FIGSIZE[0])
    ax.set_ylim(0, FIGSIZE[1])
    ax.axis('off')

    # Speaker turn (left).
    ax.text(0.85, 4.15, 'speaker turn', ha='center', fontsize=10, weight='bold')
    face(fig, SPEAKER_FACE, 0.35, 2.55, 1.0)
    ax.text(0.85, 2.35, 'face', ha='center', fontsize=8)
    box(ax, 0.1, 1.1, 1.5, 0.75, '"I lost my job\ntoday."', SPEAKER, size=8.5)
    ax.text(0.85, 0.9, 'utterance', ha='center', fontsize=8)

    # Frozen encoders.
    box(ax, 2.0, 2.75, 1.55, 0.7, 'VAE encoder\n+ CLIP ViT-B/32', FROZEN, size=8)
    box(ax, 2.0, 1.12, 1.55, 0.7, 'CLIP ViT-L/14\n+ encode_prefix', FROZEN, size=8)
    arrow(ax, (1.38, 3.05), (2.0, 3.1))
    arrow(ax, (1.6, 1.47), (2.0, 1.47))

    # The U-ViT: speaker prefix (clean, t = 0) and noisy response segment.
    box(ax, 4.0, 0.45, 3.35, 3.5, '', '#fbfbfb')
    ax.text(5.675, 3.68, 'U-ViT (UniDiffuser-v1, 30 blocks)', ha='center', fontsize=9.5, weight='bold')
    box(ax, 4.2, 2.45, 1.35, 0.95, 'speaker\nprefix\nclean, t = 0', SPEAKER, size=8)
    box(ax, 5.8, 2.45, 1.35, 0.95, 'response\nface + text\nnoisy, t', RESPONSE, size=8)
    box(ax, 4.2, 0.7, 2.95, 1.25, 'gated prefix attention:\nresponse tokens also read the speaker\n'
                                  'through zero-initialised gate maps', '#fff6d6', size=8)
    arrow(ax, (3.55, 3.1), (4.2, 2.95))
    arrow(ax, (3.55, 1.47), (4.2, 2.6), rad=-0.15)
    arrow(ax, (4.88, 2.45), (4.88, 1.95))
    arrow(ax, (6.48, 1.95), (6.48, 2.45))
    ax.text(7.5, 4.1, 'noise', ha='center', fontsize=8)
    arrow(ax, (7.5, 4.0), (7.0, 3.4), rad=0.2)
    ax.text(5.675, 0.18, 'DPM-Solver++, guidance over the speaker', ha='center', fontsize=8, style='italic')

    # Outputs (right).
    ax.text(9.75, 4.15, 'listener response', ha='center', fontsize=10, weight='bold')
    box(ax, 7.75, 2.75, 1.2, 0.7, 'VAE decoder', FROZEN, size=8)
    box(ax, 7.75, 1.7, 1.2, 0.7, 'GPT-2 caption\ndecoder', FROZEN, size=8)
    box(ax, 7.75, 0.65, 1.2, 0.7, 'emotion head\non [EMO]', HEAD, size=8)
    arrow(ax, (7.15, 3.0), (7.75, 3.1))
    arrow(ax, (7.15, 2.6), (7.75, 2.05), rad=0.1)
    arrow(ax, (7.15, 1.2), (7.75, 1.0))
    face(fig, LISTENER_FACE, 9.25, 2.6, 1.0)
    arrow(ax, (8.95, 3.1), (9.25, 3.1))
    box(ax, 9.2, 1.72, 1.7, 0.66, '"I\'m so sorry.\nHow are you holding up?"', RESPONSE, size=7.5)
    arrow(ax, (8.95, 2.05), (9.2, 2.05))
    box(ax, 9.2, 0.67, 1.7, 0.66, 'speaker emotion\n(32 or 7 classes)', HEAD, size=8)
    arrow(ax, (8.95, 1.0), (9.2, 1.0))
    return fig


def main(argv):
    del argv
    import io

    from libs.io import atomic_write_bytes
    fig = draw()
    buffer = io.BytesIO()
    # No metadata: the same code draws the same bytes, so the committed PNG changes only when the figure does.
    fig.savefig(buffer, format='png', dpi=FLAGS.dpi, metadata={'Software': None})
    atomic_write_bytes(FLAGS.out, buffer.getvalue())
    print(FLAGS.out)


if __name__ == '__main__':
    cli.run(main)
