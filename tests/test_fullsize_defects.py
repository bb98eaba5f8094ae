"""Defects of the full-size path (issue 21): each test fails on the code before its fix."""
import pytest
import torch

from configs.avamerg_tiny import get_config as tiny_train_config
from libs import trainer
from libs.diffusion import Schedule, stable_diffusion_betas
from libs.uvit import build_nnet


# ----------------------------------------------------------------------------------------------------------------
# The emotion loss skips pairs whose whole speaker was dropped
# ----------------------------------------------------------------------------------------------------------------

def tiny_batch(config, labels, g):
    """A feature batch of len(labels) pairs with the tiny config's shapes."""
    B, (C, h, w) = len(labels), config.z_shape
    T, Dc = config.num_text_tokens, config.clip_text_dim
    return dict(speaker_moments=torch.randn(B, 2 * C, h, w, generator=g),
                response_moments=torch.randn(B, 2 * C, h, w, generator=g),
                speaker_clip_img=torch.randn(B, 1, config.clip_img_dim, generator=g),
                response_clip_img=torch.randn(B, 1, config.clip_img_dim, generator=g),
                speaker_text=torch.randn(B, T, Dc, generator=g), response_text=torch.randn(B, T, Dc, generator=g),
                label=torch.tensor(labels))


def emotion_losses(keep_img, keep_text, labels):
    """(per-pair emotion CE, the emotion head's gradient of the batch's mean emotion loss, the logits)."""
    config = tiny_train_config('unused')
    torch.manual_seed(0)
    net = build_nnet(config.nnet)
    g = torch.Generator().manual_seed(1)
    batch = tiny_batch(config, labels, g)
    rand = trainer.draw_randomness(range(len(labels)), 0, 'train', config, 1000, trainer.NO_DROPOUT)
    rand.update(keep_img=torch.tensor(keep_img), keep_text=torch.tensor(keep_text))
    reducer = torch.nn.Linear(config.clip_text_dim, config.text_dim)
    losses, logits = trainer.training_losses(net, batch, rand, reducer, Schedule(stable_diffusion_betas()), config)
    losses['emotion'].mean().backward()
    grad = torch.cat([p.grad.flatten() for p in net.emotion_head.parameters()])
    return losses['emotion'], grad, logits.detach()


def test_no_emotion_loss_when_the_whole_speaker_is_dropped():
    ce, grad, _ = emotion_losses([False] * 3, [False] * 3, [4, 0, 17])
    assert torch.equal(ce, torch.zeros(3))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_emotion_loss_is_the_cross_entropy_of_the_pairs_with_a_speaker():
    # pairs: whole turn, face only, utterance only, nothing (labelled), nothing (unknown label)
    keep_img, keep_text = [True, True, False, False, False], [True, False, True, False, False]
    labels = [3, 9, 21, 5, -1]
    ce, grad, logits = emotion_losses(keep_img, keep_text, labels)
    log_p = logits.float().log_softmax(-1)
    want = torch.tensor([-log_p[i, y].item() for i, y in enumerate(labels[:3])] + [0., 0.])
    torch.testing.assert_close(ce, want)
    assert grad.abs().sum() > 0
