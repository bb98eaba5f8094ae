"""Read the middle frame of an utterance clip and write short clips, with PyAV (FFmpeg)."""
import os

import av
import numpy as np
from PIL import Image

# Tried in order when writing; libx264 gives the files real AvaMERG clips resemble, mpeg4 ships with every FFmpeg.
ENCODERS = ('libx264', 'mpeg4')
MPEG4_BIT_RATE = 20_000_000


class VideoError(Exception):
    """A clip that is missing, has no video stream, or cannot be decoded."""


def middle_frame(mp4_path):
    """Decode every frame of the first video stream and return frame n // 2 as an RGB image."""
    if not os.path.isfile(mp4_path):
        raise VideoError(f'{mp4_path}: no such video file')
    # Container frame counts are often missing or wrong (edit lists, variable frame rate), so count by decoding.
    try:
        with av.open(mp4_path) as container:
            if not container.streams.video:
                raise VideoError(f'{mp4_path}: the file has no video stream')
            frames = list(container.decode(container.streams.video[0]))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f'{mp4_path}: cannot decode video ({exc})') from exc
    if not frames:
        raise VideoError(f'{mp4_path}: the video stream holds no frames')
    return frames[len(frames) // 2].to_image().convert('RGB')


def pick_encoder():
    """Return the first encoder in ENCODERS that this FFmpeg build provides."""
    for name in ENCODERS:
        try:
            av.codec.Codec(name, 'w')
            return name
        except (av.FFmpegError, ValueError):
            continue
    raise RuntimeError(f'PyAV has none of the video encoders {ENCODERS}; install a PyAV wheel built with one')


def write_clip(path, frames, fps):
    """Encode equally sized RGB frames (PIL images or uint8 HxWx3 arrays) as an mp4 at the given frame rate."""
    arrays = [np.asarray(f.convert('RGB') if isinstance(f, Image.Image) else f, dtype=np.uint8) for f in frames]
    height, width = arrays[0].shape[:2]
    with av.open(path, mode='w', format='mp4') as container:
        stream = container.add_stream(pick_encoder(), rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
        # High quality keeps the decoded middle frame close to the drawn one (mpeg4 ignores crf, so it gets a
        # generous bit rate); one thread keeps the bytes identical from run to run.
        if stream.codec_context.name == 'libx264':
            stream.options = {'crf': '12'}
        else:
            stream.bit_rate = MPEG4_BIT_RATE
        stream.thread_count = 1
        for array in arrays:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format='rgb24')))
        container.mux(stream.encode())
