"""LoRA fine-tuning (libs/lora.py) on the tiny EmpathDiffuser: what is trained, what a checkpoint holds, the merged
export (ordinary layout, loads without peft, computes what the adapter model computes) and bit-exact resume."""
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_empath
from libs import config_check, lora, trainer
from libs.diffusion import Schedule, stable_diffusion_betas
from libs.errors import UserError
from libs.features import FeatureDataset
from libs.uvit import build_nnet, is_condition_key, load_nnet_weights
from test_train import one_thread, read_metrics, tiny_config, tiny_root  # noqa: F401 (fixtures)

TARGETS = ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')


def lora_config(root, workdir, **train):
    """The tiny training config with LoRA on (rank 4) and train-section overrides."""
    config = tiny_config(root, workdir, **train)
    config.train.lora.update(enabled=True, rank=4, alpha=8., lr=3e-3)
    return config


def cond_inputs(config, B, seed):
    """Random network inputs with a speaker turn (all at mid-range timesteps)."""
    g = torch.Generator().manual_seed(seed)
    z, T = config.z_shape, config.num_text_tokens
    x = lambda: (torch.randn(B, *z, generator=g), torch.randn(B, 1, config.clip_img_dim, generator=g),
                 torch.randn(B, T, config.text_dim, generator=g))
    img, clip, text = x()
    cimg, cclip, ctext = x()
    t = torch.full((B,), 500)
    cond = dict(img=cimg, clip_img=cclip, text=ctext, t_img=torch.zeros(B, dtype=torch.long),
                t_text=torch.zeros(B, dtype=torch.long))
    return (img, clip, text, t, t, torch.full((B,), config.data_type)), dict(cond=cond)


def test_only_adapters_and_new_parameters_are_trained(tiny_root, tmp_path):
    config = lora_config(tiny_root, tmp_path)
    torch.manual_seed(0)
    nnet = trainer.build_model(config)
    plain = build_nnet(config.nnet)
    load_nnet_weights(plain, config.train.init_from)
    plain.load_state_dict({k: v for k, v in nnet.state_dict().items() if is_condition_key(k)}, strict=False)

    names = {n: p for n, p in nnet.named_parameters()}
    trained = {n for n, p in names.items() if p.requires_grad}
    adapters = set(lora.adapter_keys(names))
    assert trained == adapters | set(nnet.condition_parameters())
    blocks = config.nnet.depth + 1
    assert len(adapters) == 2 * len(TARGETS) * blocks               # lora_A and lora_B of every target, every block
    assert {n.split('.lora_')[0].split('.', 2)[-1] for n in adapters if n.startswith('in_blocks.')} == set(TARGETS)
    assert sum(n.endswith('.attn.cond_gate') for n in trained) == blocks and 'emotion_head.3.weight' in trained

    # B = 0 at injection: the adapted network computes what the pretrained one does (to float rounding: measured
    # differences of one unit in the last place in a few elements).
    args, kwargs = cond_inputs(config, 2, 0)
    nnet.eval(), plain.eval()
    with torch.no_grad():
        for a, b in zip(nnet(*args, **kwargs), plain(*args, **kwargs)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

    # One real training step: gradients reach exactly the trained tensors, and only they change.
    nnet.train()
    optimizer = trainer.make_optimizer(nnet, config)
    lrs = {id(p): g['lr'] for g in optimizer.param_groups for p in g['params']}
    assert set(lrs) == {id(names[n]) for n in trained}
    assert {lrs[id(names[n])] for n in adapters} == {config.train.lora.lr}
    assert {lrs[id(names[n])] for n in nnet.condition_parameters()} == {config.optimizer.lr
                                                                        * config.optimizer.condition_lr_scale}
    data = FeatureDataset(config.data.train)
    batch = torch.utils.data.default_collate([dict(data[i], position=i) for i in range(4)])
    rand = trainer.draw_randomness(range(4), config.seed, 'train', config, 1000, trainer.speaker_dropout(config.train))
    encode_text = trainer.load_text_reducer(config, torch.device('cpu')).encode_prefix
    before = {n: p.detach().clone() for n, p in names.items()}
    losses, _ = trainer.training_losses(nnet, batch, rand, encode_text, Schedule(stable_diffusion_betas()), config)
    losses['loss'].mean().backward()
    assert {n for n, p in names.items() if p.grad is not None} == trained
    assert all(names[n].grad.abs().sum() > 0 for n in trained if '.lora_A.' not in n)  # A's grad is 0 while B = 0
    optimizer.step()
    changed = {n for n, p in names.items() if not torch.equal(p, before[n])}
    assert {n for n in trained if '.lora_A.' not in n} <= changed <= trained   # A moves by weight decay only


def test_target_modules_and_optimizer_are_checked(tiny_root, tmp_path):
    for targets, message in ((('attn.qkv', 'mlp.fc3'), r"\['mlp.fc3'\] match no Linear layer.*attn.qkv"),
                             (('attn.qkv', 'emotion_head.1'), 'belong to the new speaker-path parameters')):
        config = lora_config(tiny_root, tmp_path)
        config.train.lora.target_modules = targets
        with pytest.raises(UserError, match=message):
            trainer.build_model(config)
    config = lora_config(tiny_root, tmp_path, init_from='')
    config.train.lora.update(rank=0, dropout=1.)
    found = config_check.problems(config, 'train')
    assert 'train.lora.rank=0 (must be an integer >= 1)' in found and any('lora.dropout=1.0' in p for p in found)
    config.train.lora.update(rank=4, dropout=0.)
    assert config_check.problems(config, 'train') == ['train.lora.enabled needs train.init_from: LoRA adapts '
                                                      'pretrained weights, a frozen random network has nothing to adapt']
    if not torch.cuda.is_available():
        config = tiny_config(tiny_root, tmp_path)
        config.optimizer.eight_bit = True
        with pytest.raises(UserError, match='eight_bit needs a CUDA GPU'):
            trainer.make_optimizer(build_nnet(config.nnet), config)


@pytest.fixture(scope='module')
def lora_run(tiny_root, tmp_path_factory):
    """30 LoRA steps, checkpoints at 15 and 30 (validation at both); the base is a private copy of init_from."""
    work = tmp_path_factory.mktemp('lora')
    shutil.copyfile(get_init(tiny_root), work / 'base.pth')
    config = lora_config(tiny_root, work / 'reference', init_from=str(work / 'base.pth'), **RUN)
    train_empath.train(config)
    return config, os.path.join(config.workdir, config.name)


RUN = dict(n_steps=30, ckpt_every=15, val_every=15, log_every=5, keep_last=2)


def get_init(root):
    """The tiny run's official-layout initial weights."""
    return tiny_config(root, '.').train.init_from


def assert_same_run(a: str, b: str, step: int) -> None:
    """Two runs' checkpoints of ``step`` (networks, AdamW states), exports and metrics are identical, bit for bit."""
    for name in ('nnet.safetensors', 'nnet_ema.safetensors'):
        x, y = (load_file(os.path.join(r, 'ckpts', f'{step}.ckpt', name)) for r in (a, b))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    opt_x, opt_y = (torch.load(os.path.join(r, 'ckpts', f'{step}.ckpt', 'training_state.pt'), weights_only=True)
                    ['optimizer']['state'] for r in (a, b))
    assert opt_x.keys() == opt_y.keys() and all(torch.equal(opt_x[k][s], opt_y[k][s]) for k in opt_x for s in opt_x[k])
    x, y = (load_file(os.path.join(r, trainer.EXPORT)) for r in (a, b))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    strip = lambda ms: [{k: v for k, v in m.items() if k != 'sec_per_step'} for m in ms]
    assert strip(read_metrics(a)) == strip(read_metrics(b))


def test_checkpoints_hold_only_what_is_trained_and_the_export_is_merged(lora_run, monkeypatch):
    config, run = lora_run
    torch.manual_seed(0)
    adapted = trainer.build_model(config)
    trained = set(trainer.trained_keys(adapted))
    for name in ('nnet.safetensors', 'nnet_ema.safetensors'):
        stored = load_file(os.path.join(run, 'ckpts', '30.ckpt', name))
        assert set(stored) == trained and not any('base_layer' in k for k in stored)
    ckpt_ema = os.path.join(run, 'ckpts', '30.ckpt', 'nnet_ema.safetensors')
    with pytest.raises(UserError, match='holds only the tensors a LoRA run trains.*merged export'):
        trainer.load_exported_nnet(ckpt_ema)

    # The export is the ordinary U-ViT layout and loads with peft unavailable.
    exported_path = os.path.join(run, trainer.EXPORT)
    exported = load_file(exported_path)
    ordinary = build_nnet(config.nnet).state_dict()
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in ordinary.items()}
    with monkeypatch.context() as m:
        m.setitem(sys.modules, 'peft', None)              # `import peft` now raises ImportError
        merged, saved = trainer.load_exported_nnet(exported_path)
    assert saved['train']['lora']['enabled'] and not any('lora' in type(mod).__module__ for mod in merged.modules())

    # ... and computes what the adapter network (base + the checkpoint's EMA adapters) computes.
    missing, unexpected = adapted.load_state_dict(load_file(ckpt_ema), strict=False)
    assert not unexpected and set(missing) == set(adapted.state_dict()) - trained
    base = build_nnet(config.nnet)
    load_nnet_weights(base, config.train.init_from)
    base.load_state_dict({k: v for k, v in exported.items() if is_condition_key(k)}, strict=False)
    args, kwargs = cond_inputs(config, 3, 1)
    with torch.no_grad():
        out_adapted = adapted.eval()(*args, **kwargs)
        out_merged = merged.eval()(*args, **kwargs)
        out_base = base.eval()(*args, **kwargs)
    for a, m, b in zip(out_adapted, out_merged, out_base):
        torch.testing.assert_close(m, a, rtol=1e-5, atol=1e-5)
        assert (a - b).abs().max() > 1e-3                 # the adapters moved the network: the merge matters
    qkv = 'in_blocks.0.attn.qkv.weight'
    assert not torch.equal(exported[qkv], ordinary[qkv]) and not torch.equal(exported[qkv], base.state_dict()[qkv])


def test_lora_resume_is_bit_identical_and_needs_the_same_base(lora_run, tiny_root, tmp_path):
    config, ref_run = lora_run
    base = config.train.init_from
    first = lora_config(tiny_root, tmp_path, init_from=base, **dict(RUN, n_steps=15))
    train_empath.train(first)
    train_empath.train(lora_config(tiny_root, tmp_path, init_from=base, **RUN))   # resumes from step 15
    run = os.path.join(tmp_path, config.name)
    assert 'resumed from step 15' in open(os.path.join(run, 'log.txt')).read()
    assert_same_run(ref_run, run, 30)

    # Another base file under the same name, or LoRA switched off, cannot resume these checkpoints.
    changed = tmp_path / 'changed.pth'
    weights = torch.load(base, weights_only=True)
    weights['in_blocks.0.mlp.fc1.weight'] += 1e-3
    torch.save(weights, changed)
    with pytest.raises(UserError, match='trained on frozen base weights with SHA-256'):
        train_empath.train(lora_config(tiny_root, tmp_path, init_from=str(changed), **dict(RUN, n_steps=45)))
    full = tiny_config(tiny_root, tmp_path, init_from=base, **dict(RUN, n_steps=45))
    with pytest.raises(UserError, match='train.lora.enabled: True -> False'):
        train_empath.train(full)
    # A checkpoint whose tensors are not what the model trains is refused too, not filled in from the model.
    from accelerate import Accelerator
    nnet = trainer.build_model(full)
    with pytest.raises(UserError, match='does not hold the trained parameters of this model'):
        trainer.load_checkpoint(os.path.join(run, 'ckpts', '30.ckpt'), Accelerator(cpu=True), nnet,
                                trainer.make_ema(nnet), trainer.make_optimizer(nnet, full), None)
