"""Compute side of figure 1: the CPU's peak, achieved FLOP/s, and forward-pass variants.

* **Peak**: the best of twelve square matmuls (``peak_matmul`` side) in fp32 and bf16, at
  torch's default thread count and at one thread.
* **Achieved**: FLOPs of the product forward pass (encoder + exemplar head) over its wall
  time, tokenization included. FLOPs are counted on the padded shapes actually computed:
  ``2 x (weights of the encoder's Linear layers) x B x T`` plus attention
  ``4 x B x T^2 x hidden`` per layer, and ``2 x L*H x M`` per token for the width-1 conv
  of the head; "useful" FLOPs count real tokens only.
* **Variants** of the network forward pass (tokenization included, word contributions
  not: those are the same Python work in every variant and figure 1 prices them). Each
  one runs the product's chunking (``Predictor.forward``: length-sorted chunks of
  ``forward_size`` within each 64-event micro-batch) unless its name says otherwise:
  chunk sizes (whole micro-batch, 32, 8), fixed padding to ``max_length`` instead of
  dynamic padding, one torch thread, bf16 autocast, bf16 weights (whole network, or the
  encoder only with the exemplar head in fp32), int8 dynamic quantization of the
  encoder's ``nn.Linear`` layers (``torch.ao.quantization.quantize_dynamic``).
  Timing is interleaved per micro-batch: in each round, for every micro-batch of the
  stream, every variant runs once, in an order rotated from batch to batch, so all
  variants see the same load. A variant's time on a micro-batch is its best over the
  rounds (other processes only ever add time); its speed-up is the median over
  micro-batches of (product time / its time on the same batch), reported with the
  interquartile range over micro-batches.
* **Cost in quality** against the fp32 product forward: label agreement, exemplar-vector
  relative L2 error ``|z_v - z| / |z|``, and, on the whole test split for the variants
  that change arithmetic, the admission decision with the bundle's thresholds against the
  bundle's real (fp32) support set: agreement of the decisions, of the admitted sets,
  their coverage and admitted accuracy.

Nothing here changes the product: variants are built on copies of the loaded network.
"""

from __future__ import annotations

import copy
import statistics
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
from model.admission import Thresholds, decide, softmax_margin
from model.data import read_examples
from model.network import ExemplarNetwork, tokenize
from model.predictor import Predictor
from model.store.base import ExemplarStore
from model.train import length_sorted_batches


@dataclass(frozen=True)
class Variant:
    name: str
    weights: str = "fp32"  # fp32 | bf16 | bf16_encoder | int8
    autocast: bool = False
    padding: str = "dynamic"  # dynamic | max_length
    chunk: int | None = None  # None: the product's forward_size
    threads: int | None = None  # None: torch's default

    @property
    def arithmetic(self) -> str:
        return self.weights + (" + bf16 autocast" if self.autocast else "")

    @property
    def numeric(self) -> bool:
        """Changes arithmetic: checked on the whole test split."""
        return self.arithmetic != "fp32"


def variants(forward_size: int) -> tuple[Variant, ...]:
    """The product first, then one change at a time (and one combination)."""
    return (
        Variant(f"fp32, chunks of {forward_size} (product)"),
        Variant(f"whole micro-batch of {BATCH}", chunk=BATCH),
        Variant("chunks of 32", chunk=32),
        Variant("chunks of 8", chunk=8),
        Variant("fixed padding to max_length", padding="max_length"),
        Variant("1 torch thread", threads=1),
        Variant("bf16 autocast", autocast=True),
        Variant("bf16 weights", weights="bf16"),
        Variant("bf16 encoder, fp32 head", weights="bf16_encoder"),
        Variant("bf16 encoder, fp32 head, 1 torch thread", weights="bf16_encoder", threads=1),
        Variant("int8 dynamic (encoder Linear)", weights="int8"),
    )


def build_network(base: ExemplarNetwork, weights: str) -> ExemplarNetwork:
    """The network in ``weights`` precision (a copy; ``fp32`` returns ``base`` itself)."""
    if weights == "fp32":
        return base
    net = copy.deepcopy(base).eval()
    if weights == "bf16":
        net.to(torch.bfloat16)
        return net
    if weights == "bf16_encoder":
        # the head casts the features back to fp32; nn.Module.to: transformers' override
        # of .to() is typed for devices only
        nn.Module.to(net.encoder, torch.bfloat16)
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
    shapes: list[tuple[int, int, int]]  # per forward call: batch, padded length, real tokens


@torch.inference_mode()
def run_variant(
    net: ExemplarNetwork, tokenizer: Any, texts: Sequence[str], v: Variant, forward_size: int
) -> Outputs:
    """Network outputs for ``texts`` (one or more 64-event micro-batches) in variant ``v``.

    Chunked as ``Predictor.forward`` chunks each micro-batch it is given.
    """
    n = len(texts)
    probs = np.zeros((n, len(net.config.labels)), np.float32)
    zs = np.zeros((n, net.config.num_filters), np.float32)
    shapes: list[tuple[int, int, int]] = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=v.autocast)
    with torch_threads(v.threads), autocast:
        for start in range(0, n, BATCH):
            micro = texts[start : start + BATCH]
            for chunk_idx in length_sorted_batches(micro, v.chunk or forward_size):
                idx = [start + i for i in chunk_idx]
                chunk = [texts[i] for i in idx]
                enc = tokenize(tokenizer, chunk, net.config.max_length, v.padding == "max_length")
                out = net(enc)
                probs[idx] = torch.softmax(out.logits.float(), dim=1).numpy()
                zs[idx] = out.exemplar.float().numpy()
                shapes.append(
                    (len(chunk), int(enc.input_ids.shape[1]), int(enc.attention_mask.sum()))
                )
    return Outputs(probs, zs, shapes)


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


def network_flops(net: ExemplarNetwork, shapes: Sequence[tuple[int, int, int]]) -> dict[str, float]:
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
        "head_flops_padded": 2.0 * head * padded,
        "flops_padded": 2.0 * (linear + head) * padded + attention,
        "flops_useful": 2.0 * (linear + head) * real + 4 * real * mean_real * hidden * layers,
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
    admitted: npt.NDArray[np.bool_], out_labels: Sequence[str], gold: Sequence[str | None]
) -> dict[str, float | None]:
    ok = np.array([a == g for a, g in zip(out_labels, gold, strict=True)])
    return {
        "coverage": float(admitted.mean()),
        "admitted_accuracy": float(ok[admitted].mean()) if admitted.any() else None,
    }


def time_variants(
    ctx: Context,
    nets: dict[str, ExemplarNetwork],
    tokenizer: Any,
    vs: tuple[Variant, ...],
    forward_size: int,
) -> tuple[dict[str, list[float]], dict[str, Outputs]]:
    """Seconds of every variant on every micro-batch (best over the rounds), and the
    round-0 outputs. Within a round the variants run interleaved, batch by batch, in an
    order rotated from batch to batch; the best of the rounds drops the bursts in which
    other processes took the cores (they only ever add time)."""
    if ctx.sizes.variant_events % BATCH:
        raise ValueError(f"variant_events must be a multiple of {BATCH}")
    stream = ctx.stream_texts(ctx.sizes.variant_events)
    micro = batches(stream, BATCH)
    for v in vs:  # warm-up: first-call allocations, oneDNN kernels for each shape family
        run_variant(nets[v.weights], tokenizer, micro[0], v, forward_size)
    best: dict[str, list[float]] = {v.name: [float("inf")] * len(micro) for v in vs}
    parts: dict[str, list[Outputs]] = {v.name: [] for v in vs}
    step = 0
    for round_ in range(ctx.sizes.variant_rounds):
        for b, batch in enumerate(micro):
            order = vs[step % len(vs) :] + vs[: step % len(vs)]
            step += 1
            for v in order:
                started = time.perf_counter()
                out = run_variant(nets[v.weights], tokenizer, batch, v, forward_size)
                best[v.name][b] = min(best[v.name][b], time.perf_counter() - started)
                if round_ == 0:
                    parts[v.name].append(out)
        ctx.say(f"  variants: round {round_ + 1}/{ctx.sizes.variant_rounds} done")
    first = {
        name: Outputs(
            np.concatenate([o.probs for o in outs]),
            np.concatenate([o.exemplars for o in outs]),
            [s for o in outs for s in o.shapes],
        )
        for name, outs in parts.items()
    }
    return best, first


def measure(
    ctx: Context,
    predictor: Predictor,
    support_store: ExemplarStore,
    thresholds: Thresholds,
) -> dict[str, Any]:
    """Peak, achieved FLOP/s and every variant; ``support_store``: the bundle's own set."""
    net, tok = predictor.network, predictor.tokenizer
    forward_size = predictor.batch_size
    labels = list(net.config.labels)
    default_threads = torch.get_num_threads()
    peak = {
        f"{dt}_{th}t_gflops": peak_matmul(ctx.sizes.peak_matmul, dtype, th)
        for dt, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        for th in (default_threads, 1)
    }
    ctx.say("forward: peak matmul " + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()))

    vs = variants(forward_size)
    base = vs[0]
    nets = {w: build_network(net, w) for w in sorted({v.weights for v in vs})}
    seconds, first = time_variants(ctx, nets, tok, vs, forward_size)
    speedups = {
        name: [t0 / t for t0, t in zip(seconds[base.name], times, strict=True)]
        for name, times in seconds.items()
    }
    ref = first[base.name]
    flops = network_flops(net, ref.shapes)
    # FLOPs per event x the product's median events/s
    base_eps = statistics.median(BATCH / t for t in seconds[base.name])
    achieved = flops["flops_padded"] * base_eps / ctx.sizes.variant_events / 1e9
    peak_fp32 = peak[f"fp32_{default_threads}t_gflops"]

    test = read_examples(ctx.data_dir / "test.jsonl")
    texts, gold = [e.text for e in test], [e.label for e in test]
    ctx.say(f"forward: quality of numeric variants on {len(texts)} test texts")
    ref_test = run_variant(net, tok, texts, base, forward_size)
    ctx.shared["test_fp32"] = ref_test
    ref_adm, _ = admission(ref_test.probs, ref_test.exemplars, support_store, thresholds, labels)
    gold_index = np.array([labels.index(g) if g in labels else -1 for g in gold])
    rows = []
    tested: dict[str, str] = {}  # arithmetic -> the variant checked on the test split
    for v in vs:
        row: dict[str, Any] = {
            "variant": v.name,
            "arithmetic": v.arithmetic,
            "eps": statistics.median(BATCH / t for t in seconds[v.name]),  # median batch
            "speedup": statistics.median(speedups[v.name]),
            "speedup_p25": float(np.percentile(speedups[v.name], 25)),
            "speedup_p75": float(np.percentile(speedups[v.name], 75)),
            "samples": len(speedups[v.name]),
            "subset": compare(ref, first[v.name]),
        }
        if v.numeric and v.arithmetic in tested:
            row["quality_from"] = tested[v.arithmetic]
        elif v is base or v.numeric:
            tested[v.arithmetic] = v.name
            out = (
                ref_test if v is base else run_variant(nets[v.weights], tok, texts, v, forward_size)
            )
            adm, out_labels = admission(out.probs, out.exemplars, support_store, thresholds, labels)
            both, either = int((adm & ref_adm).sum()), int((adm | ref_adm).sum())
            row["test"] = {
                **compare(ref_test, out),
                "admitted_decision_agreement": float((adm == ref_adm).mean()),
                "admitted_set_jaccard": both / either if either else 1.0,
                "accuracy": float((out.probs.argmax(1) == gold_index).mean()),
                **selective(adm, out_labels, gold),
            }
        rows.append(row)
    return {
        "peak_matmul_n": ctx.sizes.peak_matmul,
        "peak": peak,
        "torch_threads_default": default_threads,
        "forward_size": forward_size,
        "flops": flops,
        "gflops_achieved": achieved,
        "gflops_useful": flops["flops_useful"] * base_eps / ctx.sizes.variant_events / 1e9,
        "fraction_of_fp32_peak": achieved / peak_fp32,
        "mean_padded_length": flops["padded_tokens"] / ctx.sizes.variant_events,
        "mean_real_tokens": flops["real_tokens"] / ctx.sizes.variant_events,
        "variant_events": ctx.sizes.variant_events,
        "variant_rounds": ctx.sizes.variant_rounds,
        "test_rows": len(texts),
        "reference_admitted_on_test": float(ref_adm.mean()),
        "variants": rows,
        "recommended": recommend(rows),
        "recommended_lossless": recommend([r for r in rows if r["arithmetic"] == "fp32"]),
    }


def recommend(rows: Sequence[dict[str, Any]], min_agreement: float = 0.99) -> dict[str, Any]:
    """Fastest variant (median speed-up) that keeps fp32's decisions; ``rows[0]``: product.

    A variant whose arithmetic differs from fp32 must agree with fp32 on >= 99% of the
    test split's labels and admission decisions (a thread-count combination shares the
    check of its arithmetic); the others on >= 99% of the timing stream's labels with
    exemplar vectors within 0.1% (relative L2, p99). Only a speed-up whose interquartile
    range lies above 1 counts as faster; with none, the product stays.
    """
    by_name = {r["variant"]: r for r in rows}

    def keeps(r: dict[str, Any]) -> bool:
        checked = by_name.get(r.get("quality_from", r["variant"]), r)
        if "test" in checked and checked["arithmetic"] != rows[0]["arithmetic"]:
            t = checked["test"]
            return bool(
                t["admitted_decision_agreement"] >= min_agreement
                and t["label_agreement"] >= min_agreement
            )
        sub = r["subset"]
        return bool(sub["label_agreement"] >= min_agreement and sub["exemplar_rel_l2_p99"] < 1e-3)

    faster = [r for r in rows[1:] if keeps(r) and r["speedup_p25"] > 1.0]
    best = max(faster, key=lambda r: r["speedup"]) if faster else rows[0]
    return {
        "variant": best["variant"],
        "speedup": best["speedup"],
        "criterion": "fastest by median speed-up, interquartile range above 1, whose labels "
        f"and admission decisions agree with fp32 on >= {min_agreement:.0%} of rows",
    }
