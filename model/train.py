"""Training: fit the exemplar head (and optionally the encoder) with early stopping.

With a frozen encoder (the default) the encoder runs once per text: its token
features are cached, and every epoch only runs the cheap CNN + linear head on
the cache. Fine-tuning the encoder disables the cache and trains end to end,
with a smaller learning rate for the encoder.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from model.network import ExemplarNetwork, tokenize

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TrainOptions:
    """Knobs of one training run. Defaults were chosen by measurement (docs/model.md)."""

    max_epochs: int = 40
    patience: int = 4
    batch_size: int = 32
    learning_rate: float = 1e-3
    encoder_learning_rate: float = 2e-5
    weight_decay: float = 1e-4
    seed: int = 13
    encode_batch_size: int = 64
    progress: bool = True


@dataclass
class TrainResult:
    """What came out of training, for the bundle's metrics."""

    epochs_run: int
    best_epoch: int
    best_dev_loss: float
    best_dev_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Same seed, same data, same machine -> same weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class CachedFeatures:
    """Encoder features per text, unpadded, stored in bfloat16 to halve memory."""

    features: list[torch.Tensor]  # each [T_i, F]
    token_masks: list[torch.Tensor]  # each [T_i] bool

    def __len__(self) -> int:
        return len(self.features)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad the chosen texts to their longest: features [B, T, F], mask [B, T]."""
        longest = max(self.features[i].shape[0] for i in indices)
        dim = self.features[indices[0]].shape[1]
        feats = torch.zeros(len(indices), longest, dim, dtype=torch.float32)
        mask = torch.zeros(len(indices), longest, dtype=torch.bool)
        for row, i in enumerate(indices):
            n = self.features[i].shape[0]
            feats[row, :n] = self.features[i].float()
            mask[row, :n] = self.token_masks[i]
        return feats, mask


def length_sorted_batches(texts: Sequence[str], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped so each batch holds texts of similar length (less padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.inference_mode()
def encode_features(
    network: ExemplarNetwork,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 64,
    progress: bool = False,
    description: str = "encoding",
) -> CachedFeatures:
    """Run the encoder once over ``texts`` and keep each text's token features."""
    network.eval()
    features: list[torch.Tensor | None] = [None] * len(texts)
    masks: list[torch.Tensor | None] = [None] * len(texts)
    batches = list(length_sorted_batches(texts, batch_size))
    for idx in tqdm(batches, desc=description, disable=not progress, unit="batch"):
        enc = tokenize(tokenizer, [texts[i] for i in idx], network.config.max_length)
        feats = network.token_features(enc.input_ids, enc.attention_mask)
        lengths = enc.attention_mask.sum(dim=1)
        for row, i in enumerate(idx):
            n = int(lengths[row])
            features[i] = feats[row, :n].to(torch.bfloat16).clone()
            masks[i] = enc.token_mask[row, :n].clone()
    return CachedFeatures(
        features=[f for f in features if f is not None],
        token_masks=[m for m in masks if m is not None],
    )


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def train_network(
    network: ExemplarNetwork,
    tokenizer: PreTrainedTokenizerBase,
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    dev_texts: Sequence[str],
    dev_labels: Sequence[int],
    options: TrainOptions,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    caches: tuple[CachedFeatures, CachedFeatures] | None = None,
) -> TrainResult:
    """Fit ``network`` in place; keeps the weights of the epoch with the lowest dev loss.

    ``caches`` (train, dev) skips encoding when the caller already holds the
    frozen encoder's features.
    """
    seed_everything(options.seed)
    fine_tune = network.config.fine_tune_encoder
    network.set_encoder_trainable(fine_tune)
    if caches is not None and not fine_tune:
        train_cache, dev_cache = caches
    elif not fine_tune:
        train_cache = encode_features(
            network,
            tokenizer,
            train_texts,
            options.encode_batch_size,
            options.progress,
            "encoding train",
        )
        dev_cache = encode_features(
            network,
            tokenizer,
            dev_texts,
            options.encode_batch_size,
            options.progress,
            "encoding dev",
        )
    head_params = [*network.conv.parameters(), *network.head.parameters()]
    groups: list[dict[str, object]] = [{"params": head_params, "lr": options.learning_rate}]
    if fine_tune:
        groups.append(
            {"params": list(network.encoder.parameters()), "lr": options.encoder_learning_rate}
        )
    optimizer = torch.optim.AdamW(groups, weight_decay=options.weight_decay)
    y_train = torch.tensor(list(train_labels), dtype=torch.long)
    y_dev = torch.tensor(list(dev_labels), dtype=torch.long)
    generator = torch.Generator().manual_seed(options.seed)

    def logits_for(
        indices: list[int], texts: Sequence[str], cache: CachedFeatures | None
    ) -> torch.Tensor:
        if cache is not None:
            feats, mask = cache.batch(indices)
            return network.head_forward(feats, mask).logits
        enc = tokenize(tokenizer, [texts[i] for i in indices], network.config.max_length)
        return network(enc).logits

    def trainable_state() -> dict[str, torch.Tensor]:
        # A frozen encoder never changes: keep only what training touches.
        return {
            k: v.detach().clone()
            for k, v in network.state_dict().items()
            if fine_tune or not k.startswith("encoder.")
        }

    best_state = trainable_state()
    best = {"loss": float("inf"), "accuracy": 0.0, "epoch": 0}
    history: list[dict[str, float]] = []
    stale = 0
    epoch = 0
    for epoch in range(1, options.max_epochs + 1):
        network.train()
        if not fine_tune:
            network.encoder.eval()  # frozen: no dropout inside the encoder either
        total = 0.0
        batches = _epoch_batches(len(train_texts), options.batch_size, generator)
        bar = tqdm(
            batches, desc=f"epoch {epoch}", disable=not options.progress, unit="batch", leave=False
        )
        for idx in bar:
            logits = logits_for(idx, train_texts, None if fine_tune else train_cache)
            loss = F.cross_entropy(logits, y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        network.eval()
        dev_loss, dev_correct = 0.0, 0
        with torch.inference_mode():
            for idx in length_sorted_batches(dev_texts, options.encode_batch_size):
                logits = logits_for(idx, dev_texts, None if fine_tune else dev_cache)
                dev_loss += float(F.cross_entropy(logits, y_dev[idx], reduction="sum"))
                dev_correct += int((logits.argmax(dim=1) == y_dev[idx]).sum())
        row = {
            "epoch": float(epoch),
            "train_loss": total / max(len(train_texts), 1),
            "dev_loss": dev_loss / max(len(dev_texts), 1),
            "dev_accuracy": dev_correct / max(len(dev_texts), 1),
        }
        history.append(row)
        log.info("epoch", **row)
        if on_epoch is not None:
            on_epoch(row)
        if row["dev_loss"] < best["loss"] - 1e-4:
            best = {"loss": row["dev_loss"], "accuracy": row["dev_accuracy"], "epoch": epoch}
            best_state = trainable_state()
            stale = 0
        else:
            stale += 1
            if stale >= options.patience:
                break
    network.load_state_dict(best_state, strict=fine_tune)
    network.eval()
    return TrainResult(
        epochs_run=epoch,
        best_epoch=int(best["epoch"]),
        best_dev_loss=float(best["loss"]),
        best_dev_accuracy=float(best["accuracy"]),
        history=history,
    )


@torch.inference_mode()
def cached_outputs(
    network: ExemplarNetwork, cache: CachedFeatures, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities [n, K] and exemplar vectors [n, M] from cached features."""
    network.eval()
    probs, vectors = [], []
    for start in range(0, len(cache), batch_size):
        idx = list(range(start, min(start + batch_size, len(cache))))
        feats, mask = cache.batch(idx)
        out = network.head_forward(feats, mask)
        probs.append(torch.softmax(out.logits.float(), dim=1).numpy())
        vectors.append(out.exemplar.float().numpy())
    if not probs:
        return (
            np.zeros((0, len(network.config.labels)), np.float32),
            np.zeros((0, network.config.num_filters), np.float32),
        )
    return np.concatenate(probs), np.concatenate(vectors)
