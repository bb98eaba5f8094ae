"""Web demo (Gradio): talk to EmpathDiffuser, and run UniDiffuser's seven modes, in the browser.

    python app.py                                 # the network `make demo` trained (out/demo)
    python app.py --config=configs/avamerg_empath.py --nnet_path=workdir/avamerg_empath/nnet_ema.safetensors
    python app.py --config=configs/sample_unidiffuser_v1.py    # official UniDiffuser-v1: the seven modes only

Any config key can be overridden as in sample_multi.py (``--config.sample.sampler=dpm_solver_2m``). The networks are
loaded once; requests wait in one queue and run one at a time, each with its own copy of the config (the page sets
config.sample.speaker_guidance, scale, scale_text, scale_face, sample_steps and config.seed). Bad input is answered
with a message in the page. The server listens on 127.0.0.1 (``--host`` or GRADIO_SERVER_NAME to change that, as
Hugging Face Spaces do) and makes no outgoing call: analytics, the version check, share links and the run history are
off, and the page loads only local assets.
"""
import dataclasses
import functools
import html
import logging
import math
import os
import re
import shlex
import sys
import time

from absl import flags
from ml_collections import config_flags

from libs import cli, config_check, logs
from libs.errors import UserError

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_OUT = os.path.join(ROOT, 'out', 'demo')
DEMO_CONFIG = f'{os.path.join(ROOT, "configs", "demo.py")}:{DEMO_OUT}'
MAX_STEPS, MAX_SCALE, MAX_SAMPLES = 100, 20.0, 4
MAX_CHARS = 2000  # a bound on what the page sends; the real limit is the text encoder's token count, checked below
APP_ARGS = 'EMPATH_APP_ARGS'  # extra command-line flags from the environment (a Space cannot pass arguments)
# Faces (often small: 32² in the demo) are shown enlarged to the box, with crisp pixels rather than blurred.
CSS = ('.face img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated} '
       '#images img {image-rendering: pixelated}')
FACE_HEIGHT = 280  # pixels of the face boxes in the page
DEMO_EXAMPLES = 6  # speaker turns of the demo's test split offered as examples, each with another gold emotion
SCALE_NAMES = dict(scale='guidance scale', scale_text='utterance scale', scale_face='face scale')
FLAGS = flags.FLAGS


def define_flags():
    """The command line (defined only when run as a script, so importing this module defines no flags)."""
    config_flags.DEFINE_config_file('config', DEMO_CONFIG, 'config of the served model; default: the `make demo` '
                                    'model', lock_config=False)
    flags.DEFINE_string('nnet_path', None, 'U-ViT weights (.pth or .safetensors, or a train_empath.py '
                        'ckpts/<step>.ckpt folder); default: config.nnet_path')
    flags.DEFINE_string('host', None, 'address to listen on; default: GRADIO_SERVER_NAME if set, else 127.0.0.1')
    flags.DEFINE_integer('port', None, 'port; default: GRADIO_SERVER_PORT if set, else the first free from 7860')
    logs.define_flags()


# ----------------------------------------------------------------------------------------------------------------
# Which model to serve
# ----------------------------------------------------------------------------------------------------------------

def demo_nnet_path(config):
    """The final EMA network of the demo run: the exported file, else the newest complete checkpoint's.

    A UserError says how to get one when the demo has not been run (or stopped before its first checkpoint).
    """
    from libs.trainer import EXPORT, checkpoints
    run_dir = os.path.join(config.workdir, config.name)
    exported = os.path.join(run_dir, EXPORT)
    if os.path.isfile(exported):
        return exported
    steps = checkpoints(run_dir)
    if steps:  # a checkpoint folder holds its EMA network under the same name
        return os.path.join(run_dir, 'ckpts', f'{steps[-1]}.ckpt', EXPORT)
    how = ('Run `make demo` first (about 15 minutes on a CPU), or serve any model with '
           '`python app.py --config=CONFIG --nnet_path=WEIGHTS`.')
    if not os.path.isdir(run_dir):
        raise UserError(f'no model to serve: {run_dir} does not exist. {how}')
    raise UserError(f'{run_dir} has no trained network yet (the demo stopped before its first checkpoint). {how}')


def examples(config):
    """[speaker face, utterance, gold emotion] rows the page offers.

    Serving the demo's network (configs/demo.py: its config has ``demo`` settings and a synthetic AvaMERG under
    config.data.root), they are held-out speaker turns of the demo's own test split, each with another gold emotion,
    so that the answer can be checked against what the model was trained to do. Otherwise one real-looking turn.
    """
    from libs.avamerg import AvaMERG
    if 'demo' not in config or not os.path.isdir(os.path.join(config.data.root, 'test')):
        return [[os.path.join(ROOT, 'assets', 'speaker_sad.png'), 'I lost my job today.', '']]
    reader, rows, seen = AvaMERG(config.data.root, 'test'), [], set()
    for pair in reader.pairs:
        face = reader.media.frames.get(pair.speaker_stem)
        if face is None or pair.emotion in seen:
            continue
        seen.add(pair.emotion)
        rows.append([face, pair.speaker_text, pair.emotion])
        if len(rows) == DEMO_EXAMPLES:
            break
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Requests: page values -> checked inputs -> libs.pipeline.generate
# ----------------------------------------------------------------------------------------------------------------

def number(value, what):
    """A page value as a finite float, or a UserError naming the field."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f'{what} must be a number')
    return value


def request_config(config, steps, seed, speaker_guidance=None, **scales):
    """A copy of the served config with this request's steps, seed, speaker guidance and scales (checked).

    ``scales`` are config.sample keys (scale, scale_text, scale_face); the copy leaves the served config untouched.
    """
    steps, seed = number(steps, 'steps'), number(seed, 'the seed')
    if steps != int(steps) or not 1 <= steps <= MAX_STEPS:
        raise UserError(f'steps must be a whole number in 1..{MAX_STEPS}, got {steps:g}')
    wanted = config_check.seed()(int(seed) if seed == int(seed) else seed)
    if wanted:
        raise UserError(f'the seed must be {wanted}, got {seed:g}')
    config = config.copy_and_resolve_references()
    config.sample.sample_steps, config.seed = int(steps), int(seed)
    for key, value in scales.items():
        value = number(value, f'the {SCALE_NAMES[key]}')
        if not 0 <= value <= MAX_SCALE:
            raise UserError(f'the {SCALE_NAMES[key]} {value:g} is outside 0..{MAX_SCALE:g}')
        config.sample[key] = value
    if speaker_guidance is not None:
        config.sample.speaker_guidance = speaker_guidance  # checked by libs.pipeline.make_context
    return config


def unidiffuser_modes():
    """UniDiffuser's own modes (libs.modes imports torch: read when serving, not when answering --help)."""
    from libs import modes
    return [m for m in modes.MODES if m not in modes.EMPATH_MODES]


def guidance_note(config, mode):
    """How this sample was guided, in words."""
    from libs import modes
    if mode in modes.EMPATH_MODES and config.sample.speaker_guidance == 'two_scale':
        return f'utterance scale {config.sample.scale_text:g}, face scale {config.sample.scale_face:g}'
    return f'guidance scale {config.sample.scale:g}'


def read_image(payload, what):
    """An uploaded / webcam image (Gradio's file payload, or a path) as RGB; None if absent."""
    from libs.io import read_rgb
    if not payload:
        return None
    path = payload.get('path') if isinstance(payload, dict) else payload
    if not path:
        raise UserError(f'the {what} did not arrive: upload it again')
    try:
        return read_rgb(path)
    except Exception as e:  # PIL raises several kinds of error for files it cannot decode
        name = payload.get('orig_name') if isinstance(payload, dict) else None
        raise UserError(f'the {what} ({name or os.path.basename(path)}) is not a readable image: upload a PNG or '
                        f'JPEG ({type(e).__name__})') from e


def check_text(comp, text, what):
    """Stripped text, None if empty; refuses text longer than the CLIP text encoder reads (no silent truncation)."""
    text = (text or '').strip()
    if not text:
        return None
    if len(text) > MAX_CHARS:
        raise UserError(f'the {what} is {len(text)} characters long; shorten it to at most {MAX_CHARS}')
    tokens, limit = comp.clip_text.count_tokens(text), comp.clip_text.max_length
    if tokens > limit:
        raise UserError(f'the {what} is {tokens} tokens long but the text encoder reads at most {limit} '
                        '(start and end tokens included): shorten it')
    return text


def run(comp, mode, settings, n_samples=1, prompt=None, image=None):
    """``libs.pipeline.generate`` under ``request_config(**settings)``; returns (outputs, time and settings line)."""
    import torch

    from libs import pipeline, precision
    config = request_config(comp.config, **settings)
    request = dataclasses.replace(comp, config=config)  # shares the loaded networks, not the config
    ctx = pipeline.make_context(request, torch.Generator(comp.device).manual_seed(config.seed))
    start = time.perf_counter()
    result = pipeline.generate(request, ctx, mode, n_samples, prompt=prompt, image=image)
    # A reduced precision is named (e.g. 's on cpu in bf16'); fp32 is the unnamed default.
    reduced = '' if ctx.autocast_dtype is None else f' in {precision.name_of(ctx.autocast_dtype)}'
    note = (f'{time.perf_counter() - start:.1f} s on {comp.device.type}{reduced} ({config.sample.sample_steps} steps, '
            f'{guidance_note(config, mode)}, seed {config.seed})')
    return result, note


def respond(comp, face, utterance, speaker_guidance, scale, scale_text, scale_face, steps, seed):
    """The empathetic response to a speaker turn: (face, utterance, {emotion: probability}, time taken)."""
    image, text = read_image(face, 'speaker face'), check_text(comp, utterance, 'utterance')
    if image is None and text is None:
        raise UserError("give the speaker's face, their utterance, or both")
    settings = dict(steps=steps, seed=seed, speaker_guidance=speaker_guidance)
    settings.update(dict(scale_text=scale_text, scale_face=scale_face) if speaker_guidance == 'two_scale' else
                    dict(scale=scale))
    result, note = run(comp, 'empath', settings, prompt=text, image=image)
    given = ' and '.join(name for name, value in (('face', image), ('utterance', text)) if value is not None)
    return result['images'][0], result['texts'][0], dict(result['emotions'][0]), f'{note}; speaker {given}'


def unidiffuser(comp, mode, prompt, image, n_samples, scale, steps, seed):
    """One UniDiffuser mode: (images, texts one per line, time taken); inputs the mode does not read are ignored."""
    from libs import modes
    if mode not in unidiffuser_modes():
        raise UserError(f'unknown mode {mode!r}; choose one of {", ".join(unidiffuser_modes())}')
    needs = modes.MODE_INPUTS[mode]
    prompt = check_text(comp, prompt, 'prompt') if 'prompt' in needs else None
    image = read_image(image, 'image') if 'img' in needs else None
    if 'prompt' in needs and prompt is None:
        raise UserError(f'mode {mode} needs a prompt')
    if 'img' in needs and image is None:
        raise UserError(f'mode {mode} needs an image')
    if n_samples not in range(1, MAX_SAMPLES + 1):
        raise UserError(f'the number of samples must be 1..{MAX_SAMPLES}, got {n_samples}')
    result, note = run(comp, mode, dict(scale=scale, steps=steps, seed=seed), n_samples=int(n_samples),
                       prompt=prompt, image=image)
    return result.get('images', []), '\n'.join(result.get('texts', [])), note


# ----------------------------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------------------------

def in_page(fn):
    """Wrap a request handler so that a UserError becomes a message in the page (gr.Error), not a failed request."""
    import gradio as gr

    @functools.wraps(fn)
    def handler(*args):
        try:
            return fn(*args)
        except UserError as e:
            logger.info('refused a request: %s', e)
            # duration=None: the message stays until it is closed; gr.Error renders HTML, so the text is escaped.
            message = str(e)
            raise gr.Error(html.escape(message[:1].upper() + message[1:]), duration=None,
                           print_exception=False) from e
    return handler


def mode_label(mode):
    """'t2i: Text -> image', from the mode function's docstring."""
    from libs import modes
    return f'{mode}: {re.split("[:;.]", modes.MODES[mode].__doc__)[0].strip()}'


def scale_slider(config, key, info, visible=True):
    """A slider for the guidance scale config.sample[key]."""
    import gradio as gr
    return gr.Slider(0, MAX_SCALE, value=float(config.sample[key]), step=0.5, label=SCALE_NAMES[key].capitalize(),
                     info=info, visible=visible, elem_id=key.replace('_', '-'))


def steps_and_seed(config):
    """Steps and seed inputs, starting at the served config's values."""
    import gradio as gr
    steps = gr.Slider(1, MAX_STEPS, value=int(config.sample.sample_steps), step=1, label='Steps',
                      info=f'{config.sample.sampler}: one network evaluation per step')
    return [steps, gr.Number(value=int(config.seed), precision=0, minimum=0, label='Seed')]


def speaker_guidance_controls(config):
    """The empath modes' guidance: one scale against no speaker, or InstructPix2Pix's utterance and face scales."""
    import gradio as gr
    two = config.sample.speaker_guidance == 'two_scale'
    rule = gr.Radio([('against no speaker', 'no_speaker'), ('utterance and face scales', 'two_scale')],
                    value=config.sample.speaker_guidance, label='Guidance over the speaker turn',
                    elem_id='speaker-guidance')
    scale = scale_slider(config, 'scale', 's in ε_c + s·(ε_c − ε_∅); 0 = no guidance', visible=not two)
    scale_text = scale_slider(config, 'scale_text', 's_t in ε_tf + s_t·(ε_t − ε_∅) + s_f·(ε_tf − ε_t)',
                              visible=two)
    scale_face = scale_slider(config, 'scale_face', 's_f: towards the face, given the utterance', visible=two)
    rule.change(lambda r: [gr.update(visible=r != 'two_scale')] + [gr.update(visible=r == 'two_scale')] * 2, rule,
                [scale, scale_text, scale_face])
    return [rule, scale, scale_text, scale_face]


def build_app(comp, nnet_path):
    """The Gradio Blocks page for loaded components (see ``respond`` and ``unidiffuser``)."""
    import gradio as gr

    from libs import modes
    conditional = comp.nnet.condition
    # Both tabs share one queue slot: one request uses the networks at a time, the others wait their turn.
    queue = dict(concurrency_id='model', concurrency_limit=1, preprocess=False)
    with gr.Blocks(title='EmpathDiffuser', analytics_enabled=False) as page:
        shown = os.path.relpath(nnet_path, ROOT) if os.path.abspath(nnet_path).startswith(ROOT + os.sep) else nnet_path
        kind = 'EmpathDiffuser' if conditional else 'UniDiffuser (no speaker condition)'
        gr.Markdown(f'# EmpathDiffuser\nServing `{shown}`: {kind}, {comp.resolution}² images, on {comp.device.type}.')
        with gr.Tab('Empathetic response', id='empath'):
            if not conditional:
                gr.Markdown('This network has no speaker condition: serve an EmpathDiffuser checkpoint '
                            '(nnet.name=uvit_empath) for empathetic responses; the UniDiffuser tab works.')
            with gr.Row():
                with gr.Column():
                    face = gr.Image(label='Speaker face', sources=['upload', 'webcam'], type='filepath',
                                    height=FACE_HEIGHT, elem_id='speaker-face', elem_classes='face')
                    utterance = gr.Textbox(label='Speaker utterance', lines=2, max_length=MAX_CHARS,
                                           placeholder='I lost my job today.', elem_id='speaker-utterance')
                    controls = speaker_guidance_controls(comp.config) + steps_and_seed(comp.config)
                    button = gr.Button('Respond', variant='primary', interactive=conditional, elem_id='respond')
                with gr.Column():
                    response_face = gr.Image(label='Response face', format='png', interactive=False,
                                             height=FACE_HEIGHT, elem_id='response-face', elem_classes='face')
                    response_text = gr.Textbox(label='Response utterance', interactive=False,
                                               elem_id='response-utterance')
                    emotion = gr.Label(label="Speaker's emotion (top classes)", elem_id='speaker-emotion')
                    took = gr.Markdown(elem_id='response-time')
            # The gold emotion fills a box of its own, read next to the predicted one; it is no input of the model.
            gold = gr.Textbox(label='Gold emotion of the example', interactive=False, elem_id='gold-emotion')
            gr.Examples(examples(comp.config), [face, utterance, gold], label='Examples')
            button.click(in_page(lambda *a: respond(comp, *a)), [face, utterance, *controls],
                         [response_face, response_text, emotion, took], api_name='respond', **queue)
        with gr.Tab('UniDiffuser', id='unidiffuser'):
            with gr.Row():
                with gr.Column():
                    mode = gr.Dropdown([(mode_label(m), m) for m in unidiffuser_modes()], value='t2i', label='Mode',
                                       elem_id='mode')
                    prompt = gr.Textbox(label='Prompt', lines=2, max_length=MAX_CHARS, elem_id='prompt')
                    image = gr.Image(label='Image', sources=['upload', 'webcam'], type='filepath', visible=False,
                                     height=FACE_HEIGHT, elem_id='image', elem_classes='face')
                    n_samples = gr.Slider(1, MAX_SAMPLES, value=1, step=1, label='Samples')
                    controls = [scale_slider(comp.config, 'scale', 's in ε + s·(ε − ε_uncond); 0 = no guidance'),
                                *steps_and_seed(comp.config)]
                    run_button = gr.Button('Generate', variant='primary', elem_id='generate')
                with gr.Column():
                    gallery = gr.Gallery(label='Images', format='png', elem_id='images')
                    texts = gr.Textbox(label='Texts', lines=4, interactive=False, elem_id='texts')
                    took = gr.Markdown(elem_id='unidiffuser-time')
            mode.change(lambda m: (gr.update(visible='prompt' in modes.MODE_INPUTS[m]),
                                   gr.update(visible='img' in modes.MODE_INPUTS[m])), mode, [prompt, image])
            run_button.click(in_page(lambda *a: unidiffuser(comp, *a)), [mode, prompt, image, n_samples, *controls],
                             [gallery, texts, took], api_name='generate', **queue)
    return page.queue(max_size=32)


def serve(config, nnet_path, host=None, port=None):
    """Load the components once and serve the page until the process is stopped."""
    import torch

    from libs import memory, pipeline
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    planned = memory.planned_network(config, nnet_path)  # the network nnet_path rebuilds
    memory.check_sampling(planned, device, memory.usable_modes(planned), MAX_SAMPLES)  # CUDA: what the page can ask
    comp = pipeline.load_components(config, device, nnet_path)
    page = build_app(comp, comp.nnet_path)
    host = host or os.environ.get('GRADIO_SERVER_NAME') or '127.0.0.1'
    page.launch(server_name=host, server_port=port, share=False, footer_links=['api', 'settings'], run_history=False,
                enable_monitoring=False, pwa=False, mcp_server=False, css=CSS)


def main(argv):
    del argv
    logs.setup(FLAGS.verbose)
    logging.getLogger('httpx').setLevel(logging.WARNING)  # gradio checks its own server with httpx: one line each
    nnet_path = FLAGS.nnet_path
    if not (nnet_path or FLAGS['config'].present):
        nnet_path = demo_nnet_path(FLAGS.config)
    serve(FLAGS.config, nnet_path, FLAGS.host, FLAGS.port)


if __name__ == '__main__':
    define_flags()
    cli.run(main, argv=sys.argv + shlex.split(os.environ.get(APP_ARGS, '')), flags_parser=logs.parse_flags)
