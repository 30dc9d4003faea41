"""What every benchmark shares: the run context, sizes, texts, synthetic exemplars, RSS.

Synthetic exemplars are built from the model's real support vectors, not drawn from a
Gaussian: each one is a convex mix of two random real exemplars (weight 0.6-1.0 on the
first) plus small noise, clipped at zero like the ReLU'd max-pool it imitates. They keep
the real vectors' scale, sparsity and cluster structure, which is what an HNSW graph and
an L2 threshold react to; isotropic noise would make every neighbour equally far.

Benchmarks never open a bundle in place: the embedded store admits one process at a
time, so each one works on its own ``shutil.copytree`` copy under the run's work dir.
A support set larger than the bundle's is built as ``model.build`` builds a bundle's
store (``rebuild_support_store``): created with the product's default index settings
(``EXEMPLAR_STORE__*`` defaults), filled, then ``optimize()`` builds its HNSW index.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from model.data import read_examples
from model.store.base import Exemplar, IndexSettings
from model.store.edge import EdgeStore

#: neighbours searched per event, as in the bundle (k of the admission rule)
K = 8
#: events per micro-batch, the daemon's default ``batch.max_size``
BATCH = 64


@dataclass(frozen=True)
class MatchingCase:
    """One support-set size to build and search (vectors of the model's dimension)."""

    n: int
    queries: int  # events searched per mode (multiple of BATCH)
    index: bool = True  # build the indexes (optimize) and compare them with the exact scan


@dataclass(frozen=True)
class Sizes:
    """How much work each figure does; ``full`` and ``smoke`` differ only here."""

    throughput_events: int  # events per path, over all rounds (test + calib texts cycled)
    throughput_rounds: int  # one fresh segment of the stream per round, every path on it
    variant_events: int  # events per round of the forward-pass variants
    variant_rounds: int
    latency_seconds: float
    latency_fractions: tuple[float, ...]
    pad_support_to: int  # support set of the throughput/latency daemon
    matching: tuple[MatchingCase, ...]
    memory_sizes: tuple[int, ...]
    peak_matmul: int  # side of the square matmul that measures the CPU's peak
    kafka_session_ms: int  # consumer-group session (a Tansu group join takes half of it)

    @classmethod
    def full(cls, skip_1m: bool = False, index_1m: bool = False) -> Sizes:
        matching = [
            MatchingCase(10_000, 1024),
            MatchingCase(30_000, 1024),
            MatchingCase(100_000, 1024),
            # HNSW over 1M x 1000 takes far longer than the whole run on 2 shared cores
            # (see matching.py): at 1M the exact scan is measured, HNSW extrapolated.
            MatchingCase(1_000_000, 128, index=index_1m),
        ]
        if skip_1m:
            matching = [c for c in matching if c.n < 1_000_000]
        return cls(
            throughput_events=6 * 320,
            throughput_rounds=6,
            variant_events=384,
            variant_rounds=3,
            latency_seconds=15.0,
            latency_fractions=(0.25, 0.5, 0.9),
            pad_support_to=10_000,
            matching=tuple(matching),
            memory_sizes=(10_000, 100_000),
            peak_matmul=2048,
            kafka_session_ms=6_000,
        )

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(
            throughput_events=128,
            throughput_rounds=1,
            variant_events=128,
            variant_rounds=1,
            latency_seconds=1.5,
            latency_fractions=(0.25, 0.5, 0.9),
            pad_support_to=400,
            matching=(
                MatchingCase(500, 64),
                MatchingCase(2000, 64),
                MatchingCase(5000, 64, index=False),
            ),
            memory_sizes=(2000,),
            peak_matmul=256,
            kafka_session_ms=1_500,
        )


@dataclass
class Context:
    """Inputs of one benchmark run and what figures share (reference forward passes)."""

    model_dir: Path
    data_dir: Path
    work_dir: Path
    sizes: Sizes
    smoke: bool
    say: Callable[[str], None] = print
    shared: dict[str, Any] = field(default_factory=dict)

    def copy_bundle(self, name: str) -> Path:
        """A private copy of the bundle (its store is exclusive to one process)."""
        target = self.work_dir / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(self.model_dir, target)
        return target

    def texts(self, split: str) -> list[str]:
        return [e.text for e in read_examples(self.data_dir / f"{split}.jsonl")]

    def stream_texts(self, n: int) -> list[str]:
        """The event stream of the throughput figures: test then calib texts, cycled."""
        pool = self.texts("test") + self.texts("calib")
        return [pool[i % len(pool)] for i in range(n)]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads (process-wide), then restore."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- processes and memory -------------------------------------------------------------


def rss_mb() -> float:
    """Resident set size of this process now (MiB)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Highest resident set size of this process image (MiB).

    ``VmHWM``, not ``getrusage``: Linux carries ``ru_maxrss`` across ``exec``, so a child
    started from a big parent would report the parent's peak.
    """
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_json_subprocess(args: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """Run ``python -m <args>`` and return the JSON object it prints last on stdout."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(args)} printed no JSON:\n{proc.stdout[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def machine_info() -> dict[str, Any]:
    """CPU model, cores, vector extensions, library versions."""
    import torch

    lscpu: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            lscpu[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(lscpu.get("Flags", "").split())
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu_model": lscpu.get("Model name", platform.processor() or "unknown"),
        "cpus": os.cpu_count(),
        "threads_per_core": lscpu.get("Thread(s) per core"),
        "hypervisor": lscpu.get("Hypervisor vendor"),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


# --- synthetic exemplars --------------------------------------------------------------


def synthetic_chunks(
    base: npt.NDArray[np.float32],
    n: int,
    seed: int,
    chunk: int = 4096,
) -> Iterator[tuple[npt.NDArray[np.float32], npt.NDArray[np.intp]]]:
    """``n`` synthetic vectors in chunks, with the index of the base row each leans on."""
    rng = np.random.default_rng(seed)
    spread = float(np.std(base)) * 0.05
    nonneg = bool((base >= 0).all())
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        first = rng.integers(0, len(base), m)
        second = rng.integers(0, len(base), m)
        w = rng.uniform(0.6, 1.0, (m, 1)).astype(np.float32)
        x: npt.NDArray[np.float32] = w * base[first] + (1 - w) * base[second]
        x += rng.normal(0.0, spread, x.shape).astype(np.float32)
        if nonneg:
            np.maximum(x, 0.0, out=x)
        yield x, first


@dataclass
class Support:
    """The bundle's real support set, read once from its store."""

    vectors: npt.NDArray[np.float32]
    labels: list[str]
    predicted: list[str]
    texts: list[str]


def read_support(store_path: Path) -> Support:
    with EdgeStore(store_path) as store:
        rows = list(store.iter_exemplars(with_vectors=True))
    return Support(
        vectors=np.stack([r.vector for r in rows]).astype(np.float32),
        labels=[r.label for r in rows],
        predicted=[r.predicted for r in rows],
        texts=[r.text or "" for r in rows],
    )


def fill_store(store: EdgeStore, support: Support, n: int, seed: int) -> float:
    """Upsert ``n`` synthetic exemplars (labels and text of the base row); seconds taken."""
    started = time.perf_counter()
    done = 0
    for vectors, origin in synthetic_chunks(support.vectors, n, seed):
        store.upsert(
            [
                Exemplar(
                    id=f"synthetic:{done + i}",
                    vector=vectors[i],
                    label=support.labels[j],
                    predicted=support.predicted[j],
                    source="train",
                    text=support.texts[j],
                )
                for i, j in enumerate(origin.tolist())
            ]
        )
        done += len(vectors)
    store.flush()
    return time.perf_counter() - started


def product_index() -> IndexSettings:
    """How the product indexes and searches a support set by default (EXEMPLAR_STORE__*)."""
    from daemon.stores import StoreConfig

    return StoreConfig().index_settings()


def rebuild_support_store(
    bundle_dir: Path, support: Support, target: int, seed: int = 11
) -> dict[str, Any]:
    """Replace a bundle copy's store by one of ``target`` exemplars built as ``model.build``
    builds a bundle's: the product's default index settings, the bundle's own exemplars,
    synthetic ones up to ``target``, then ``optimize()``."""
    old, new = bundle_dir / "store", bundle_dir / "store.rebuilt"
    source = EdgeStore(old)
    store = EdgeStore(new, dim=source.dim, index=product_index())
    try:
        chunk: list[Exemplar] = []
        for exemplar in source.iter_exemplars(with_vectors=True):
            chunk.append(exemplar)
            if len(chunk) == 1024:
                store.upsert(chunk)
                chunk = []
        store.upsert(chunk)
        source.close()
        added = max(0, target - store.count())
        fill_store(store, support, added, seed)
        started = time.perf_counter()
        store.optimize()
        info = {
            "exemplars": store.count(),
            "synthetic": added,
            "indexed_vectors": store.indexed_count,
            "index_build_s": time.perf_counter() - started,
        }
    finally:
        source.close()
        store.close()
    shutil.rmtree(old)
    new.rename(old)
    return info


# --- small statistics ------------------------------------------------------------------


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    if not values:
        return {f"p{int(q)}": float("nan") for q in qs}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{int(q)}": float(np.percentile(arr, q)) for q in qs}


def batches(items: Sequence[Any], size: int = BATCH) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


# --- who used the CPU ---------------------------------------------------------------------


def tree_cpu_seconds() -> float:
    """CPU seconds of this process, its live descendants and its reaped children."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
    me = os.getpid()
    mine = {me}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parent.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                changed = True
    reaped = os.times()
    return (
        sum(cpu.get(p, 0.0) for p in mine if p != me)
        + reaped.user
        + reaped.system
        + (reaped.children_user + reaped.children_system)
    )


def _machine_busy_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot."""
    with open("/proc/stat", encoding="ascii") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


class CpuWatch:
    """How many cores this benchmark and everything else on the machine used meanwhile."""

    def __init__(self) -> None:
        self.wall = time.monotonic()
        self.busy, self.steal = _machine_busy_seconds()
        self.ours = tree_cpu_seconds()

    def read(self) -> dict[str, float]:
        wall = time.monotonic() - self.wall
        busy, steal = _machine_busy_seconds()
        ours = tree_cpu_seconds() - self.ours
        others = max(0.0, busy - self.busy - ours)
        return {
            "wall_s": round(wall, 1),
            "our_cores": round(ours / wall, 2),
            "other_cores": round(others / wall, 2),
            "steal_cores": round((steal - self.steal) / wall, 2),
        }
