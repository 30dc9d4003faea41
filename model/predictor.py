"""Batched prediction with exemplar constraints: forward, one store search, admission.

This is the unit of work the CLI and the streaming daemon share: a list of
texts in, for each a :class:`Prediction` with the output label, whether it is
admitted and why, the nearest training exemplars and the word contributions.
Stage timings are returned with every batch so the daemon can export them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

from model.admission import Thresholds, Verdict, decide
from model.network import ExemplarNetwork, WordScore, tokenize, word_contributions
from model.store.base import ExemplarStore, Neighbor
from model.train import length_sorted_batches


@dataclass(frozen=True)
class Prediction:
    """Everything known about one text after the admission rule."""

    label: str  # output label (a human mapping may replace the model's)
    predicted_label: str  # the network's own argmax
    scores: dict[str, float]  # softmax probability per label
    margin: float
    verdict: Verdict
    nearest: list[Neighbor]
    words: list[WordScore]

    @property
    def admitted(self) -> bool:
        return self.verdict.admitted


@dataclass
class Forward:
    """Network outputs for a batch, in input order."""

    probs: npt.NDArray[np.float32]  # [n, K]
    exemplars: npt.NDArray[np.float32]  # [n, M]
    words: list[list[WordScore]]


@dataclass
class BatchResult:
    predictions: list[Prediction]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


class Predictor:
    """Wraps a trained network, its support set and calibrated thresholds."""

    def __init__(
        self,
        network: ExemplarNetwork,
        tokenizer: object,
        store: ExemplarStore,
        thresholds: Thresholds,
        version: str,
        batch_size: int = 64,
    ) -> None:
        self.network = network.eval()
        self.tokenizer = tokenizer
        self.store = store
        self.thresholds = thresholds
        self.version = version
        self.batch_size = batch_size
        self.labels = list(network.config.labels)

    @torch.inference_mode()
    def forward(self, texts: Sequence[str], explain: bool = True) -> Forward:
        """Network forward in length-sorted sub-batches; results back in input order."""
        n = len(texts)
        probs = np.zeros((n, len(self.labels)), dtype=np.float32)
        exemplars = np.zeros((n, self.network.config.num_filters), dtype=np.float32)
        words: list[list[WordScore]] = [[] for _ in range(n)]
        for idx in length_sorted_batches(texts, self.batch_size):
            batch = [texts[i] for i in idx]
            enc = tokenize(self.tokenizer, batch, self.network.config.max_length)  # type: ignore[arg-type]
            out = self.network(enc)
            p = torch.softmax(out.logits.float(), dim=1)
            probs[idx] = p.numpy()
            exemplars[idx] = out.exemplar.float().numpy()
            if explain:
                contrib = self.network.token_contributions(out, enc.input_ids.shape[1])
                labels = p.argmax(dim=1)
                for row, i in enumerate(idx):
                    words[i] = word_contributions(
                        batch[row],
                        contrib[row].float(),
                        enc.word_ids[row],
                        enc.offsets[row],
                        int(labels[row]),
                    )
        return Forward(probs=probs, exemplars=exemplars, words=words)

    def predict(self, texts: Sequence[str], explain: bool = True) -> BatchResult:
        """Forward, one batched k-NN search, then the admission rule per text."""
        if not texts:
            return BatchResult([], {"forward": 0.0, "search": 0.0, "admission": 0.0})
        t0 = time.perf_counter()
        fwd = self.forward(texts, explain=explain)
        t1 = time.perf_counter()
        neighbors = self.store.search(fwd.exemplars, self.thresholds.k)
        t2 = time.perf_counter()
        top2 = np.sort(fwd.probs, axis=1)[:, -2:]
        margins = top2[:, 1] - top2[:, 0]
        predicted = fwd.probs.argmax(axis=1)
        out = []
        for i in range(len(texts)):
            label = self.labels[int(predicted[i])]
            verdict = decide(label, float(margins[i]), neighbors[i], self.thresholds)
            out.append(
                Prediction(
                    label=verdict.label,
                    predicted_label=label,
                    scores={
                        lab: float(p) for lab, p in zip(self.labels, fwd.probs[i], strict=True)
                    },
                    margin=float(margins[i]),
                    verdict=verdict,
                    nearest=neighbors[i],
                    words=fwd.words[i],
                )
            )
        t3 = time.perf_counter()
        return BatchResult(out, {"forward": t1 - t0, "search": t2 - t1, "admission": t3 - t2})
