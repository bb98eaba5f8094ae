"""Feature extraction with the tiny components (scripts/make_tiny_models.py) on a small AvaMERG folder, on a CPU.

Run: ``python extract_features.py --config=configs/extract_tiny.py:<tiny models dir> --config.data.root=<AvaMERG>``.
The features land where configs/avamerg_tiny.py trains from (``<tiny models dir>/features/{train,val,test}``).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from avamerg_tiny import get_config as tiny_training_config  # noqa: E402


def get_config(root='models/tiny'):
    config = tiny_training_config(root)
    # Small shards and batches that do not divide them, so tests cover several shards and a batch cut at a shard end.
    config.data.update(root='data/avamerg_synthetic', speaker_text='last', shard_size=4, batch_size=3, num_workers=1)
    return config
