"""The trainer's public API for measurements outside training (libs/demo/measure.py uses nothing else): a freshly
built EmpathDiffuser computes what the UniDiffuser it starts from computes, with the speaker present or absent."""
import torch

from libs import trainer
from libs.demo import measure
from libs.uvit import build_nnet
from test_train import one_thread, tiny_config, tiny_root  # noqa: F401 (fixtures)


def test_fresh_fine_tune_matches_its_pretrained_network_until_its_gates_open(tiny_root, tmp_path):
    config = tiny_config(tiny_root, tmp_path)
    empath = trainer.build_model(config)
    plain = build_nnet(dict(config.nnet, name='uvit_multi_post_ln_v1'))
    plain.load_state_dict(torch.load(config.train.init_from, weights_only=True))
    fresh = measure.output_difference(empath, plain, config, config.data.val, pairs=6)
    assert fresh['pairs'] == 6 and fresh['speaker_max'] < 1e-5 and fresh['no_speaker_max'] < 1e-5
    with torch.no_grad():
        for name, p in empath.named_parameters():
            if name.endswith('cond_gate'):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    opened = measure.output_difference(empath, plain, config, config.data.val, pairs=6)
    assert opened['speaker_max'] > 1e-3 and opened['no_speaker_max'] > 1e-3
    # The real speaker turn and its absence are different inputs: the opened gates answer them differently.
    assert opened['speaker'] != opened['no_speaker']


def test_speaker_condition_is_the_clean_turn_or_noise_at_t_max(tiny_root, tmp_path):
    config = tiny_config(tiny_root, tmp_path)
    B, N = 3, 1000
    C, h, w = config.z_shape
    batch = dict(speaker_moments=torch.randn(B, 2 * C, h, w), speaker_clip_img=torch.randn(B, 1, config.clip_img_dim),
                 speaker_text=torch.randn(B, config.num_text_tokens, config.clip_text_dim).half())
    rand = trainer.validation_randomness(range(B), config, N)
    assert rand['keep_img'].all() and rand['keep_text'].all()   # validation never drops the speaker
    reducer = torch.nn.Linear(config.clip_text_dim, config.text_dim)
    present = trainer.speaker_condition(batch, rand, reducer, config, N, present=True)
    absent = trainer.speaker_condition(batch, rand, reducer, config, N, present=False)
    assert present['t_img'].tolist() == present['t_text'].tolist() == [0] * B
    assert absent['t_img'].tolist() == absent['t_text'].tolist() == [N] * B
    torch.testing.assert_close(present['img'], trainer.sample_latent(batch['speaker_moments'],
                                                                     config.autoencoder.scale_factor,
                                                                     rand['speaker_latent']))
    assert torch.equal(present['clip_img'], batch['speaker_clip_img'])
    assert torch.equal(absent['img'], rand['absent_img']) and torch.equal(absent['text'], rand['absent_text'])
