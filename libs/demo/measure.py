"""What the demo measures: its two instruments and the numbers that show learning against controls.

Instruments (they read the synthetic ground truth back from generated outputs): an expression classifier, a small
CNN trained only on faces drawn by ``libs.synthetic.render_face``, and ``reaction_of``, which names the empathetic
reaction whose reply templates a generated utterance is closest to. Measurements: how often an evaluation's
response faces and utterances show the reaction the synthetic rule prescribes for the speaker's emotion; whether the
fine-tune's initial network computes what the pre-trained one computes; t2i / i2t of the pre-trained and of the
fine-tuned network; and the table of trained vs control numbers that the report shows and the test asserts.
"""
import collections
import difflib
import json
import os
import random
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from libs.demo.stages import load_faces, to_batch


def read_jsonl(path: str) -> List[dict]:
    """The records of a JSON-lines file."""
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Instrument 1: the expression classifier
# ----------------------------------------------------------------------------------------------------------------

def response_expressions() -> tuple:
    """The expressions a listener's face can take (the values of RESPONSE_EXPRESSION), sorted."""
    from libs.synthetic import RESPONSE_EXPRESSION
    return tuple(sorted(set(RESPONSE_EXPRESSION.values())))


def prescribed(emotion: str) -> str:
    """The listener reaction (face expression and reply templates) the synthetic rule prescribes for an emotion."""
    from libs.synthetic import expression_of
    return expression_of(emotion, 'response')


class ExpressionNet(nn.Module):
    """Three conv-ReLU-pool stages and a linear read-out: (B, 3, R, R) in [-1, 1] -> (B, classes) logits."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def render_expressions(n: int, size: int, classes: Sequence[str], seed: int, blur: bool):
    """n faces of random avatars with uniformly drawn expressions: (N, 3, R, R) in [-1, 1] and (N,) labels.

    ``blur`` softens a random half of them, so that the classifier does not hinge on pixel-sharp edges that no
    decoder reproduces; the held-out set stays sharp.
    """
    from PIL import ImageFilter

    from libs.autoencoder import to_tensor_m11
    from libs.synthetic import MAX_AVATAR_ID, render_face
    rng = random.Random(seed)
    faces, labels = [], []
    for _ in range(n):
        label = rng.randrange(len(classes))
        face = render_face(rng.randint(1, MAX_AVATAR_ID), classes[label], size, rng)
        if blur and rng.random() < .5:
            face = face.filter(ImageFilter.GaussianBlur(rng.uniform(.3, 1.5)))
        faces.append(to_tensor_m11(face))
        labels.append(label)
    return torch.stack(faces), torch.tensor(labels)


def train_expression_classifier(cfg, size: int, seed: int):
    """Train ExpressionNet on rendered faces; returns (net, classes, curve, accuracy on held-out rendered faces)."""
    classes = response_expressions()
    x, y = render_expressions(cfg.faces, size, classes, seed, blur=True)
    x_val, y_val = render_expressions(cfg.heldout_faces, size, classes, seed + 1, blur=False)
    torch.manual_seed(seed)
    net = ExpressionNet(len(classes))
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    generator, curve = torch.Generator().manual_seed(seed), []
    for step in tqdm(range(1, cfg.steps + 1), desc='expression classifier', dynamic_ncols=True):
        batch = torch.randint(len(x), (cfg.batch_size,), generator=generator)
        loss = F.cross_entropy(net(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append(dict(step=step, loss=loss.item()))
    net.eval()
    return net, classes, curve[::max(1, cfg.steps // 100)], (classify(net, x_val) == y_val).double().mean().item()


def load_classifier(path: str, num_classes: int) -> ExpressionNet:
    """The expression classifier saved by the classifier stage."""
    from safetensors.torch import load_file
    net = ExpressionNet(num_classes)
    net.load_state_dict(load_file(path))
    return net.eval()


@torch.no_grad()
def classify(net, faces: torch.Tensor) -> torch.Tensor:
    """Predicted class indices (N,) of faces (N, 3, R, R) in [-1, 1]."""
    return torch.cat([net(x).argmax(-1) for x in faces.split(256)])


@torch.no_grad()
def reference_agreement(net, classes, config, pairs: Sequence[dict], resolution: int) -> dict:
    """How often the classifier reads the prescribed expression on reference listener faces and on their codec
    reconstructions (the instrument check, and what the codec alone keeps of the expression)."""
    from libs.autoencoder import load_autoencoder
    from libs.avamerg import AvaMERG
    reader = AvaMERG(config.data.root, 'test')
    faces = to_batch([reader.load_face(p['response_stem']) for p in pairs], resolution)
    codec = load_autoencoder(config.autoencoder.pretrained_path, config.autoencoder)
    mean = codec.encode_moments(faces).chunk(2, dim=1)[0]
    reconstructed = codec.decode(codec.scale_factor * mean).clamp(-1, 1)
    want = torch.tensor([classes.index(prescribed(p['emotion'])) for p in pairs])
    return {name: (classify(net, x) == want).double().mean().item()
            for name, x in (('reference_faces', faces), ('codec_reconstructions', reconstructed))}


# ----------------------------------------------------------------------------------------------------------------
# Instrument 2: which reaction's reply templates an utterance follows
# ----------------------------------------------------------------------------------------------------------------

def reply_templates() -> Dict[str, List[str]]:
    """Every reply the synthetic data can contain, by reaction: each opening with each closing."""
    from libs.synthetic import CLOSINGS, RESPONSES
    return {reaction: [f'{opening} {closing}'.strip() for opening in openings for closing in CLOSINGS[reaction]]
            for reaction, openings in RESPONSES.items()}


def reaction_of(text: str, templates: Dict[str, List[str]] = None) -> str:
    """The reaction whose reply template is most similar to `text` (difflib's ratio of matching characters).

    A perfectly generated reply matches one template exactly; a garbled one still lands on its nearest template,
    so a reply that ignores the speaker agrees with the prescribed reaction at about chance.
    """
    templates = templates or reply_templates()
    text = ' '.join(text.lower().split())
    score = lambda t: difflib.SequenceMatcher(None, text, t.lower()).ratio()  # noqa: E731
    return max(templates, key=lambda reaction: max(score(t) for t in templates[reaction]))


# ----------------------------------------------------------------------------------------------------------------
# An evaluation's outputs read by both instruments
# ----------------------------------------------------------------------------------------------------------------

def agreement(predicted: Sequence[str], wanted: Sequence[str]) -> float:
    """Share of positions where the two label lists agree."""
    return sum(p == w for p, w in zip(predicted, wanted)) / len(wanted)


def read_evaluation(net, classes, eval_dir: str, resolution: int) -> dict:
    """Reactions shown by an eval_avamerg.py folder's response faces and utterances, against the prescribed ones."""
    records = read_jsonl(os.path.join(eval_dir, 'pairs.jsonl'))
    wanted = [prescribed(r['gold_emotion']) for r in records]
    faces = classify(net, load_faces([os.path.join(eval_dir, r['face']) for r in records], resolution))
    face_reads = [classes[i] for i in faces.tolist()]
    templates = reply_templates()
    text_reads = [reaction_of(r['generated'], templates) for r in records]
    return dict(face_agreement=agreement(face_reads, wanted), text_agreement=agreement(text_reads, wanted),
                n=len(records),
                # String keys, as they read back from the stage marker's JSON.
                face_reads={str(r['index']): e for r, e in zip(records, face_reads)},
                text_reads={str(r['index']): e for r, e in zip(records, text_reads)},
                prescribed_share=dict(collections.Counter(wanted)))


def majority_rates(records: Sequence[dict]) -> dict:
    """Accuracy of always answering the most frequent class: emotion 32- and 7-way (labelled pairs), reaction."""
    from libs.avamerg import coarse_index
    labels = [r['gold_label'] for r in records if r['gold_label'] >= 0]
    reactions = collections.Counter(prescribed(r['gold_emotion']) for r in records)
    return dict(fine_acc=collections.Counter(labels).most_common(1)[0][1] / len(labels),
                coarse_acc=collections.Counter(coarse_index(x) for x in labels).most_common(1)[0][1] / len(labels),
                reaction=reactions.most_common(1)[0][1] / len(records))


# ----------------------------------------------------------------------------------------------------------------
# The fine-tune starts from the pre-trained network
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def output_difference(empath_net, plain_net, config, features: str, pairs: int) -> dict:
    """max |ε_empath − ε_plain| over held-out pairs, with their real speaker turns and with no speaker.

    Both networks get the same noisy response (the training objective's inputs: a posterior sample of the face
    latent, independent timesteps for face and text, fixed noise); the EmpathDiffuser network also the clean
    speaker turn of each pair, or that turn absent (Gaussian noise at t = N), exactly as training feeds them.
    """
    from libs import trainer
    from libs.diffusion import Schedule, stable_diffusion_betas
    from libs.features import FeatureDataset
    data, schedule = FeatureDataset(features), Schedule(stable_diffusion_betas())
    indices = list(range(min(pairs, len(data))))
    batch = torch.utils.data.default_collate([data[i] for i in indices])
    rand = trainer.validation_randomness(indices, config, schedule.N)
    encode_text = trainer.load_text_reducer(config, 'cpu').encode_prefix
    empath_net.eval(), plain_net.eval()
    plain = trainer.response_prediction(plain_net, schedule, batch, rand, encode_text, config)
    result = dict(pairs=len(indices))
    for name, present in (('speaker', True), ('no_speaker', False)):
        cond = trainer.speaker_condition(batch, rand, encode_text, config, schedule.N, present)
        out = trainer.response_prediction(empath_net, schedule, batch, rand, encode_text, config, cond)[:3]
        result[name] = {k: (a - b).abs().max().item() for k, a, b in zip(('img', 'clip_img', 'text'), out, plain)}
        result[f'{name}_max'] = max(result[name].values())
    return result


# ----------------------------------------------------------------------------------------------------------------
# UniDiffuser's t2i and i2t, before and after the fine-tune
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def unidiffuser_modes(config, nnet_path: str, pairs: Sequence[dict], net, classes, out_dir: str) -> dict:
    """t2i on held-out listener utterances and i2t on held-out listener faces; what each output shows.

    t2i: does the generated face show the reaction its utterance was written for (the classifier)? i2t: does the
    generated utterance follow the reaction its face shows (reaction_of), and BLEU against the face's own
    utterance. A fine-tuned (EmpathDiffuser) network runs both with no speaker, as sample_multi.py does; the absent
    speaker's noise comes from its own generator, so both networks start from the same sampling noise.
    """
    from libs import metrics, modes, pipeline
    from libs.avamerg import AvaMERG
    comp = pipeline.load_components(config, torch.device('cpu'), nnet_path)
    ctx = pipeline.make_context(comp, torch.Generator().manual_seed(config.seed))
    B = len(pairs)
    speaker = {}
    if comp.nnet.condition:  # t2i and i2t batch the same guidance rows, so they share one cache
        aside = pipeline.make_context(comp, torch.Generator().manual_seed(config.seed + 1))
        speaker = pipeline.speaker_inputs(comp, aside, B, mode='t2i')
    wanted = [prescribed(p['emotion']) for p in pairs]
    prompts = [p['response_text_raw'] for p in pairs]
    t2i = modes.get_mode('t2i')(ctx, dict(text=pipeline.encode_prompts(comp, prompts), **speaker))
    images = pipeline.decode_images(comp, t2i['z'])
    reader = AvaMERG(config.data.root, 'test')
    z, clip_img = pipeline.encode_images(comp, [reader.load_face(p['response_stem']) for p in pairs], ctx.generator)
    texts = pipeline.decode_texts(comp, modes.get_mode('i2t')(ctx, dict(z=z, clip_img=clip_img, **speaker))['text'])
    face_reads = [classes[i] for i in classify(net, to_batch(images, comp.resolution)).tolist()]
    templates = reply_templates()
    text_reads = [reaction_of(t, templates) for t in texts]
    os.makedirs(out_dir, exist_ok=True)
    for i, image in enumerate(images):
        image.save(os.path.join(out_dir, f't2i_{i:03d}.png'))
    bleu = metrics.corpus_bleu_n(texts, prompts)
    return dict(t2i_agreement=agreement(face_reads, wanted), i2t_agreement=agreement(text_reads, wanted),
                i2t_bleu4=bleu['bleu4'], i2t_bleu2=bleu['bleu2'], samples=B,
                scale=float(config.sample.scale), steps=config.sample.sample_steps,
                examples=[dict(utterance=p['response_text_raw'], face=f't2i_{i:03d}.png', face_reads=f,
                               face_stem=p['response_stem'], caption=t, caption_reads=r, prescribed=w)
                          for i, (p, f, t, r, w) in enumerate(zip(pairs, face_reads, texts, text_reads, wanted))])


# ----------------------------------------------------------------------------------------------------------------
# The learning table: the trained network against its controls
# ----------------------------------------------------------------------------------------------------------------

# (key, label, how it is read from an evaluation's metrics + instrument readings)
LEARNING = (
    ('emotion_coarse_acc', 'speaker emotion, 7-way accuracy', lambda m, r: m['emotion']['coarse_acc']),
    ('emotion_fine_acc', 'speaker emotion, 32-way accuracy', lambda m, r: m['emotion']['fine_acc']),
    ('emotion_coarse_macro_f1', 'speaker emotion, 7-way macro-F1', lambda m, r: m['emotion']['coarse_macro_f1']),
    ('text_agreement', 'response utterance follows the prescribed reaction', lambda m, r: r['text_agreement']),
    ('bleu4', 'response BLEU-4 (sacreBLEU)', lambda m, r: m['bleu4']),
    ('bleu2', 'response BLEU-2', lambda m, r: m['bleu2']),
    ('face_agreement', 'response face shows the prescribed expression', lambda m, r: r['face_agreement']),
    ('dist1', 'Dist-1 (distinct unigrams)', lambda m, r: m['dist1']),
    ('dist2', 'Dist-2 (distinct bigrams)', lambda m, r: m['dist2']),
)
CONTROLS = ('shuffled', 'pretrained', 'online')  # evaluations the trained network ('eval') is compared with


def learning_numbers(evaluations: Dict[str, dict], majority: dict, classes: Sequence[str]) -> Dict[str, dict]:
    """{metric: {'trained': x, 'shuffled': x, 'pretrained': x, 'online': x, 'majority': x, 'uniform': x}}.

    ``evaluations`` maps 'trained' and each control to {'metrics': eval_avamerg's metrics, 'reads': read_evaluation}.
    """
    from libs.avamerg import COARSE_7, EMOTIONS_32
    chance = dict(emotion_coarse_acc=(majority['coarse_acc'], 1 / len(COARSE_7)),
                  emotion_fine_acc=(majority['fine_acc'], 1 / len(EMOTIONS_32)),
                  text_agreement=(majority['reaction'], 1 / len(classes)),
                  face_agreement=(majority['reaction'], 1 / len(classes)))
    numbers = {}
    for key, _, read in LEARNING:
        row = {name: read(e['metrics'], e['reads']) for name, e in evaluations.items()}
        if key in chance:
            row['majority'], row['uniform'] = chance[key]
        numbers[key] = row
    return numbers
