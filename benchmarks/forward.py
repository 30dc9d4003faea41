"""Compute side of figure 1: the CPU's peak, the encoder's achieved FLOP/s, and speed-ups.

* **Peak**: the best of three square matmuls (``peak_matmul`` side) in fp32 and bf16, at
  torch's default thread count and at one thread.
* **Achieved**: encoder FLOPs of the baseline timing pass divided by its wall time
  (tokenization and head included). FLOPs are counted on the padded shapes actually
  computed: ``2 x (weights of the encoder's Linear layers) x B x T`` plus attention
  ``4 x B x T^2 x hidden`` per layer; the exemplar head (width-1 conv, ``2 x L*H x M`` per
  token) is reported separately. "Useful" FLOPs count real tokens only.
* **Variants** of the forward pass, each timed on the same event stream in micro-batches of
  64 (``variant_rounds`` rounds, variants interleaved, best round kept; the machine is
  shared, so interleaving keeps drift out of the comparison):
  fixed padding to ``max_length`` vs dynamic padding (the product), length bucketing
  inside a batch (length-sorted sub-batches of 16, what ``Predictor(batch_size=16)`` does),
  one torch thread instead of two, bf16 autocast, bf16 weights (whole network, or encoder
  only with the head in fp32), int8 dynamic quantisation of the encoder's ``nn.Linear``
  layers (``torch.ao.quantization.quantize_dynamic``), and combinations.
* **Cost in quality** of each variant against the fp32 product forward: label agreement,
  exemplar-vector relative L2 error ``|z_v - z| / |z|``, and - on the whole test split for
  the variants that change arithmetic - the admission decision with the bundle's
  thresholds against the bundle's real support set (agreement of the admitted sets, their
  coverage and admitted accuracy).

Nothing here changes the product: variants are built on copies of the loaded network.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from benchmarks.common import BATCH, Context, batches, torch_threads
from benchmarks.throughput import run_daemon
from model.admission import Thresholds, decide, softmax_margin
from model.network import Encoded, ExemplarNetwork, tokenize
from model.predictor import Predictor
from model.store.base import ExemplarStore


@dataclass(frozen=True)
class Variant:
    name: str
    weights: str = "fp32"  # fp32 | bf16 | bf16_encoder | int8
    autocast: bool = False
    padding: str = "dynamic"  # dynamic | max_length
    sub_batch: int = BATCH
    threads: int | None = None  # None: torch's default
    numeric: bool = False  # changes arithmetic: checked on the whole test split

    @property
    def arithmetic(self) -> tuple[str, bool]:
        return self.weights, self.autocast


BASELINE = Variant("fp32 (product)")
VARIANTS = (
    BASELINE,
    Variant("fixed padding to max_length", padding="max_length"),
    Variant("length buckets of 16", sub_batch=16),
    Variant("1 torch thread", threads=1),
    Variant("1 torch thread + buckets of 16", threads=1, sub_batch=16),
    Variant("bf16 autocast", autocast=True, numeric=True),
    Variant("bf16 weights", weights="bf16", numeric=True),
    Variant("bf16 encoder, fp32 head", weights="bf16_encoder", numeric=True),
    Variant("int8 dynamic (encoder Linear)", weights="int8", numeric=True),
    # same arithmetic as their single-change rows (whose test-split check they share)
    Variant("bf16 weights + 1 torch thread", weights="bf16", threads=1),
    Variant("bf16 weights + 1 thread + buckets of 16", weights="bf16", threads=1, sub_batch=16),
)


def tokenize_fixed(tokenizer: Any, texts: list[str], max_length: int) -> Encoded:
    """``model.network.tokenize`` but padded to ``max_length`` (what dynamic padding avoids)."""
    enc = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    attention = enc["attention_mask"].bool()
    token_mask = attention & ~enc["special_tokens_mask"].bool()
    return Encoded(
        enc["input_ids"],
        enc["attention_mask"],
        token_mask,
        enc["offset_mapping"],
        [enc.word_ids(i) for i in range(len(texts))],
    )


def build_network(base: ExemplarNetwork, weights: str) -> ExemplarNetwork:
    if weights == "fp32":
        return base
    net = copy.deepcopy(base).eval()
    if weights == "bf16":
        return net.to(torch.bfloat16)
    if weights == "bf16_encoder":
        net.encoder.to(torch.bfloat16)
        return net
    if weights == "int8":
        with warnings.catch_warnings():
            # torch.ao.quantization is deprecated in favour of torchao (not installed here)
            warnings.simplefilter("ignore")
            net.encoder = torch.ao.quantization.quantize_dynamic(
                net.encoder, {nn.Linear}, dtype=torch.qint8
            )
        return net
    raise ValueError(weights)


@dataclass
class Outputs:
    probs: npt.NDArray[np.float32]
    exemplars: npt.NDArray[np.float32]
    seconds: float
    shapes: list[tuple[int, int, int]]  # per forward call: batch, padded length, real tokens


@torch.inference_mode()
def run_variant(net: ExemplarNetwork, tokenizer: Any, texts: Sequence[str], v: Variant) -> Outputs:
    """The forward pass as the daemon runs it (64-event batches), in variant ``v``."""
    n = len(texts)
    probs = np.zeros((n, len(net.config.labels)), np.float32)
    zs = np.zeros((n, net.config.num_filters), np.float32)
    shapes: list[tuple[int, int, int]] = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=v.autocast)
    with torch_threads(v.threads), autocast:
        started = time.perf_counter()
        for start in range(0, n, BATCH):
            idx = list(range(start, min(n, start + BATCH)))
            if v.sub_batch < len(idx):
                idx.sort(key=lambda i: len(texts[i]))
            for sub in batches(idx, v.sub_batch):
                chunk = [texts[i] for i in sub]
                if v.padding == "max_length":
                    enc = tokenize_fixed(tokenizer, chunk, net.config.max_length)
                else:
                    enc = tokenize(tokenizer, chunk, net.config.max_length)
                out = net(enc)
                probs[sub] = torch.softmax(out.logits.float(), dim=1).numpy()
                zs[sub] = out.exemplar.float().numpy()
                shapes.append(
                    (len(chunk), int(enc.input_ids.shape[1]), int(enc.attention_mask.sum()))
                )
        seconds = time.perf_counter() - started
    return Outputs(probs, zs, seconds, shapes)


# --- FLOPs ------------------------------------------------------------------------------


def peak_matmul(n: int, dtype: torch.dtype, num_threads: int | None, reps: int = 12) -> float:
    """GFLOP/s of the best of ``reps`` n x n matmuls (the best catches a moment when the
    cores were ours on a shared machine)."""
    with torch_threads(num_threads):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def encoder_flops(net: ExemplarNetwork, shapes: Sequence[tuple[int, int, int]]) -> dict[str, float]:
    enc = net.encoder
    linear = sum(
        m.weight.numel()
        for name, m in enc.named_modules()
        if isinstance(m, nn.Linear) and "pooler" not in name
    )
    hidden = int(enc.config.hidden_size)
    layers = int(enc.config.num_hidden_layers)
    head = net.feature_dim * net.config.num_filters
    padded = sum(b * t for b, t, _ in shapes)
    real = sum(r for _, _, r in shapes)
    attention = sum(4 * b * t * t * hidden * layers for b, t, _ in shapes)
    # useful attention: real tokens attend to the real tokens of their own row (approx.)
    mean_real = real / max(1, sum(b for b, _, _ in shapes))
    return {
        "encoder_linear_params": float(linear),
        "encoder_flops_padded": 2.0 * linear * padded + attention,
        "encoder_flops_useful": 2.0 * linear * real + 4 * real * mean_real * hidden * layers,
        "head_flops_padded": 2.0 * head * padded,
        "padded_tokens": float(padded),
        "real_tokens": float(real),
    }


# --- quality cost of a variant -----------------------------------------------------------


def admission(
    probs: npt.NDArray[np.float32],
    zs: npt.NDArray[np.float32],
    store: ExemplarStore,
    t: Thresholds,
    labels: Sequence[str],
) -> tuple[npt.NDArray[np.bool_], list[str]]:
    """Admitted flags and output labels of the bundle's rule for these network outputs."""
    neighbors = []
    for start in range(0, len(zs), 256):
        neighbors.extend(store.search(zs[start : start + 256], t.k))
    margins = softmax_margin(probs)
    pred = probs.argmax(axis=1)
    verdicts = [
        decide(labels[int(p)], float(m), nb, t)
        for p, m, nb in zip(pred, margins, neighbors, strict=True)
    ]
    return np.array([v.admitted for v in verdicts]), [v.label for v in verdicts]


def compare(ref: Outputs, out: Outputs) -> dict[str, float]:
    err = np.linalg.norm(out.exemplars - ref.exemplars, axis=1) / np.maximum(
        np.linalg.norm(ref.exemplars, axis=1), 1e-12
    )
    return {
        "label_agreement": float((out.probs.argmax(1) == ref.probs.argmax(1)).mean()),
        "exemplar_rel_l2_mean": float(err.mean()),
        "exemplar_rel_l2_p99": float(np.percentile(err, 99)),
        "exemplar_rel_l2_max": float(err.max()),
        "max_prob_abs_diff_max": float(np.abs(out.probs.max(1) - ref.probs.max(1)).max()),
    }


def selective(
    admitted: npt.NDArray[np.bool_], out_labels: Sequence[str], gold: Sequence[str]
) -> dict[str, float | None]:
    ok = np.array([a == g for a, g in zip(out_labels, gold, strict=True)])
    return {
        "coverage": float(admitted.mean()),
        "admitted_accuracy": float(ok[admitted].mean()) if admitted.any() else None,
    }


def measure(
    ctx: Context,
    predictor: Predictor,
    support_store: ExemplarStore,
    thresholds: Thresholds,
    bootstrap: str | None = None,
) -> dict[str, Any]:
    """Peak, achieved FLOP/s and every variant; ``support_store``: the bundle's own set.

    With ``bootstrap`` the recommended variant also runs through the daemon.
    """
    net, tok = predictor.network, predictor.tokenizer
    labels = list(net.config.labels)
    default_threads = torch.get_num_threads()
    peak = {
        f"{dt}_{th}t_gflops": peak_matmul(ctx.sizes.peak_matmul, dtype, th)
        for dt, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        for th in (default_threads, 1)
    }
    ctx.say("forward: peak matmul " + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()))

    nets = {w: build_network(net, w) for w in sorted({v.weights for v in VARIANTS})}
    stream = ctx.stream_texts(ctx.sizes.variant_events)
    timings: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    first: dict[str, Outputs] = {}
    for round_ in range(ctx.sizes.variant_rounds):
        for v in VARIANTS:
            run_variant(nets[v.weights], tok, stream[:8], v)  # warm-up
            out = run_variant(nets[v.weights], tok, stream, v)
            timings[v.name].append(len(stream) / out.seconds)
            first.setdefault(v.name, out)
        ctx.say(
            f"  round {round_ + 1}: "
            + ", ".join(f"{name} {eps[-1]:.0f}" for name, eps in timings.items())
        )

    ref = first[BASELINE.name]
    flops = encoder_flops(net, ref.shapes)
    base_eps = max(timings[BASELINE.name])
    base_seconds = len(stream) / base_eps
    achieved = flops["encoder_flops_padded"] / base_seconds / 1e9
    peak_fp32 = peak[f"fp32_{default_threads}t_gflops"]

    test = ctx.texts("test")
    gold = [e or "" for e in _labels(ctx, "test")]
    ctx.say(f"forward: quality of numeric variants on {len(test)} test texts")
    ref_test = run_variant(net, tok, test, BASELINE)
    ctx.shared["test_fp32"] = ref_test
    ref_adm, _ref_out = admission(
        ref_test.probs, ref_test.exemplars, support_store, thresholds, labels
    )
    rows = []
    tested: dict[tuple[str, bool], str] = {}
    for v in VARIANTS:
        eps = timings[v.name]
        row: dict[str, Any] = {
            "variant": v.name,
            "eps": max(eps),
            "eps_rounds": eps,
            "speedup": max(eps) / base_eps,
            "lossless": v.arithmetic == BASELINE.arithmetic,
            "subset": compare(ref, first[v.name]),
        }
        if v.numeric or v is BASELINE:
            out = ref_test if v is BASELINE else run_variant(nets[v.weights], tok, test, v)
            adm, out_labels = admission(out.probs, out.exemplars, support_store, thresholds, labels)
            both = int((adm & ref_adm).sum())
            either = int((adm | ref_adm).sum())
            row["test"] = {
                **compare(ref_test, out),
                "admitted_decision_agreement": float((adm == ref_adm).mean()),
                "admitted_set_jaccard": both / either if either else 1.0,
                "accuracy": float(
                    (
                        out.probs.argmax(1)
                        == np.array([labels.index(g) if g in labels else -1 for g in gold])
                    ).mean()
                ),
                **selective(adm, out_labels, gold),
            }
            tested.setdefault(v.arithmetic, v.name)
        elif v.arithmetic != BASELINE.arithmetic and v.arithmetic in tested:
            row["quality_from"] = tested[v.arithmetic]
        rows.append(row)
    best = recommend(rows)
    lossless = recommend([r for r in rows if r["lossless"]])
    result: dict[str, Any] = {
        "peak_matmul_n": ctx.sizes.peak_matmul,
        "peak": peak,
        "torch_threads_default": default_threads,
        "flops": flops,
        "encoder_gflops_achieved": achieved,
        "encoder_gflops_useful": flops["encoder_flops_useful"] / base_seconds / 1e9,
        "encoder_fraction_of_fp32_peak": achieved / peak_fp32,
        "mean_padded_length": flops["padded_tokens"] / len(stream),
        "mean_real_tokens": flops["real_tokens"] / len(stream),
        "variant_events": len(stream),
        "reference_admitted_on_test": float(ref_adm.mean()),
        "variants": rows,
        "recommended": best,
        "recommended_lossless": lossless,
    }
    if bootstrap is not None:
        chosen = next(v for v in VARIANTS if v.name == best["variant"])
        result["recommended_daemon"] = daemon_check(ctx, predictor, nets, chosen, bootstrap)
    return result


def daemon_check(
    ctx: Context, predictor: Predictor, nets: dict[str, ExemplarNetwork], v: Variant, bootstrap: str
) -> dict[str, Any] | None:
    """The daemon on figure 1's events with variant ``v``'s network, batching and threads."""
    if v is BASELINE or v.autocast or v.padding != "dynamic":
        return None  # autocast is thread-local: it would not reach the worker thread
    serving = Predictor(
        nets[v.weights],
        predictor.tokenizer,
        predictor.store,
        predictor.thresholds,
        predictor.version,
        batch_size=v.sub_batch,
    )
    texts = ctx.stream_texts(ctx.sizes.events)
    ctx.say(f"forward: daemon with '{v.name}' on {len(texts)} events")
    with torch_threads(v.threads):
        run = run_daemon(
            serving,
            bootstrap,
            texts,
            "variant",
            60.0 + 2.0 * len(texts),
            ctx.sizes.kafka_session_ms,
        )
    product = ctx.shared.get("daemon_eps")
    ctx.say(
        f"  {run['eps']:.1f} ev/s"
        + (f" ({run['eps'] / product:.2f}x the product daemon)" if product else "")
    )
    return {
        "variant": v.name,
        "daemon_eps": run["eps"],
        "vs_product_daemon": run["eps"] / product if product else None,
        "every_event_once": run["every_event_once"],
    }


def _labels(ctx: Context, split: str) -> list[str | None]:
    from model.data import read_examples

    return [e.label for e in read_examples(ctx.data_dir / f"{split}.jsonl")]


def recommend(rows: Sequence[dict[str, Any]], min_agreement: float = 0.99) -> dict[str, Any]:
    """Fastest variant that keeps fp32's decisions.

    Variants that change arithmetic must agree with fp32 on >= 99% of test-split labels
    and admission decisions; the others (padding, bucketing, threads) on >= 99% of the
    timing subset's labels with exemplar vectors within 0.1% (relative L2, p99).
    """

    by_name = {r["variant"]: r for r in rows}

    def keeps(r: dict[str, Any]) -> bool:
        if "test" in r:
            t = r["test"]
            return bool(
                t["admitted_decision_agreement"] >= min_agreement
                and t["label_agreement"] >= min_agreement
            )
        sub = r["subset"]
        if "quality_from" in r:  # same arithmetic as a row checked on the test split
            return keeps(by_name[r["quality_from"]]) and sub["label_agreement"] >= min_agreement
        return bool(sub["label_agreement"] >= min_agreement and sub["exemplar_rel_l2_p99"] < 1e-3)

    safe = [r for r in rows if keeps(r)]
    best = max(safe, key=lambda r: r["eps"]) if safe else rows[0]
    return {
        "variant": best["variant"],
        "speedup": best["speedup"],
        "criterion": f"fastest whose labels and admission decisions agree with fp32 on "
        f">= {min_agreement:.0%} of rows",
    }
