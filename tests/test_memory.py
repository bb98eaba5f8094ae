"""libs/memory.py: chunked encoders give the unchunked results, plans agree with measured allocations, and the
preflight refuses on a (mocked) CUDA device that lacks memory, naming a setting that fits, and never on a CPU."""
import re

import pytest
import torch
from PIL import Image

from common import tiny
from libs import memory, modes, pipeline
from libs.errors import UserError


@pytest.fixture(scope='module')
def comp(tiny_models):
    return pipeline.load_components(tiny(tiny_models, condition=True), torch.device('cpu'))


@pytest.fixture(scope='module')
def faces():
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(5)]


def set_chunks(comp, chunk):
    """Every encoder of ``comp`` in chunks of ``chunk`` items (None: whole batches)."""
    comp.autoencoder.encode_chunk = comp.autoencoder.decode_chunk = chunk
    comp.clip_text.chunk = comp.clip_img.chunk = chunk


# ----------------------------------------------------------------------------------------------------------------
# Chunking does not change results
# ----------------------------------------------------------------------------------------------------------------

def test_load_components_sets_the_configured_chunks(tiny_models):
    config = tiny(tiny_models)
    config.encoders.update(vae_encode_chunk=3, vae_decode_chunk=5, clip_chunk=7)
    loaded = pipeline.load_components(config, torch.device('cpu'))
    assert (loaded.autoencoder.encode_chunk, loaded.autoencoder.decode_chunk) == (3, 5)
    assert loaded.clip_text.chunk == loaded.clip_img.chunk == 7


def test_periodic_training_samples_decode_in_the_configured_chunks(tiny_models):
    from configs.avamerg_tiny import get_config
    from libs import trainer
    config = get_config(tiny_models)
    config.train.sample_every, config.encoders.vae_decode_chunk = 1, 5
    sampling = trainer.load_sampling(config, caption_decoder=None, device=torch.device('cpu'))
    assert sampling.autoencoder.decode_chunk == 5


@pytest.mark.parametrize('chunk', [1, 2])
def test_chunked_encoders_equal_unchunked(comp, faces, chunk):
    prompts = ['i feel so happy today', 'that sounds really hard', 'hi', 'a dog', 'what happened to you?']
    pixels = torch.stack([comp.clip_img.preprocess(f)[0] for f in faces])
    from libs.autoencoder import center_crop_resize, to_tensor_m11
    images = torch.stack([to_tensor_m11(center_crop_resize(f, comp.resolution)) for f in faces])
    set_chunks(comp, None)
    calls = []
    hook = comp.autoencoder.vae.encoder.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    try:
        whole = (comp.autoencoder.encode_moments(images), comp.clip_img.embed(pixels), comp.clip_text.encode(prompts))
        z = 3 * whole[0][:, :4]
        decoded = comp.autoencoder.decode(z)
        set_chunks(comp, chunk)
        parts = (comp.autoencoder.encode_moments(images), comp.clip_img.embed(pixels), comp.clip_text.encode(prompts))
        decoded_parts = comp.autoencoder.decode(z)
    finally:
        hook.remove()
        set_chunks(comp, None)
    assert calls == [5] + [chunk] * (5 // chunk) + [5 % chunk] * (5 % chunk > 0)
    for a, b in zip((*whole, decoded), (*parts, decoded_parts)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_caption_search_equals_unchunked(comp):
    features = torch.randn(5, 16, 8, generator=torch.Generator().manual_seed(1))
    whole = comp.caption_decoder.generate_captions(features, max_length=8)
    assert comp.caption_decoder.generate_captions(features, max_length=8, chunk=2) == whole
    assert len(whole) == 5


def test_generate_runs_samples_in_chunks(comp, faces):
    """n samples in chunks of batch_samples: every U-ViT batch holds at most batch_samples x branches rows, and the
    first chunk is what a run of that many samples gives."""
    config = comp.config.copy_and_resolve_references()
    config.sample.batch_samples = 2
    chunked_comp = pipeline.Components(**{**comp.__dict__, 'config': config})
    rows = []
    hook = comp.nnet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        ctx = pipeline.make_context(chunked_comp, torch.Generator().manual_seed(0))
        out = pipeline.generate(chunked_comp, ctx, 'joint', 5)
    finally:
        hook.remove()
    assert len(out['images']) == len(out['texts']) == 5
    assert max(rows) <= 2 * 3 and min(rows) == 1 * 3  # joint: three branches per sample; the last chunk holds one
    first = pipeline.generate(comp, pipeline.make_context(comp, torch.Generator().manual_seed(0)), 'joint', 2)
    assert [im.tobytes() for im in first['images']] == [im.tobytes() for im in out['images'][:2]]
    assert first['texts'] == out['texts'][:2]


# ----------------------------------------------------------------------------------------------------------------
# Plans agree with what real tensors allocate
# ----------------------------------------------------------------------------------------------------------------

def measured(fn):
    """Most bytes real CPU tensors created by fn() hold at once."""
    with torch.no_grad(), memory.LivePeak() as live:
        fn()
    return live.peak


def test_encoder_plans_equal_measured_allocations(comp, tiny_models):
    config = tiny(tiny_models)
    images, z = torch.randn(3, 3, 32, 32), torch.randn(3, 4, 16, 16)
    set_chunks(comp, None)
    weights, planned = memory.vae(config, 3)
    assert weights == memory.param_bytes(comp.autoencoder)
    assert planned == measured(lambda: comp.autoencoder.encode_moments(images))
    assert memory.vae(config, 3, decode=True)[1] == measured(lambda: comp.autoencoder.decode(z))
    ids = torch.zeros(4, comp.clip_text.max_length, dtype=torch.long)
    weights, planned = memory.clip_text(config, 4)
    assert weights == memory.param_bytes(comp.clip_text.model)
    assert planned == measured(lambda: comp.clip_text.model(input_ids=ids))
    pixels = torch.randn(4, 3, 32, 32)
    assert memory.clip_img(config, 4) == (memory.param_bytes(comp.clip_img.model),
                                          measured(lambda: comp.clip_img.model(pixel_values=pixels)))


def test_caption_plan_bounds_the_measured_search(comp, tiny_models, monkeypatch):
    """The hand count of the beam search is an upper bound within a factor 2 of what the search allocates."""
    config = tiny(tiny_models)
    weights, planned = memory.caption_decoder(config, 4, max_length=24)
    assert weights == memory.param_bytes(comp.caption_decoder)
    # A decoder that never stops keeps every beam to the longest caption, as the plan assumes.
    monkeypatch.setattr(type(comp.caption_decoder), 'eos_token_id', property(lambda self: -1))
    prefix = comp.caption_decoder.decode_prefix(torch.randn(4, config.num_text_tokens, config.text_dim))
    used = measured(lambda: comp.caption_decoder.beam_search(prefix, 5, 24))
    assert used <= planned <= 2 * used


def test_sampling_plan_equals_a_measured_run(comp, tiny_models):
    """One fp32 solver step of mode empath, 3 samples: the fake trace counts exactly what the real run allocates."""
    config = tiny(tiny_models, condition=True)
    ctx = pipeline.make_context(comp, torch.Generator().manual_seed(0))
    ctx.steps, ctx.generator = 1, torch.Generator().manual_seed(0)
    z, clip, text = torch.randn(1, 4, 16, 16), torch.randn(1, 1, 16), torch.randn(1, 16, 8)
    used = measured(lambda: modes.get_mode('empath')(ctx, pipeline.mode_inputs(comp, ctx, 'empath', 3, z, clip, text)))
    weights, planned = memory.sampling(config, 'empath', 3, 'fp32')
    assert weights == memory.param_bytes(comp.nnet)
    assert planned == used


def test_plans_grow_with_the_batch(tiny_models):
    config = tiny(tiny_models, condition=True)
    assert memory.sampling(config, 'empath', 1)[1] < memory.sampling(config, 'empath', 4)[1]
    assert memory.evaluation(config, 1, 'fp32') < memory.evaluation(config, 4, 'fp32')


# ----------------------------------------------------------------------------------------------------------------
# Preflight
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture
def gpu_with(monkeypatch):
    """A fake CUDA device with the given free bytes (torch.cuda itself is never touched)."""
    def make(free):
        monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (free, 80 * memory.GiB))
        monkeypatch.setattr(torch.cuda, 'memory_allocated', lambda device=None: 0)
        monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)
        return torch.device('cuda')
    return make


def room_for(plan):
    """Free bytes whose budget is exactly ``plan`` bytes."""
    return int(plan * memory.ALLOCATOR_HEADROOM) + 1


def test_sampling_preflight_names_batch_samples_that_fits(gpu_with, tiny_models):
    config = tiny(tiny_models, condition=True)
    config.sample.batch_samples = 8
    config.sample.precision = 'fp32'  # 'auto' would pick bf16 on the fake bf16-capable card
    # Tiny networks: decoding 8 captions or images at once outweighs the solver; one at a time, the solver's batch
    # decides the peak, as it does at full size.
    config.encoders.update(caption_chunk=1, vae_decode_chunk=1)
    plan = lambda v: memory.sampling_stage(config, ('empath',), 8, 'fp32', chunk=v)  # noqa: E731
    room = (plan(1) + plan(8)) // 2
    device = gpu_with(room_for(room))
    with pytest.raises(UserError, match=r'set --config\.sample\.batch_samples=(\d+) \(') as err:
        memory.check_sampling(config, device, ('empath',), 8)
    assert '\n' not in str(err.value)
    fits = int(re.search(r'batch_samples=(\d+)', str(err.value))[1])
    assert plan(fits) <= room < plan(fits + 1)  # the largest value that fits
    assert memory.check_sampling(config, device, ('empath',), fits) == plan(fits)  # that many samples run


def test_preflight_plans_the_network_an_export_rebuilds(gpu_with, tiny_models, tmp_path):
    """A train_empath.py export rebuilds the network in its metadata, whatever config.nnet says, so the sampling and
    evaluation preflights plan that one: here a deeper network than config.nnet, which a room for config.nnet's plan
    cannot hold."""
    from libs.trainer import export_nnet
    from libs.uvit import build_nnet
    config = tiny(tiny_models, condition=True)
    config.sample.precision = 'fp32'
    deeper = config.copy_and_resolve_references()
    deeper.nnet.depth = config.nnet.depth + 4
    export = str(tmp_path / 'nnet_ema.safetensors')
    export_nnet(build_nnet(deeper.nnet).state_dict(), export, deeper, step=1)
    assert memory.planned_network(config, export).nnet.depth == deeper.nnet.depth
    assert memory.planned_network(config) is config  # config.nnet_path: official weights carry no config
    plan = memory.sampling_stage(config, ('empath',), 1, 'fp32', chunk=1)
    assert memory.sampling_stage(deeper, ('empath',), 1, 'fp32', chunk=1) > plan
    device = gpu_with(room_for(plan))
    assert memory.check_sampling(config, device, ('empath',), 1) == plan
    with pytest.raises(UserError, match='sampling'):
        memory.check_sampling(config, device, ('empath',), 1, nnet_path=export)
    device = gpu_with(room_for(memory.evaluation(config, 1, 'fp32')))
    assert memory.check_evaluation(config, device, 1) is not None
    with pytest.raises(UserError, match='evaluation'):
        memory.check_evaluation(config, device, 1, nnet_path=export)


def test_preflight_says_what_else_when_nothing_fits(gpu_with, tiny_models):
    config = tiny(tiny_models, condition=True)
    device = gpu_with(1000)
    with pytest.raises(UserError, match=r'even --batch_size=1 plans .* use --config\.sample\.precision=bf16'):
        memory.check_evaluation(config, device, 4)


def test_training_preflight_names_grad_accum(gpu_with, tiny_models):
    from avamerg_tiny import get_config
    config = get_config(tiny_models)
    config.train.batch_size, config.train.grad_accum = 8, 1
    device = gpu_with(room_for(memory.training_stage(config, 2, 'fp32')))
    with pytest.raises(UserError, match=r'set --config\.train\.grad_accum=4 '):
        memory.check_training(config, device)


def test_extraction_preflight_names_the_vae_chunk(gpu_with, tiny_models):
    from extract_tiny import get_config
    config = get_config(tiny_models)
    config.encoders.vae_encode_chunk = 16
    config.data.batch_size = 8
    plan = memory.extraction(memory._with(config, **{'encoders.vae_encode_chunk': 5}))
    with pytest.raises(UserError, match=r'set --config\.encoders\.vae_encode_chunk=5 '):
        memory.check_extraction(config, gpu_with(room_for(plan)))


def test_cpu_never_refuses_nor_plans(monkeypatch, tiny_models):
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: pytest.fail('asked a CPU for CUDA memory'))
    monkeypatch.setattr(memory, 'sampling_stage', lambda *a, **k: pytest.fail('planned on a CPU'))
    config = tiny(tiny_models, condition=True)
    assert memory.check_sampling(config, torch.device('cpu'), ('empath',), 8) is None
    assert memory.check_evaluation(config, 'cpu', 16) is None


def test_chunk_keys_are_in_every_config_and_checked(tiny_models):
    from libs import config_check
    config = tiny(tiny_models)
    assert config_check.problems(config, 'model', 'sample') == []
    config.encoders.vae_decode_chunk, config.sample.batch_samples = 0, -2
    assert config_check.problems(config, 'model', 'sample') == [
        'encoders.vae_decode_chunk=0 (must be an integer >= 1)', 'sample.batch_samples=-2 (must be an integer >= 1)']
