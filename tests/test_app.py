"""app.py: the request handlers on tiny components, and the page in a real headless Chromium.

The browser tests start ``python app.py`` on a free local port (one server and one browser for the module), upload
a synthetic face, type an utterance and read the response off the page. They need Debian's chromium and
chromium-driver; without them they are skipped with the reason, unless EMPATH_REQUIRE_BROWSER=1 (CI) makes that a
failure. The server runs under an audit hook that reports every outgoing connection, and the browser logs every
request the page makes: both must stay on 127.0.0.1.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import gradio as gr
import pytest
import torch
from PIL import Image

import app
from common import tiny
from libs import pipeline
from libs.avamerg import EMOTIONS_32
from libs.errors import UserError
from libs.synthetic import render_face

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UTTERANCE = 'i feel so happy today'  # in the tiny CLIP tokenizer's corpus: a few tokens
TIMEOUT = 60  # seconds for the server to start or for one request to come back

# Runs app.py with an audit hook that prints every DNS lookup or connection to a host other than this one.
WATCH_NETWORK = '''
import runpy, sys
LOCAL = ('127.0.0.1', 'localhost', '::1', b'127.0.0.1', b'localhost', None, '')
def watch(event, args):
    if event == 'socket.getaddrinfo' and args[0] not in LOCAL:
        print('OUTGOING getaddrinfo', args[0], file=sys.stderr, flush=True)
    elif event == 'socket.connect' and isinstance(args[1], tuple) and args[1][0] not in LOCAL:
        print('OUTGOING connect', args[1], file=sys.stderr, flush=True)
sys.addaudithook(watch)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


@pytest.fixture(scope='module')
def comp(tiny_models):
    """Tiny EmpathDiffuser components, loaded once."""
    return pipeline.load_components(tiny(tiny_models, condition=True), torch.device('cpu'))


@pytest.fixture(scope='module')
def face(tmp_path_factory):
    """A synthetic speaker face (libs.synthetic) as a PNG file."""
    path = tmp_path_factory.mktemp('faces') / 'speaker.png'
    render_face(3, 'sad', size=64).save(path)
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# Handlers, without a browser
# ----------------------------------------------------------------------------------------------------------------

def ask(comp, face, utterance, scale=7, steps=4, seed=0, guidance='no_speaker', scale_text=7, scale_face=7):
    """app.respond with the page's inputs in order, defaults for those a test does not vary."""
    return app.respond(comp, face, utterance, guidance, scale, scale_text, scale_face, steps, seed)


def test_respond_gives_a_face_an_utterance_and_emotions(comp, face):
    image, text, emotions, note = ask(comp, {'path': face, 'orig_name': 'speaker.png'}, UTTERANCE, 3, 4, 5)
    assert image.size == (comp.resolution, comp.resolution) and isinstance(text, str) and text
    assert len(emotions) == 3 and set(emotions) <= set(EMOTIONS_32)
    probs = list(emotions.values())
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    assert re.fullmatch(r'\d+\.\d s on cpu \(4 steps, guidance scale 3, seed 5\); speaker face and utterance', note)
    # The request's seed fixes the sample; another seed gives another one; the served config is not touched.
    again = ask(comp, face, UTTERANCE, 3, 4, 5)
    assert list(again[0].getdata()) == list(image.getdata()) and again[1] == text
    assert list(ask(comp, face, UTTERANCE, 3, 4, 6)[0].getdata()) != list(image.getdata())
    two = ask(comp, face, UTTERANCE, 3, 4, 5, guidance='two_scale', scale_text=2, scale_face=4.5)
    assert '(4 steps, utterance scale 2, face scale 4.5, seed 5)' in two[3]
    assert list(two[0].getdata()) != list(image.getdata())
    sample = comp.config.sample
    assert (sample.scale, sample.sample_steps, sample.speaker_guidance, comp.config.seed) == (7, 4, 'no_speaker', 1234)
    # Either half of the speaker turn alone is enough.
    assert ask(comp, None, UTTERANCE)[3].endswith('speaker utterance')
    assert ask(comp, face, '  ')[3].endswith('speaker face')


@pytest.mark.parametrize('guidance', ['no_speaker', 'two_scale'])
def test_page_and_command_line_give_the_same_response(guidance, comp, face, tiny_models, tmp_path):
    import sample_multi
    config = tiny(tiny_models, condition=True)
    config.sample.update(speaker_guidance=guidance, scale=5., scale_text=2., scale_face=3.)
    record = sample_multi.sample(config, 'empath', UTTERANCE, face, 1, 1, str(tmp_path))
    image, text, emotions, _ = ask(comp, face, UTTERANCE, 5, 4, config.seed, guidance, 2, 3)
    assert list(Image.open(tmp_path / 'empath' / '0.png').getdata()) == list(image.getdata())
    assert record['outputs']['texts'] == [text] and dict(record['outputs']['emotions'][0]) == emotions


def test_bad_input_is_a_user_error(comp, face, tmp_path):
    with pytest.raises(UserError, match="give the speaker's face, their utterance, or both"):
        ask(comp, None, ' ')
    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'not an image')
    with pytest.raises(UserError, match=r'speaker face \(upload\.png\) is not a readable image'):
        ask(comp, {'path': str(broken), 'orig_name': 'upload.png'}, UTTERANCE)
    long = ' '.join([UTTERANCE] * 4)
    tokens = comp.clip_text.count_tokens(long)
    with pytest.raises(UserError, match=f'{tokens} tokens long but the text encoder reads at most '
                                        f'{comp.clip_text.max_length}'):
        ask(comp, face, long)
    with pytest.raises(UserError, match='characters long'):
        ask(comp, face, 'a' * (app.MAX_CHARS + 1))
    for scale, steps, seed in ((-1, 4, 0), (7, 0, 0), (7, 2.5, 0), (7, 4, -3), ('x', 4, 0), (float('nan'), 4, 0)):
        with pytest.raises(UserError):
            ask(comp, face, UTTERANCE, scale, steps, seed)
    with pytest.raises(UserError, match='face scale 30 is outside'):
        ask(comp, face, UTTERANCE, guidance='two_scale', scale_face=30)
    with pytest.raises(UserError, match='speaker_guidance'):
        ask(comp, face, UTTERANCE, guidance='sideways')


def test_demo_examples_come_from_the_demo_test_split(tmp_path):
    # Serving the demo's network, the page offers held-out speaker turns of the demo's own test split with their
    # gold emotion (not a photo the demo model never saw); any other model gets the generic example.
    import importlib.util

    from libs.avamerg import AvaMERG
    from libs.synthetic import make_dataset
    spec = importlib.util.spec_from_file_location('demo_config', os.path.join(ROOT, 'configs', 'demo.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(str(tmp_path))
    make_dataset(config.data.root, 0, 2, 12, size=32, listeners=(7,))
    rows = app.examples(config)
    pairs = {(p.speaker_text, p.emotion) for p in AvaMERG(config.data.root, 'test').pairs}
    assert 2 <= len(rows) <= app.DEMO_EXAMPLES
    for face_path, utterance, gold in rows:
        assert os.path.isfile(face_path) and face_path.startswith(os.path.join(config.data.root, 'test'))
        assert (utterance, gold) in pairs
    assert len({gold for _, _, gold in rows}) == len(rows)  # each example shows another emotion
    assert app.examples(tiny(str(tmp_path / 'models')))[0][0].endswith('speaker_sad.png')


def test_unidiffuser_modes(comp, face):
    expected = {'t2i': (2, ''), 'i2t': (0, 2), 'joint': (2, 2), 'i': (2, ''), 't': (0, 2), 'i2t2i': (2, ''),
                't2i2t': (0, 2)}
    assert list(expected) == app.unidiffuser_modes()
    for mode, (n_images, n_texts) in expected.items():
        images, texts, note = app.unidiffuser(comp, mode, 'a photo of a cat', {'path': face}, 2, 3, 4, 0)
        assert len(images) == n_images and all(im.size == (comp.resolution,) * 2 for im in images)
        assert (texts == '') if n_texts == '' else len(texts.split('\n')) == n_texts
        assert 'steps' in note
    assert app.mode_label('t2i') == 't2i: Text -> image' and app.mode_label('joint') == 'joint: Image and text together'
    with pytest.raises(UserError, match='mode t2i needs a prompt'):
        app.unidiffuser(comp, 't2i', '', None, 1, 7, 4, 0)
    with pytest.raises(UserError, match='mode i2t needs an image'):
        app.unidiffuser(comp, 'i2t', 'ignored', None, 1, 7, 4, 0)
    with pytest.raises(UserError, match='unknown mode'):
        app.unidiffuser(comp, 'empath', 'hi', None, 1, 7, 4, 0)
    with pytest.raises(UserError, match='number of samples'):
        app.unidiffuser(comp, 'i', None, None, 9, 7, 4, 0)


def test_a_unidiffuser_network_serves_the_modes_only(tiny_models, face):
    config = tiny(tiny_models)  # the official v1 layout: no speaker condition
    plain = pipeline.load_components(config, torch.device('cpu'))
    page = app.build_app(plain, config.nnet_path)
    by_id = {b.elem_id: b for b in page.blocks.values() if getattr(b, 'elem_id', None)}
    assert by_id['respond'].interactive is False and by_id['generate'].interactive is not False
    assert len(app.unidiffuser(plain, 'joint', None, None, 2, 7, 4, 0)[0]) == 2
    with pytest.raises(UserError, match='needs an EmpathDiffuser network'):
        ask(plain, face, UTTERANCE)


def test_in_page_turns_user_errors_into_escaped_page_messages():
    def refuse(name):
        raise UserError(f'the image ({name}) is not a readable image')

    with pytest.raises(gr.Error) as err:
        app.in_page(refuse)('<b>x</b>.png')
    assert err.value.message == 'The image (&lt;b&gt;x&lt;/b&gt;.png) is not a readable image'
    with pytest.raises(ZeroDivisionError):  # a bug stays a bug (logged by the server, a generic error in the page)
        app.in_page(lambda: 1 / 0)()


def test_demo_network_lookup(tmp_path):
    config = tiny(str(tmp_path))
    config.workdir, config.name = str(tmp_path / 'train'), 'demo'
    with pytest.raises(UserError, match='make demo'):
        app.demo_nnet_path(config)
    run = tmp_path / 'train' / 'demo'
    (run / 'ckpts' / '500.ckpt').mkdir(parents=True)
    with pytest.raises(UserError, match='no trained network yet'):
        app.demo_nnet_path(config)
    from libs.trainer import CKPT_FILES
    for step in (500, 1000, 2000):
        for name in CKPT_FILES if step != 2000 else CKPT_FILES[:1]:  # 2000 is incomplete
            (run / 'ckpts' / f'{step}.ckpt').mkdir(exist_ok=True)
            (run / 'ckpts' / f'{step}.ckpt' / name).write_bytes(b'')
    assert app.demo_nnet_path(config) == str(run / 'ckpts' / '1000.ckpt' / 'nnet_ema.safetensors')
    (run / 'nnet_ema.safetensors').write_bytes(b'')
    assert app.demo_nnet_path(config) == str(run / 'nnet_ema.safetensors')
    assert app.DEMO_CONFIG.split(':')[0] == os.path.join(ROOT, 'configs', 'demo.py')


def test_serves_on_loopback_unless_told_otherwise(comp, monkeypatch):
    launched = []

    class Page:
        def launch(self, **kwargs):
            launched.append(kwargs)

    monkeypatch.setattr(pipeline, 'load_components', lambda *a, **k: comp)
    monkeypatch.setattr(app, 'build_app', lambda *a: Page())
    monkeypatch.delenv('GRADIO_SERVER_NAME', raising=False)
    app.serve(comp.config, None)
    monkeypatch.setenv('GRADIO_SERVER_NAME', '0.0.0.0')  # what Hugging Face Spaces set
    app.serve(comp.config, None)
    app.serve(comp.config, None, host='127.0.0.1', port=8000)
    assert [(k['server_name'], k['server_port']) for k in launched] == [('127.0.0.1', None), ('0.0.0.0', None),
                                                                         ('127.0.0.1', 8000)]
    assert all(k['share'] is False and k['run_history'] is False for k in launched)


# ----------------------------------------------------------------------------------------------------------------
# The page in headless Chromium
# ----------------------------------------------------------------------------------------------------------------

def browser_binaries():
    """(chromium, chromedriver) on PATH; otherwise skip, or fail when EMPATH_REQUIRE_BROWSER=1."""
    found = shutil.which('chromium'), shutil.which('chromedriver')
    if all(found):
        return found
    reason = ('browser test needs chromium and chromedriver on PATH (Debian: apt-get install chromium '
              'chromium-driver)')
    if os.environ.get('EMPATH_REQUIRE_BROWSER') == '1':
        pytest.fail(f'{reason}, and EMPATH_REQUIRE_BROWSER=1')
    pytest.skip(reason)


def free_port():
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def browser():
    """One headless Chromium for the module (the system one, driven through the system chromedriver)."""
    chromium, chromedriver = browser_binaries()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=1280,1300',
                # Nothing but this machine resolves, so a page asset from the internet would fail visibly; the
                # browser's own background services stay off.
                '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1', '--disable-background-networking',
                '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-default-apps'):
        options.add_argument(arg)
    options.set_capability('goog:loggingPrefs', {'performance': 'ALL'})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope='module')
def server(browser, tiny_models, tmp_path_factory):
    """``python app.py`` on tiny components at a free local port; yields (url, log path)."""
    port = free_port()
    log = tmp_path_factory.mktemp('app') / 'server.log'
    env = {k: v for k, v in os.environ.items() if not k.startswith('GRADIO_')}
    env.pop('HF_HUB_OFFLINE', None)  # the app must stay offline by itself: the audit hook would see a hub call
    env['OMP_NUM_THREADS'] = '1'
    cmd = [sys.executable, '-c', WATCH_NETWORK, 'app.py', f'--config=configs/avamerg_tiny.py:{tiny_models}',
           f'--nnet_path={tiny_models}/uvit_empath.pth', f'--port={port}']
    url = f'http://127.0.0.1:{port}/'
    with open(log, 'w') as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + TIMEOUT
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f'app.py did not start (exit code {proc.poll()}):\n{log.read_text()}')
                time.sleep(0.5)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_for(driver, script, what):
    """Poll a JavaScript expression until it is truthy; returns its value."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        return WebDriverWait(driver, TIMEOUT, poll_frequency=0.2).until(lambda d: d.execute_script(script))
    except TimeoutException:
        pytest.fail(f'timed out waiting for {what}')


def open_page(driver, url):
    """Load the app afresh and wait until Gradio has rendered it."""
    driver.get(url)
    wait_for(driver, "return document.querySelector('#respond') !== null", 'the page to render')


def test_browser_empathetic_response(browser, server, face, tmp_path):
    from selenium.webdriver.common.by import By
    url, _ = server
    open_page(browser, url)
    browser.find_element(By.CSS_SELECTOR, '#speaker-face input[type=file]').send_keys(face)
    wait_for(browser, "return document.querySelector('#speaker-face img')?.naturalWidth > 0", 'the upload preview')
    browser.find_element(By.CSS_SELECTOR, '#speaker-utterance textarea').send_keys(UTTERANCE)
    browser.find_element(By.ID, 'respond').click()
    took = wait_for(browser, "return document.querySelector('#response-time p')?.textContent", 'the response')
    assert re.fullmatch(r'\d+\.\d s on cpu \(4 steps, guidance scale 7, seed 1234\); speaker face and utterance',
                        took.strip()), took
    # The outputs arrive together, but the browser fetches and decodes the image after it shows the text.
    size = wait_for(browser, "const im = document.querySelector('#response-face img'); "
                             "return im?.complete && im.naturalWidth > 0 && [im.naturalWidth, im.naturalHeight]",
                    'the response face')
    assert size == [32, 32]  # the tiny config's resolution, decoded from the PNG the server sent
    text = browser.execute_script("return document.querySelector('#response-utterance textarea').value")
    assert text.strip()
    bars = browser.execute_script("return [...document.querySelectorAll('#speaker-emotion meter')]"
                                  ".map(m => [m.getAttribute('aria-label'), m.value])")
    assert len(bars) == 3 and all(name in EMOTIONS_32 and 0 < value <= 1 for name, value in bars)
    assert [v for _, v in bars] == sorted((v for _, v in bars), reverse=True)
    browser.save_screenshot(str(tmp_path / 'app_response.png'))


def test_browser_bad_input_shows_a_message(browser, server):
    from selenium.webdriver.common.by import By
    url, _ = server
    open_page(browser, url)
    browser.find_element(By.ID, 'respond').click()
    message = wait_for(browser, "return document.querySelector('[data-testid=toast-text]')?.textContent",
                       'the error message')
    assert message.strip() == "Give the speaker's face, their utterance, or both"
    assert 'Traceback' not in browser.page_source
    assert not browser.execute_script("return document.querySelector('#response-face img')")
    # Choosing two-scale guidance swaps the one scale for the utterance and face scales.
    shown = "return ['scale', 'scale-text', 'scale-face'].map(id => document.getElementById(id)?.offsetParent != null)"
    assert browser.execute_script(shown) == [True, False, False]
    browser.execute_script("document.querySelector('#speaker-guidance input[value=two_scale]').click()")
    wait_for(browser, shown.replace('return ', 'const v = ') + "; return !v[0] && v[1] && v[2]", 'the two scales')


def test_browser_unidiffuser_tab(browser, server):
    from selenium.webdriver.common.by import By
    url, _ = server
    open_page(browser, url)
    [tab] = [b for b in browser.find_elements(By.CSS_SELECTOR, 'button[role=tab]') if b.text == 'UniDiffuser']
    tab.click()
    prompt = wait_for(browser, "return document.querySelector('#prompt textarea')", 'the UniDiffuser tab')
    prompt.send_keys('a photo of a cat')
    browser.find_element(By.ID, 'generate').click()
    wait_for(browser, "return document.querySelector('#unidiffuser-time p')?.textContent", 'the t2i result')
    wait_for(browser, "return [...document.querySelectorAll('#images img')].some(im => im.naturalWidth > 0)",
             'the generated image')


def test_nothing_leaves_this_machine(browser, server):
    """Every request the page made went to the app, and the server made no outgoing connection (runs last)."""
    url, log = server
    requested = {json.loads(e['message'])['message']['params']['request']['url']
                 for e in browser.get_log('performance')
                 if json.loads(e['message'])['message']['method'] == 'Network.requestWillBeSent'}
    assert any(u.startswith(url + 'gradio_api/queue/join') for u in requested)  # the log saw the other tests
    assert not [u for u in requested if not u.startswith((url, 'data:', 'blob:'))]
    assert 'OUTGOING' not in log.read_text(), log.read_text()


def test_command_line_error_is_one_line_and_exit_2(tmp_path):
    # A model that is not there ends in one 'error:' line through libs.cli (exit 2), -v accepted, no traceback; the
    # missing components follow it, one per line.
    done = subprocess.run([sys.executable, 'app.py', f'--config=configs/demo.py:{tmp_path}', '-v'], cwd=ROOT,
                          env=dict(os.environ, HF_HUB_OFFLINE='1'), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith('error: ')]
    assert 'Traceback' not in done.stderr and len(errors) == 1, done.stderr
    assert sum(line.startswith('- ') for line in lines[errors[0]:]) == 6, done.stderr
    assert str(tmp_path) in done.stderr
