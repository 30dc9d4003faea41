"""The human summary of a run (``RESULTS.md``) from its ``results.json`` data.

Machine, command, date and contention first, then the target table (rows from
``benchmarks.targets``), then one section per figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

SHARED_CORES = 0.25  # other processes using more than this many cores: say so


def _num(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _pct(v: Any, digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


# --- RESULTS.md ------------------------------------------------------------------------------


def markdown(r: dict[str, Any]) -> str:
    meta = r["meta"]
    mach = meta["machine"]
    out = [
        "# Benchmark results" + (" (SMOKE RUN: toy model, toy sizes)" if meta["smoke"] else ""),
        "",
        f"- command: `{meta['command']}`",
        f"- date (UTC): {meta['started_utc']}; total {meta.get('total_s', 0):.0f} s",
        f"- machine: {mach['cpu_model']}, {mach['cpus']} cores ({mach['hypervisor'] or 'bare'}"
        f" VM), {mach['memory_gib']} GiB; AVX-512 {mach['avx512f']}, avx512_bf16 "
        f"{mach['avx512_bf16']}, AMX {mach['amx_bf16']}, VNNI {mach['avx512_vnni']}",
        f"- software: Python {mach['python']}, torch {mach['torch']} "
        f"({mach['torch_threads']} threads by default)",
        f"- model: `{meta['model']}`, data: `{meta['data']}`",
        f"- load average at start {meta['load_average_start']}, at end "
        f"{meta.get('load_average_end')}",
    ]
    store = meta.get("daemon_store")
    if store:
        out.append(
            f"- the daemon's support set (figures 1, 2): {store['exemplars']:,} exemplars "
            f"({store['synthetic']:,} synthetic), {store['indexed_vectors']:,} of them in the "
            "product's default index"
        )
    out.append("")
    cpu = meta.get("cpu_by_figure", {})
    busy = {k: v for k, v in cpu.items() if v["other_cores"] > SHARED_CORES}
    if busy:
        out += [
            "**Shared machine.** Other processes used CPU during this run (cores, on "
            "average): "
            + ", ".join(f"{k} {v['other_cores']:.2f}" for k, v in busy.items())
            + ". Absolute numbers are therefore low and noisy. Comparisons come from "
            "interleaved runs on the same inputs and are given with their spread over "
            "rounds; a difference whose rounds disagree is reported as unresolved.",
            "",
        ]
    if cpu:
        out += _table(
            ["figure", "wall s", "cores used by this run", "cores used by others", "steal"],
            [
                [k, v["wall_s"], v["our_cores"], v["other_cores"], v["steal_cores"]]
                for k, v in cpu.items()
            ],
        )
    out += ["## Targets", ""]
    out += _table(
        ["target", "measured", "met", "short by", "what limits it"],
        [
            [
                t["target"],
                _num(t["measured"], 3),
                "yes" if t["met"] else "**no**",
                ""
                if t["met"]
                else f"{_num(t['shortfall'], 3)} ({_pct(t['shortfall_relative'], 0)})",
                t["limited_by"] if not t["met"] else "",
            ]
            for t in r.get("targets", [])
        ],
    )
    for name, fn in (
        ("throughput", _throughput),
        ("compute", _compute),
        ("latency", _latency),
        ("matching", _matching),
        ("quality", _quality),
        ("memory", _memory),
    ):
        if name in r:
            out += fn(r[name])
    out += [
        "How each figure is measured: the module docstrings in `benchmarks/` "
        "(throughput.py, forward.py, latency.py, matching.py, quality.py, memory.py).",
        "",
    ]
    return "\n".join(out)


def _ratio(r: dict[str, Any], digits: int = 2) -> str:
    return f"{r['median']:.{digits}f} (rounds {r['min']:.{digits}f}-{r['max']:.{digits}f})"


def _verdict(r: dict[str, Any], faster: str, slower: str, min_rounds: int = 3) -> str:
    """A difference is called only when every one of enough rounds agrees on its sign."""
    if len(r["rounds"]) < min_rounds:
        return f"not resolved ({len(r['rounds'])} round(s); at least {min_rounds} needed)"
    if r["min"] > 1:
        return faster + " in every round"
    if r["max"] < 1:
        return slower + " in every round"
    return "no consistent difference (the rounds disagree)"


def _throughput(tp: dict[str, Any]) -> list[str]:
    d, paths, ratios = tp["daemon"], tp["paths"], tp["ratios"]
    threads = tp["torch_threads_default"]
    names = {
        "bare": "bare forward, explain=True (the daemon's model work)",
        "bare_noexplain": "bare forward, explain=False",
        "daemon": "daemon (broker + PredictorWorker, as shipped)",
        "daemon_1thread": f"daemon, 1 torch thread (default {threads})",
        "daemon_bf16": "daemon, bf16 encoder + fp32 head (candidate)",
        "naive": "naive per-event loop",
    }
    out = [
        f"## 1. Throughput ({tp['rounds']} rounds x {tp['events_per_round']} events per path, "
        f"{tp['timed_events_per_round']} timed; micro-batches of {tp['batch_size']}, forward "
        f"in length-sorted chunks of {tp['forward_size']}; support set "
        f"{_num(tp.get('support_set'))})",
        "",
    ]
    rows = [
        [
            names[p],
            _num(v["eps"]),
            f"{_num(min(v['eps_runs']))}-{_num(max(v['eps_runs']))} ({len(v['eps_runs'])})",
            _ratio(v["vs_bare"]) if v["vs_bare"] else "1",
            _num(v["cpu_ms_per_event"], 2),
        ]
        for p, v in paths.items()
    ]
    out += _table(
        [
            "path",
            "events/s (median)",
            "range (runs)",
            "vs bare forward (median, range)",
            "CPU ms/event (median, incl. broker)",
        ],
        rows,
    )
    r1, bf = ratios["daemon_1thread_vs_daemon"], ratios["daemon_bf16_vs_daemon"]
    noexp = ratios["bare_noexplain_vs_bare"]
    out += [
        "Ratios are medians over rounds of per-round ratios, each path taken relative to "
        "the bare forward runs just before and after it (ranges: lowest and highest round).",
        "",
        f"- daemon / bare forward = **{_ratio(ratios['daemon_vs_bare'], 3)}**",
        f"- daemon / naive loop = **{_ratio(ratios['daemon_vs_naive'])}**",
        f"- word contributions: bare forward without / with them = {_ratio(noexp)}: "
        + _verdict(noexp, "explain=False faster", "explain=False slower"),
        f"- one torch thread instead of {threads}: daemon {_ratio(r1)}: "
        + _verdict(r1, "one thread faster", "one thread slower"),
        f"- bf16 encoder + fp32 head: daemon {_ratio(bf)}: "
        + _verdict(bf, "bf16 faster", "bf16 slower")
        + " (its accuracy cost: figure 1b)",
        f"- every event in exactly one output topic: {d['every_event_once']} (missing "
        f"{d['missing']}, duplicates {d['duplicates']}); {d['measured_batches']} timed batches"
        f" of {d['measured_events'] / max(1, d['measured_batches']):.1f} events",
        "",
        "Daemon time per event by stage over the timed events (ms, from its stage histogram,"
        " mean over rounds); 'batch' is the whole of one micro-batch (the stages plus "
        "building the output records and metrics), 'wall' adds the poll between batches:",
        "",
    ]
    stages = d["stage_ms_per_event"]
    out += _table(
        [*stages, "wall"],
        [[_num(v, 2) for v in stages.values()] + [_num(d["wall_ms_per_event"], 2)]],
    )
    steps = tp["naive"]["step_ms_per_event"]
    out += ["Naive loop time per event by step (ms, mean over rounds):", ""]
    out += _table(list(steps), [[_num(v, 2) for v in steps.values()]])
    return out


def _compute(c: dict[str, Any]) -> list[str]:
    peak = c["peak"]
    flops = c["flops"]
    out = [
        "## 1b. Compute: peak, achieved FLOP/s, forward-pass variants",
        "",
        f"Peak ({c['peak_matmul_n']}^2 matmul, GFLOP/s): "
        + ", ".join(f"{k.replace('_gflops', '')} {v:.0f}" for k, v in peak.items()),
        "",
        f"The product forward pass (fp32, chunks of {c['forward_size']}) achieved "
        f"**{c['gflops_achieved']:.1f} GFLOP/s** on padded shapes ({c['gflops_useful']:.1f} "
        f"on real tokens) = {_pct(c['fraction_of_fp32_peak'])} of the fp32 matmul peak at "
        f"{c['torch_threads_default']} threads, tokenization included; mean padded length "
        f"{c['mean_padded_length']:.1f} tokens for {c['mean_real_tokens']:.1f} real ones "
        f"({_num(flops['encoder_linear_params'] / 1e6, 1)}M encoder Linear weights; the "
        f"exemplar head is {_pct(flops['head_flops_padded'] / flops['flops_padded'], 0)} of "
        "the FLOPs).",
        "",
        f"Variants ({c['variant_rounds']} rounds x {c['variant_events']} events, interleaved "
        "per micro-batch; word contributions not included). Time on a micro-batch = best "
        "of the rounds; speed-up = median over micro-batches of product time / variant "
        "time on the same batch, with its interquartile range. Quality columns against "
        "the fp32 product forward; "
        f"'test' columns on the whole test split ({c['test_rows']} rows) with the bundle's "
        f"thresholds and support set (the product admits {_pct(c['reference_admitted_on_test'])}"
        "):",
        "",
    ]
    rows = []
    for v in c["variants"]:
        t = v.get("test")
        s = v["subset"]
        note = f"as '{v['quality_from']}'" if "quality_from" in v else "(timing stream)"
        q = t or s
        rows.append(
            [
                v["variant"],
                _num(v["eps"]),
                f"{v['speedup']:.2f}x ({v['speedup_p25']:.2f}-{v['speedup_p75']:.2f})",
                _pct(q["label_agreement"], 2),
                f"{q['exemplar_rel_l2_mean']:.1e} / {q['exemplar_rel_l2_p99']:.1e}",
                _pct(t["admitted_decision_agreement"], 2) if t else note,
                _num(t["admitted_set_jaccard"], 3) if t else "",
                _pct(t["coverage"]) if t else "",
                _pct(t["admitted_accuracy"]) if t else "",
            ]
        )
    out += _table(
        [
            "variant",
            "ev/s (median)",
            "speed-up (IQR)",
            "label agreement",
            "rel. L2 of z mean/p99",
            "admission agreement",
            "admitted-set Jaccard",
            "coverage",
            "admitted acc.",
        ],
        rows,
    )
    rec, lossless = c["recommended"], c["recommended_lossless"]
    out += [
        f"- Fastest that keeps fp32's decisions: **{rec['variant']}** "
        f"({rec['speedup']:.2f}x the product forward; {rec['criterion']}).",
        f"- Fastest with fp32 arithmetic: **{lossless['variant']}** ({lossless['speedup']:.2f}x).",
        "",
    ]
    return out


def _latency(lat: dict[str, Any]) -> list[str]:
    out = [
        f"## 2. Latency (produce -> output arrival; batch max {lat['batch_max_size']}, "
        f"max wait {lat['batch_max_wait_ms']} ms; max throughput {lat['max_eps']:.1f} ev/s)",
        "",
    ]
    out += _table(
        [
            "load",
            "target ev/s",
            "sent ev/s",
            "events",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "mean ms",
            "of which in the daemon (mean ms)",
            "mean batch",
        ],
        [
            [
                _pct(lv["fraction_of_max"], 0),
                _num(lv["target_eps"]),
                _num(lv["achieved_send_eps"]),
                f"{lv['received']}/{lv['sent']}",
                _num(lv["p50_ms"], 0),
                _num(lv["p95_ms"], 0),
                _num(lv["p99_ms"], 0),
                _num(lv["max_ms"], 0),
                _num(lv["mean_ms"], 0),
                _num(lv["daemon_mean_ms"], 0),
                _num(lv["mean_batch_size"]),
            ]
            for lv in lat["levels"]
        ],
    )
    return out


def _matching(m: dict[str, Any]) -> list[str]:
    ix = m["index"]
    out = [
        f"## 3. Matching cost vs support-set size (EdgeStore, {m['dim']} dims, k={m['k']}, "
        f"batches of {m['batch']}; model {_num(m['model_ms_per_event'], 2)} ms/event)",
        "",
        f"Product index (the default ``EXEMPLAR_STORE__*``): HNSW m={ix['hnsw_m']}, "
        f"ef_construct={ix['hnsw_ef_construct']}, search ef={ix['search_ef']}, quantization "
        f"{ix['quantization']} (candidates rescored with the float32 vectors, oversampling "
        f"{ix['oversampling']}). 'no quant.': the same HNSW without quantization. 'exact': "
        "a full scan, the ground truth of recall. Costs in ms per event and as a share of "
        "the model's per-event time.",
        "",
    ]

    def cost(c: dict[str, Any], mode: str) -> str:
        r = c["search"].get(mode)
        return f"{r['ms_per_event']:.2f} ({_pct(r.get('vs_model'))})" if r else "n/a"

    def field(c: dict[str, Any], mode: str, key: str, digits: int) -> str:  # n/a if absent
        return _num(c["search"].get(mode, {}).get(key), digits)

    out += _table(
        [
            "n",
            "insert s",
            "build s (product / no quant.)",
            "exact",
            "product",
            "recall@k",
            "no quant.",
            "recall@k",
            "RSS +MiB (inserted / indexed)",
            "disk MiB",
            "vectors MiB",
        ],
        [
            [
                f"{c['n']:,}",
                _num(c["insert_s"]),
                " / ".join(field(c, mode, "build_s", 1) for mode in ("product", "no_quantization")),
                cost(c, "exact"),
                cost(c, "product"),
                field(c, "product", "recall", 3),
                cost(c, "no_quantization"),
                field(c, "no_quantization", "recall", 3),
                f"{_num(c['rss_growth_insert_mb'], 0)} / {_num(c.get('rss_growth_indexed_mb'), 0)}",
                _num(c["disk_mb"], 0),
                _num(c["vector_mb"], 0),
            ]
            for c in m["cases"]
        ],
    )
    ext = m.get("extrapolated")
    if ext:
        out += [
            f"Product index at {ext['n']:,}, **extrapolated** ({ext['basis']}; HNSW search "
            "grows about logarithmically, so a power law fitted below over- rather than "
            f"under-estimates): {ext['product_ms_per_event']:.2f} ms/event = "
            f"{_pct(ext.get('product_vs_model'))} of the model; building it would take at "
            f"least {ext['build_s_linear_estimate'] / 60:.0f} min here (linear in n from the "
            "largest indexed size; HNSW builds grow faster than linearly).",
            "",
        ]
    return out


def _quality(q: dict[str, Any]) -> list[str]:
    out = [
        f"## 4. Quality ({q['test_rows']} test rows, calibration {q['calibration_rows']} "
        f"rows, support {q['support_set']:,}, k={q['k']}, Wilson confidence "
        f"{q['confidence']})",
        "",
        f"Model accuracy {_pct(q['model_accuracy'])}, k-NN accuracy "
        f"{_pct(q['knn_accuracy'])}. Coverage / admitted accuracy on test:",
        "",
    ]
    methods = ("exemplar", "softmax", "trust_score", "knn")
    rows = []
    for alpha, row in q["test"].items():
        rows.append(
            [alpha]
            + [
                f"{_pct(row[m]['coverage'])} / {_pct(row[m].get('admitted_accuracy'))}"
                for m in methods
            ]
        )
    rows.append(["AURC (lower is better)"] + [_num(q["aurc"][m], 4) for m in methods])
    out += _table(["alpha", *methods], rows)
    out += [
        "Admission rate on unlabelled shifted / out-of-distribution text (lower is better):",
        "",
    ]
    rows = []
    for name, by_alpha in q["admission_rate"].items():
        for alpha, rates in by_alpha.items():
            rows.append(
                [f"{name} ({q['unlabelled_rows'][name]})", alpha]
                + [_pct(rates[m]) for m in methods]
            )
    out += _table(["set", "alpha", *methods], rows)
    rep = q["calibration_reproduced"]
    ix = q["index_vs_exact"]
    out += [
        f"Through the product's default index (the support set rebuilt as a bundle now ships "
        f"it, {_num(ix['indexed_vectors'])} vectors indexed) instead of an exact scan, at the "
        f"bundle's thresholds: admission decisions agree on {_pct(ix['admission_agreement'])}"
        f" of test rows; coverage / admitted accuracy {_pct(ix['index']['coverage'])} / "
        f"{_pct(ix['index'].get('admitted_accuracy'))} (index) vs "
        f"{_pct(ix['exact']['coverage'])} / {_pct(ix['exact'].get('admitted_accuracy'))} "
        "(exact).",
        "",
        f"Calibration statistics reproduced from this run's outputs: same prediction "
        f"{_pct(rep['same_prediction'])}, same support count "
        f"{_pct(rep['same_support_count'])}, max nearest-distance difference "
        f"{_num(rep['max_distance_diff'], 4)}.",
        "",
    ]
    return out


def _memory(mem: dict[str, Any]) -> list[str]:
    out = ["## 5. Memory (predictor process RSS, MiB)", ""]
    out += _table(
        [
            "support set",
            "after imports",
            "+ model",
            "+ store open",
            "after predicting",
            "peak",
            "store on disk",
            "indexed vectors",
        ],
        [
            [
                f"{s['support_set']:,}",
                _num(s["rss_after_imports_mb"], 0),
                _num(s["model_mb"], 0),
                _num(s["store_open_mb"], 0),
                _num(s["rss_after_predict_mb"], 0),
                _num(s["rss_peak_mb"], 0),
                _num(s["store_disk_mb"], 0),
                _num(s.get("indexed_vectors")),
            ]
            for s in mem["sizes"]
        ],
    )
    return out
