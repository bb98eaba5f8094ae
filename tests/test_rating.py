"""The blind A/B rating kit: the sheet from two run folders, scoring through the answer key, the command line, and
the round trip in a real headless Chromium (load the sheet, click answers, save, read the JSON back, score)."""
import html
import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest
from scipy import stats

from libs import rating
from libs.errors import UserError
from libs.synthetic import make_dataset, render_face

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 30  # seconds for the page to load or the download to appear


def fake_run(folder, root, pairs, expression, words):
    """An evaluation run folder as eval_avamerg.py leaves it: pairs.jsonl, faces/, settings.json."""
    os.makedirs(os.path.join(folder, 'faces'))
    lines = []
    for i, p in enumerate(pairs):
        face = f'faces/{p.split}_{p.conversation_id}_{p.turn_id}.png'
        render_face(p.listener_id, expression, size=64, rng=random.Random(i)).save(os.path.join(folder, face))
        lines.append(json.dumps(dict(index=i, pair_id=p.pair_id, split=p.split, conversation_id=p.conversation_id,
                                     turn_id=p.turn_id, speaker_stem=p.speaker_stem, response_stem=p.response_stem,
                                     speaker_text=p.speaker_text, reference=p.response_text, gold_emotion=p.emotion,
                                     gold_label=p.label, generated=f'{words} number {i}.', face=face)))
    with open(os.path.join(folder, 'pairs.jsonl'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with open(os.path.join(folder, 'settings.json'), 'w') as f:
        json.dump(dict(source=root, checkpoint=f'{folder}/nnet.pth'), f)
    return folder


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """(data root, run A, run B, the pairs): two runs on the same synthetic test pairs, told apart by their words."""
    from libs.avamerg import AvaMERG
    base = tmp_path_factory.mktemp('rating')
    root = str(base / 'data')
    make_dataset(root, seed=0, dialogues=1, test_dialogues=4, size=64)
    pairs = AvaMERG(root, 'test').pairs
    assert len(pairs) >= 8
    return (root, fake_run(str(base / 'model_alpha'), root, pairs, 'happy', 'Alpha <i>reply</i> &'),
            fake_run(str(base / 'model_beta'), root, pairs, 'sad', 'Beta reply'), pairs)


def test_sheet_is_blind_self_contained_and_seeded(runs, tmp_path):
    root, run_a, run_b, pairs = runs
    out = str(tmp_path / 'sheet.html')
    key = rating.make_sheet(run_a, run_b, out, seed=3)
    page = open(out, encoding='utf-8').read()
    with open(rating.key_path(out)) as f:
        assert json.load(f) == key
    assert rating.key_path(out) == str(tmp_path / 'sheet_key.json')
    # Blind: nothing in the page names a run or its folder, and the key is not in it.
    for secret in ('model_alpha', 'model_beta', run_a, run_b, 'sheet_key', '"left": "A"'):
        assert secret not in page
    assert 'http://' not in page and 'https://' not in page  # self-contained: faces are data URIs
    assert '<i>' not in page and 'Alpha &lt;i&gt;reply&lt;/i&gt; &amp; number 0.' in page  # words shown as text
    assert page.count('src="data:image/png;base64,') == 3 * len(pairs)
    assert all(html.escape(p.speaker_text) in page for p in pairs)  # the speaker's words on every pair
    # Left/right drawn per pair: both layouts occur, and where A is on the left its words come first.
    lefts = [v['left'] for v in key['pairs'].values()]
    assert set(lefts) == {'A', 'B'}
    for pid, v in key['pairs'].items():
        section = page[page.index(f'data-pair="{pid}"'):]
        section = section[:section.index('</section>')]
        first = 'Alpha' if v['left'] == 'A' else 'Beta'
        assert section.index(first) < section.index('Beta' if first == 'Alpha' else 'Alpha')
    # The seed is recorded and decides everything; another seed draws another layout.
    assert key['seed'] == 3 and rating.make_sheet(run_a, run_b, str(tmp_path / 'again.html'), seed=3)['pairs'] == \
        key['pairs']
    assert rating.make_sheet(run_a, run_b, str(tmp_path / 'other.html'), seed=4)['pairs'] != key['pairs']
    assert len(rating.make_sheet(run_a, run_b, str(tmp_path / 'few.html'), seed=3, max_pairs=3)['pairs']) == 3


def test_runs_on_different_pairs_are_refused(runs, tmp_path):
    root, run_a, run_b, _ = runs
    short = str(tmp_path / 'short')
    shutil.copytree(run_b, short)
    lines = open(os.path.join(short, 'pairs.jsonl')).read().splitlines()
    with open(os.path.join(short, 'pairs.jsonl'), 'w') as f:
        f.write('\n'.join(lines[1:]) + '\n')
    with pytest.raises(UserError, match='not on the same pairs'):
        rating.make_sheet(run_a, short, str(tmp_path / 's.html'))
    with pytest.raises(UserError, match='pass --data_root'):
        rating.make_sheet(run_a, run_b, str(tmp_path / 's.html'), data_root=str(tmp_path / 'absent'))


def ratings_for(key, wants):
    """A ratings file's dict that prefers run wants[i] ('A', 'B' or 'tie') on the key's i-th pair."""
    ratings = {}
    for (pid, v), want in zip(key['pairs'].items(), wants):
        choice = 'tie' if want == 'tie' else 'left' if v['left'] == want else 'right'
        ratings[pid] = dict(choice=choice, layout=v['layout'])
    return dict(format=rating.RATINGS_FORMAT, sheet_id=key['sheet_id'], rater='r1', ratings=ratings)


def test_score_by_hand(runs, tmp_path):
    root, run_a, run_b, pairs = runs
    out = str(tmp_path / 'sheet.html')
    key = rating.make_sheet(run_a, run_b, out, seed=1)
    wants = (['A'] * 5 + ['B', 'tie'] + ['A'] * len(pairs))[:len(pairs)]
    path = tmp_path / 'ratings.json'
    path.write_text(json.dumps(ratings_for(key, wants)))
    result = rating.score([str(path)], rating.key_path(out))
    a, b, t = wants.count('A'), wants.count('B'), wants.count('tie')
    assert (result['wins_a'], result['wins_b'], result['ties'], result['judgements']) == (a, b, t, len(pairs))
    assert result['win_rate_a'] == pytest.approx(a / (a + b))
    # Clopper-Pearson from the beta quantiles.
    n = a + b
    assert result['ci95'] == pytest.approx([stats.beta.ppf(.025, a, n - a + 1), stats.beta.ppf(.975, a + 1, n - a)])
    assert result['ci95'][0] < result['win_rate_a'] < result['ci95'][1]
    # Two raters: every judgement counts.
    assert rating.score([str(path), str(path)], rating.key_path(out))['wins_a'] == 2 * a
    assert 'tie 1' in rating.score_markdown(result) and 'Clopper-Pearson' in rating.score_markdown(result)


def test_foreign_or_edited_ratings_are_refused(runs, tmp_path):
    root, run_a, run_b, pairs = runs
    key = rating.make_sheet(run_a, run_b, str(tmp_path / 'one.html'), seed=1)
    other = rating.make_sheet(run_a, run_b, str(tmp_path / 'two.html'), seed=2)
    path = tmp_path / 'ratings.json'
    path.write_text(json.dumps(ratings_for(other, ['A'] * len(pairs))))
    with pytest.raises(UserError, match='give the key saved beside that sheet'):
        rating.score([str(path)], str(tmp_path / 'one_key.json'))
    edited = ratings_for(key, ['A'] * len(pairs))
    first = next(iter(edited['ratings']))
    edited['ratings'][first]['layout'] = '0' * 16
    path.write_text(json.dumps(edited))
    with pytest.raises(UserError, match='edited or comes from another sheet'):
        rating.score([str(path)], str(tmp_path / 'one_key.json'))
    edited = ratings_for(key, ['A'] * len(pairs))
    edited['ratings'][first]['choice'] = 'A'
    path.write_text(json.dumps(edited))
    with pytest.raises(UserError, match='expected one of'):
        rating.score([str(path)], str(tmp_path / 'one_key.json'))
    path.write_text('[]')
    with pytest.raises(UserError, match='not a ratings file'):
        rating.score([str(path)], str(tmp_path / 'one_key.json'))


def test_command_line(runs, tmp_path):
    root, run_a, run_b, pairs = runs
    script = os.path.join(ROOT, 'scripts', 'rating_sheet.py')
    sheet = str(tmp_path / 'sheet.html')
    done = subprocess.run([sys.executable, script, 'make', run_a, run_b, f'--out={sheet}', '--seed=5'],
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    with open(rating.key_path(sheet)) as f:
        key = json.load(f)
    (tmp_path / 'r.json').write_text(json.dumps(ratings_for(key, ['B'] * len(pairs))))
    done = subprocess.run([sys.executable, script, 'score', 'r.json', f'--key={rating.key_path(sheet)}',
                           '--out=score.json'], capture_output=True, text=True, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert f'A better 0, B better {len(pairs)}, tie 0' in done.stdout
    assert json.loads((tmp_path / 'score.json').read_text())['win_rate_a'] == 0.0
    bad = subprocess.run([sys.executable, script, 'score', 'r.json'], capture_output=True, text=True,
                         cwd=str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.count('\n') == 1 and '--key' in bad.stderr


# ----------------------------------------------------------------------------------------------------------------
# The sheet in headless Chromium
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    """Headless Chromium (Debian's, through its chromedriver) that downloads into a folder; yields (driver, folder)."""
    found = shutil.which('chromium'), shutil.which('chromedriver')
    if not all(found):
        reason = ('browser test needs chromium and chromedriver on PATH (Debian: apt-get install chromium '
                  'chromium-driver)')
        if os.environ.get('EMPATH_REQUIRE_BROWSER') == '1':
            pytest.fail(f'{reason}, and EMPATH_REQUIRE_BROWSER=1')
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    downloads = str(tmp_path_factory.mktemp('downloads'))
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=1100,1400',
                '--host-resolver-rules=MAP * ~NOTFOUND', '--disable-background-networking',
                '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-default-apps'):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    driver.execute_cdp_cmd('Browser.setDownloadBehavior', {'behavior': 'allow', 'downloadPath': downloads})
    yield driver, downloads
    driver.quit()


def test_browser_round_trip(browser, runs, tmp_path):
    from selenium.webdriver.common.by import By
    driver, downloads = browser
    root, run_a, run_b, pairs = runs
    sheet = str(tmp_path / 'sheet.html')
    key = rating.make_sheet(run_a, run_b, sheet, seed=7)
    driver.get('file://' + sheet)
    sections = driver.find_elements(By.CSS_SELECTOR, 'section.pair')
    assert len(sections) == len(pairs)
    # Every face decoded (the data URIs are valid images).
    assert driver.execute_script("return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    driver.find_element(By.ID, 'rater').send_keys('tester')
    # Prefer the run whose words read "Alpha" on all but the last two pairs: a tie, then one left unanswered.
    for n, section in enumerate(sections[:-1]):
        if n == len(sections) - 2:
            value = 'tie'
        else:
            sides = section.find_elements(By.CSS_SELECTOR, 'figure.side')
            value = 'left' if 'Alpha' in sides[0].text else 'right'
        button = section.find_element(By.CSS_SELECTOR, f'input[value="{value}"]')
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)  # clear of the sticky bar
        button.click()
    assert driver.find_element(By.ID, 'progress').text == f'{len(pairs) - 1} of {len(pairs)} rated'
    driver.save_screenshot(str(tmp_path / 'sheet.png'))
    # A reload keeps the answers and the rater (the page stores them in the browser under the sheet's id).
    driver.refresh()
    assert driver.find_element(By.ID, 'progress').text == f'{len(pairs) - 1} of {len(pairs)} rated'
    assert driver.find_element(By.ID, 'rater').get_attribute('value') == 'tester'
    driver.find_element(By.ID, 'save').click()
    saved = os.path.join(downloads, f'ratings-{key["sheet_id"]}.json')
    deadline = time.time() + TIMEOUT
    while not os.path.isfile(saved) and time.time() < deadline:
        time.sleep(0.2)
    with open(saved) as f:
        ratings = json.load(f)
    assert ratings['rater'] == 'tester' and len(ratings['ratings']) == len(pairs) - 1
    result = rating.score([saved], rating.key_path(sheet))
    # The clicks chose run A's words on every decisive pair, whatever side it was drawn on.
    assert (result['wins_a'], result['wins_b'], result['ties']) == (len(pairs) - 2, 0, 1)
    assert result['win_rate_a'] == 1.0 and result['ci95'][1] == 1.0 and result['ci95'][0] < 1.0
