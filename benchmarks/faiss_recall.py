"""FAISS retrieval: recall@K against exact search and queries/s, per factory string and size.

  python -m benchmarks.faiss_recall [--sizes 100000 1000000] [--k 100] [--dim 64]

Vectors: clustered synthetic embeddings, L2-normalised like KARMA's and the two-tower's
(inner product = cosine). Ground truth: exact top-K by a NumPy matmul. QPS: one batch of
queries through `ItemIndex.search` (all threads), build time reported separately.
Prints a table and writes JSON (benchmarks/out/faiss_recall.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from serving.index import IndexParams, ItemIndex, exact_top_k, recall_at_k

FACTORIES = [("Flat", {}), ("IVF1024,Flat", {"nprobe": 32}), ("IVF1024,PQ32", {"nprobe": 32}),
             ("HNSW32", {"ef_search": 128})]


def vectors(n: int, dim: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_truth(q: np.ndarray, items: np.ndarray, k: int, chunk: int = 250) -> np.ndarray:
    return np.concatenate([exact_top_k(q[i:i + chunk], items, k) for i in range(0, len(q), chunk)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--factories", nargs="+", default=[f for f, _ in FACTORIES])
    p.add_argument("--out", default="benchmarks/out/faiss_recall.json")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(2000, a.dim)).astype(np.float32)
    rows = []
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, GPUs: {faiss.get_num_gpus()}", flush=True)
    print(f"{'items':>9} {'factory':<14} {'build s':>8} {'recall@' + str(a.k):>10} {'QPS':>9} {'vs Flat':>8}")
    for n in a.sizes:
        items = vectors(n, a.dim, rng, centers)
        q = vectors(a.queries, a.dim, rng, centers)
        t0 = time.perf_counter()
        truth = exact_truth(q, items, a.k)
        numpy_s = time.perf_counter() - t0
        flat_qps = None
        for name, kw in FACTORIES:
            if name not in a.factories:
                continue
            t0 = time.perf_counter()
            idx = ItemIndex(a.dim, IndexParams(name, **kw)).build(np.arange(n), items)
            build = time.perf_counter() - t0
            idx.search(q[:10], a.k)  # warm-up
            t0 = time.perf_counter()
            _, got = idx.search(q, a.k)
            qps = len(q) / (time.perf_counter() - t0)
            flat_qps = qps if name == "Flat" else flat_qps
            rec = recall_at_k(got, truth)
            rows.append({"items": n, "factory": name, **kw, "build_s": build, f"recall@{a.k}": rec, "qps": qps})
            ratio = f"{qps / flat_qps:.1f}x" if flat_qps else "–"
            print(f"{n:>9,} {name:<14} {build:>8.1f} {rec:>10.4f} {qps:>9,.0f} {ratio:>8}", flush=True)
        rows.append({"items": n, "factory": "numpy exact (ground truth)", "qps": len(q) / numpy_s})
        print(f"{n:>9,} {'numpy exact':<14} {'':>8} {1.0:>10.4f} {len(q) / numpy_s:>9,.0f}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
