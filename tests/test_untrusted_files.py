"""Files that are not what they claim: refused pickles are named in one line (with the installed torch's wording,
produced here by real refused files), a CLIP folder holding a pickled callable is one error, and a safetensors file
with an impossible header length is called damaged, not text."""
import os
import pickle

import pytest
import torch

from libs import io
from libs.errors import UserError


class Payload:
    """Unpickling this would run a command: torch.load(weights_only=True) must refuse it."""

    def __reduce__(self):
        return os.system, ('echo unpickled',)


class Options:
    """A training script's arguments pickled beside its weights."""


def refusal(obj, path, pickler=torch.save) -> Exception:
    """The error the installed torch raises when asked to load ``obj`` with weights_only=True."""
    if pickler is torch.save:
        torch.save(obj, path)
    else:
        with open(path, 'wb') as f:
            pickle.dump(obj, f, protocol=2)
    with pytest.raises(Exception) as info:
        torch.load(path, weights_only=True)
    return info.value


@pytest.mark.parametrize('obj,pickler,name', [
    ({'w': torch.zeros(2), 'x': Payload()}, torch.save, f'{os.name}.system'),   # 'unsupported GLOBAL ... blocked'
    ({'w': torch.zeros(2), 'args': Options()}, torch.save, f'{__name__}.Options'),   # 'Unsupported global: GLOBAL'
    (print, pickle.dump, 'print'),                                                     # a bare pickled callable
])
def test_refused_pickle_names_the_blocked_object(obj, pickler, name, tmp_path):
    err = refusal(obj, tmp_path / 'weights.pt', pickler)
    assert io.REFUSED_PICKLE in str(err)   # what torch says today, long and in several paragraphs
    assert io.load_error(err) == f'it holds a pickled Python object ({name}), which is never unpickled: only ' \
                                 'tensors are read'
    with pytest.raises(UserError) as info:
        io.read_state_dict(str(tmp_path / 'weights.pt'), what='U-ViT checkpoint')
    message = str(info.value)
    assert message == f'cannot read U-ViT checkpoint {tmp_path / "weights.pt"}: {io.load_error(err)}.'
    assert '\n' not in message


def test_clip_folder_with_a_pickled_callable_is_one_line(tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from libs.clip_encoders import IMAGE_HUB_ID, _load_model, build_tiny_clip_vision
    folder = build_tiny_clip_vision(str(tmp_path / 'clip_img'))
    os.remove(os.path.join(folder, 'model.safetensors'))
    torch.save({'vision_model.embeddings.patch_embedding.weight': Payload()},
               os.path.join(folder, 'pytorch_model.bin'))
    with pytest.raises(UserError) as info:
        _load_model(CLIPVisionModelWithProjection, folder, True, IMAGE_HUB_ID, 'clip_img')
    message = str(info.value)
    assert message.startswith(f'cannot load CLIPVisionModelWithProjection from {folder!r}: it holds a pickled '
                              f'Python object ({os.name}.system), which is never unpickled')
    assert 'To fix:' in message and 'Weights only load failed' not in message and '\n' not in message


def test_huge_safetensors_header_length_is_damaged_not_text(tmp_path):
    path = tmp_path / 'nnet.safetensors'
    path.write_bytes((2 ** 40).to_bytes(8, 'little') + b'{"w": {"dtype": "F32"')
    assert io.weights_format(str(path)) is None
    assert io.not_weights(str(path)) == (f'it starts like a safetensors file, but its header claims {2 ** 40} bytes '
                                         f'and the file has {path.stat().st_size}: it is cut short or damaged')
    path.write_text('just some notes\n')
    assert 'text file' in io.not_weights(str(path))


def test_img_that_is_not_a_file_says_what_it_is(tmp_path):
    import sample_multi
    loop, dangling = tmp_path / 'loop.png', tmp_path / 'dangling.png'
    os.symlink(loop, loop)
    os.symlink(tmp_path / 'gone.png', dangling)
    cases = {str(tmp_path): 'it is a folder, not an image file',
             str(loop): 'it is a symbolic link that leads back to itself (a loop)',
             str(dangling): f'it is a symbolic link to {tmp_path / "gone.png"}, which does not exist',
             str(tmp_path / 'absent.png'): 'no such file'}
    for path, words in cases.items():
        with pytest.raises(UserError) as info:
            sample_multi.load_image(path)
        assert str(info.value).startswith(f'--img {path}: {words}')
