"""Choose the network's defaults by measurement: a sweep over head hyper-parameters.

Encodes the data once with the frozen encoder (keeping the last ``--max-layers``
hidden layers), then for each configuration trains the head with early stopping
on a dev slice of TRAIN, builds the support set, calibrates on CALIB for alpha and
reports coverage / admitted accuracy on TEST next to the softmax baseline — the
same code paths as ``exemplar train`` (exact k-NN in numpy replaces the store; the
store's distances are exact L2 too).

Selection uses only calibration-split numbers (never TEST), so the sweep does not
tune to the test split; TEST columns are shown for the record.

    python benchmarks/sweep_head.py --data data/rotten-tomatoes --out benchmarks/sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from model.admission import CalibrationStats, calibrate, calibrate_softmax_threshold
from model.data import read_examples, stratified_split
from model.network import ExemplarNetwork, NetworkConfig, load_encoder
from model.store.base import Neighbor
from model.train import CachedFeatures, TrainOptions, encode_features, train_network


def slice_layers(cache: CachedFeatures, layers: int, hidden: int) -> CachedFeatures:
    return CachedFeatures([f[:, -layers * hidden :] for f in cache.features], cache.token_masks)


@torch.inference_mode()
def head_outputs(net: ExemplarNetwork, cache: CachedFeatures) -> tuple[np.ndarray, np.ndarray]:
    probs, zs = [], []
    for start in range(0, len(cache), 256):
        idx = list(range(start, min(start + 256, len(cache))))
        feats, mask = cache.batch(idx)
        out = net.head_forward(feats, mask)
        probs.append(torch.softmax(out.logits, 1).numpy())
        zs.append(out.exemplar.numpy())
    return np.concatenate(probs), np.concatenate(zs)


def knn(queries: np.ndarray, support: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    q = torch.from_numpy(queries)
    s = torch.from_numpy(support)
    d = torch.cdist(q, s)
    dist, idx = d.topk(k, dim=1, largest=False)
    return dist.numpy(), idx.numpy()


def neighbours(
    dist: np.ndarray, idx: np.ndarray, labels: list[str], preds: list[str]
) -> list[list[Neighbor]]:
    return [
        [
            Neighbor(
                id=str(j), distance=float(d), label=labels[j], predicted=preds[j], source="train"
            )
            for d, j in zip(drow, irow, strict=True)
        ]
        for drow, irow in zip(dist, idx, strict=True)
    ]


def selective(
    stats: CalibrationStats, t, probs: np.ndarray, gold: list[str], pred: list[str], soft_t: float
) -> dict[str, float]:
    adm = np.array(
        [
            t.tau[p] is not None and q >= t.q_min and d <= t.tau[p] and m >= t.margin[p]
            for p, q, d, m in zip(
                stats.predicted, stats.support, stats.distance, stats.margin, strict=True
            )
        ]
    )
    ok = np.array(pred) == np.array(gold)
    base = probs.max(1) >= soft_t
    return {
        "coverage": float(adm.mean()),
        "admitted_accuracy": float(ok[adm].mean()) if adm.any() else float("nan"),
        "softmax_coverage": float(base.mean()),
        "softmax_admitted_accuracy": float(ok[base].mean()) if base.any() else float("nan"),
        "accuracy": float(ok.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data/rotten-tomatoes")
    parser.add_argument("--out", default="benchmarks/sweep.json")
    parser.add_argument("--alpha", type=float, default=0.95)
    parser.add_argument("--ks", default="8,16,32,64", help="neighbour counts to compare")
    parser.add_argument("--max-layers", type=int, default=4)
    parser.add_argument("--grid", default="small", choices=["small", "full"])
    args = parser.parse_args()
    data = Path(args.data)
    train = read_examples(data / "train.jsonl", require_labels=True)
    calib = read_examples(data / "calib.jsonl", require_labels=True)
    test = read_examples(data / "test.jsonl", require_labels=True)
    labels = tuple(sorted({str(e.label) for e in train}))
    parts = stratified_split(train, {"fit": 0.9, "dev": 0.1}, seed=13)
    fit, dev = parts["fit"], parts["dev"]
    # fit + dev in the same order as exemplar train's support set
    support_rows = fit + dev

    encoder, tok = load_encoder(NetworkConfig(labels=labels).encoder)
    hidden = int(encoder.config.hidden_size)
    big = ExemplarNetwork(NetworkConfig(labels=labels, num_layers=args.max_layers), encoder)
    t0 = time.perf_counter()
    caches = {
        name: encode_features(big, tok, [e.text for e in rows], progress=True, description=name)
        for name, rows in (("fit", fit), ("dev", dev), ("calib", calib), ("test", test))
    }
    print(f"encoded in {time.perf_counter() - t0:.0f}s")
    index = {lab: i for i, lab in enumerate(labels)}
    if args.grid == "small":
        grid = list(itertools.product([2, 4], [1000], [0.1, 0.5], [1e-4], [1e-3]))
    else:
        grid = list(
            itertools.product([1, 2, 4], [256, 1000, 2000], [0.1, 0.5], [1e-4, 1e-2], [1e-3, 3e-4])
        )
    results = []
    for layers, filters, dropout, wd, lr in grid:
        cfg = NetworkConfig(labels=labels, num_layers=layers, num_filters=filters, dropout=dropout)
        torch.manual_seed(13)
        net = ExemplarNetwork(cfg, encoder)
        c = {k: slice_layers(v, layers, hidden) for k, v in caches.items()}
        t0 = time.perf_counter()
        res = train_network(
            net,
            tok,
            [e.text for e in fit],
            [index[str(e.label)] for e in fit],
            [e.text for e in dev],
            [index[str(e.label)] for e in dev],
            replace(TrainOptions(), learning_rate=lr, weight_decay=wd, progress=False),
            caches=(c["fit"], c["dev"]),
        )
        train_s = time.perf_counter() - t0
        support = CachedFeatures(
            c["fit"].features + c["dev"].features, c["fit"].token_masks + c["dev"].token_masks
        )
        s_probs, s_z = head_outputs(net, support)
        s_pred = [labels[i] for i in s_probs.argmax(1)]
        s_gold = [str(e.label) for e in support_rows]
        row: dict[str, object] = {
            "layers": layers,
            "filters": filters,
            "dropout": dropout,
            "weight_decay": wd,
            "lr": lr,
            "best_epoch": res.best_epoch,
            "dev_accuracy": res.best_dev_accuracy,
            "support_accuracy": float(np.mean(np.array(s_pred) == s_gold)),
            "train_s": round(train_s, 1),
        }
        ks = [int(k) for k in args.ks.split(",")]
        outputs = {}
        for name in ("calib", "test"):
            probs, z = head_outputs(net, c[name])
            dist, idx = knn(z, s_z, max(ks))
            outputs[name] = (probs, dist, idx)
        for k in ks:
            split_stats = {}
            for name, rows in (("calib", calib), ("test", test)):
                probs, dist, idx = outputs[name]
                pred = [labels[i] for i in probs.argmax(1)]
                top2 = np.sort(probs, 1)[:, -2:]
                stats = CalibrationStats.build(
                    pred,
                    [str(e.label) for e in rows],
                    top2[:, 1] - top2[:, 0],
                    neighbours(dist[:, :k], idx[:, :k], s_gold, s_pred),
                )
                split_stats[name] = (stats, probs, pred)
            cal_stats, cal_probs, cal_pred = split_stats["calib"]
            t = calibrate(cal_stats, labels, args.alpha, k, near_duplicate=0.0)
            ok = np.array(cal_pred) == np.array(cal_stats.gold)
            soft_t = calibrate_softmax_threshold(cal_probs.max(1), ok, args.alpha)
            for name in ("calib", "test"):
                stats, probs, pred = split_stats[name]
                for key, value in selective(stats, t, probs, stats.gold, pred, soft_t).items():
                    row[f"k{k}_{name}_{key}"] = round(value, 4)
            row[f"k{k}_q_min"] = t.q_min
        results.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
