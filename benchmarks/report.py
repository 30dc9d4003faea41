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
        "",
    ]
    cpu = meta.get("cpu_by_figure", {})
    busy = {k: v for k, v in cpu.items() if v["other_cores"] > SHARED_CORES}
    if busy:
        out += [
            "**Shared machine.** Other processes used CPU during this run (cores, on "
            "average): "
            + ", ".join(f"{k} {v['other_cores']:.2f}" for k, v in busy.items())
            + ". Absolute numbers are therefore low and noisy; comparisons were measured "
            "side by side in one run (interleaved where it matters) and are the figures "
            "to trust.",
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


def _throughput(tp: dict[str, Any]) -> list[str]:
    d = tp["daemon"]
    paths = tp["paths"]
    names = {
        "daemon": "daemon (broker + PredictorWorker, words on)",
        "bare": "bare forward, explain=True (the daemon's model work)",
        "daemon_noexplain": "daemon, explain=False",
        "bare_noexplain": "bare forward, explain=False",
        "daemon_1thread": f"daemon, 1 torch thread (default {tp['torch_threads_default']})",
        "bare_1thread": "bare forward, explain=True, 1 torch thread",
    }
    out = [
        f"## 1. Throughput ({tp['rounds']} rounds x {tp['events_per_round']} events per path,"
        f" batches of {tp['batch_size']}, support set {_num(tp.get('support_set'))})",
        "",
    ]
    rows = [
        [
            names[p],
            _num(v["eps"]),
            " / ".join(_num(x) for x in v["eps_rounds"]),
            _num(1000 / v["eps"], 2),
            _num(v["cpu_ms_per_event"], 2),
        ]
        for p, v in paths.items()
    ]
    rows.append(
        [
            "Predictor.predict (forward + search + admission)",
            _num(tp["bare_predict_eps"]),
            "",
            _num(1000 / tp["bare_predict_eps"], 2),
            "",
        ]
    )
    for key, label in (("naive_eps", ""), ("naive_1thread_eps", ", 1 torch thread")):
        rows.append(
            [
                f"naive per-event loop ({tp['naive_events']} events{label})",
                _num(tp[key]),
                "",
                _num(1000 / tp[key], 2),
                "",
            ]
        )
    out += _table(
        ["path", "events/s (median)", "per round", "wall ms/event", "CPU ms/event (incl. broker)"],
        rows,
    )
    out += [
        f"- daemon / bare forward = **{tp['daemon_vs_bare']:.3f}** (median of per-round "
        f"ratios), daemon / naive = **{tp['daemon_vs_naive']:.1f}**; by CPU time per "
        f"event (broker included) the daemon needs {1 / tp['daemon_vs_bare_cpu']:.2f}x "
        "what the bare forward needs",
        f"- word contributions (explain=True) cost {_pct(tp['explain_cost_bare'])} of bare "
        f"forward throughput and {_pct(tp['explain_cost_daemon'])} of daemon throughput",
        f"- one torch thread instead of {tp['torch_threads_default']}: "
        f"{tp['one_thread_vs_default_daemon']:.2f}x the daemon's throughput; with one thread "
        f"daemon / bare = {tp['daemon_vs_bare_1thread']:.3f}, daemon / naive = "
        f"{tp['daemon_vs_naive_1thread']:.1f}",
        f"- every event in exactly one output topic: {d['every_event_once']} (missing "
        f"{d['missing']}, duplicates {d['duplicates']}); {d['batches']} batches",
        "",
        "Daemon time per event by stage (ms, from its stage histogram, mean over rounds):",
        "",
    ]
    stages = d["stage_ms_per_event"]
    out += _table(
        [*stages, "wall"],
        [[_num(v, 2) for v in stages.values()] + [_num(d["wall_ms_per_event"], 2)]],
    )
    return out


def _compute(c: dict[str, Any]) -> list[str]:
    peak = c["peak"]
    out = [
        "## 1b. Compute: peak, achieved FLOP/s, forward-pass variants",
        "",
        f"Peak ({c['peak_matmul_n']}^2 matmul, GFLOP/s): "
        + ", ".join(f"{k.replace('_gflops', '')} {v:.0f}" for k, v in peak.items()),
        "",
        f"Encoder achieved **{c['encoder_gflops_achieved']:.1f} GFLOP/s** on padded shapes "
        f"({c['encoder_gflops_useful']:.1f} useful) = "
        f"{_pct(c['encoder_fraction_of_fp32_peak'])} of the fp32 peak at "
        f"{c['torch_threads_default']} threads; mean padded length "
        f"{c['mean_padded_length']:.1f} tokens for {c['mean_real_tokens']:.1f} real ones "
        f"({_num(c['flops']['encoder_linear_params'] / 1e6, 1)}M Linear weights; head "
        f"{_pct(c['flops']['head_flops_padded'] / c['flops']['encoder_flops_padded'], 0)} "
        "of encoder FLOPs).",
        "",
        f"Variants ({c['variant_events']} events per timing pass, best round). Quality "
        "columns against the fp32 product forward; 'test' columns on the whole test split "
        "with the bundle's thresholds and support set (reference admits "
        f"{_pct(c['reference_admitted_on_test'])}):",
        "",
    ]
    rows = []
    for v in c["variants"]:
        t = v.get("test")
        s = v["subset"]
        note = f"as '{v['quality_from']}'" if "quality_from" in v else "(timing subset)"
        rows.append(
            [
                v["variant"],
                _num(v["eps"]),
                f"{v['speedup']:.2f}x",
                _pct((t or s)["label_agreement"], 2),
                f"{(t or s)['exemplar_rel_l2_mean']:.1e} / {(t or s)['exemplar_rel_l2_p99']:.1e}",
                _pct(t["admitted_decision_agreement"], 2) if t else note,
                _num(t["admitted_set_jaccard"], 3) if t else "",
                _pct(t["coverage"]) if t else "",
                _pct(t["admitted_accuracy"]) if t else "",
            ]
        )
    out += _table(
        [
            "variant",
            "ev/s",
            "speed-up",
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
        f"- Fastest with unchanged arithmetic: **{lossless['variant']}** "
        f"({lossless['speedup']:.2f}x).",
    ]
    check = c.get("recommended_daemon")
    if check:
        out.append(
            f"- Through the daemon (same events as figure 1): {check['daemon_eps']:.1f} "
            f"ev/s with '{check['variant']}', {_num(check['vs_product_daemon'], 2)}x the "
            f"product daemon; every event once: {check['every_event_once']}."
        )
    return [*out, ""]


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
                _num(lv["mean_batch_size"]),
            ]
            for lv in lat["levels"]
        ],
    )
    return out


def _matching(m: dict[str, Any]) -> list[str]:
    out = [
        f"## 3. Matching cost vs support-set size (EdgeStore, k={m['k']}, batches of "
        f"{m['batch']}; model {_num(m['model_ms_per_event'], 2)} ms/event)",
        "",
    ]
    out += _table(
        [
            "n",
            "dim",
            "insert s",
            "HNSW build s",
            "exact ms/ev",
            "exact / model",
            "HNSW ms/ev",
            "HNSW / model",
            "recall@k",
            "RSS +MiB (plain / indexed)",
            "disk MiB",
            "vectors MiB",
        ],
        [
            [
                f"{c['n']:,}",
                c["dim"],
                _num(c["insert_s"]),
                _num(c["build_s"]),
                _num(c["exact_ms_per_event"], 2),
                _pct(c.get("exact_vs_model")),
                _num(c["hnsw_ms_per_event"], 2),
                _pct(c.get("hnsw_vs_model")),
                _num(c["recall_at_k"], 3),
                f"{_num(c['rss_growth_insert_mb'], 0)} / {_num(c['rss_growth_indexed_mb'], 0)}",
                _num(c["disk_mb"], 0),
                _num(c["vector_mb"], 0),
            ]
            for c in m["cases"]
        ],
    )
    ext = m.get("hnsw_extrapolated")
    if ext:
        out += [
            f"HNSW at {ext['n']:,} x {ext['dim']}, extrapolated ({ext['basis']}): "
            f"{ext['hnsw_ms_per_event']:.2f} ms/event = {_pct(ext.get('hnsw_vs_model'))} of "
            f"the model; building it: about {ext['build_s_linear_estimate'] / 60:.0f} min "
            "at the measured rate (linear estimate, a lower bound).",
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
    out += [
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
            ]
            for s in mem["sizes"]
        ],
    )
    return out
