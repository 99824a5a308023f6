"""One prepared GPU check of iALS and mf_softmax training and of scoring (issue 15).

    KERAS_BACKEND=jax python3 benchmarks/gpu_check.py [--out DIR] [--scale small|full]

Runs where a GPU is (the lent H200 has JAX and PyTorch, not TensorFlow: the Keras backend
switch picks JAX). Seeded synthetic data, the shapes of the DAG benchmark:

- iALS, ``train.ials`` settings (64 factors, 3 CG steps), the ``keras`` kernel (``keras.ops`` on
  the device) at 200k users x 20k items x ~8M pairs (10M-event size) and 2M users x 100k items x
  ~80M pairs (100M-event size): seconds per iteration, and the objective falls.
- mf_softmax (nightrec.ml.models.build_mf, sampled softmax, 1 + 4 candidates, batch 8192): mean
  milliseconds per step at 200k and at 2M users.
- scoring: nightrec's CPU kernel (``ranking.iter_top_k``, the machine's cores) and a
  ``keras.ops`` matmul + top_k on the device, top-100 of 200k users x 100k items; the two must
  return the same items.

Prints the CPU's vector features and the BLAS, the backend and its devices, and writes the
figures to ``--out``/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> dict:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    from threadpoolctl import threadpool_info

    blas = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return {"cpu": "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other",
            "cores": os.cpu_count(), "blas": blas}


def pairs(n_users: int, n_items: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n).astype(np.int32)
    items = (rng.zipf(1.3, n) - 1) % n_items
    return users, items.astype(np.int32)


def check_ials(n_users: int, n_items: int, n: int, iterations: int) -> dict:
    from nightrec.ml import ials

    u, i = pairs(n_users, n_items, n, 1)
    t0 = time.perf_counter()
    w, hist = ials.fit(u, i, None, n_users=n_users, n_items=n_items, factors=64,
                       iterations=iterations, regularization=1.0, alpha=10.0, cg_steps=3, seed=0,
                       kernel="keras", chunk_nnz=8_000_000)
    out = {"users": n_users, "items": n_items, "pairs": hist["pairs"],
           "iteration_s": hist["iteration_s"], "setup_s": hist["setup_s"],
           "total_s": round(time.perf_counter() - t0, 2), "kernel": hist["kernel"],
           "finite": bool(np.isfinite(w["user"]).all() and np.isfinite(w["item"]).all())}
    print("ials", out, flush=True)
    return out


def check_mf(n_users: int, n_items: int, steps: int, batch: int = 8192) -> dict:
    from nightrec.ml import models

    keras = models.keras_module()
    model = models.build_mf(n_users=n_users, n_items=n_items, embedding_dim=64, l2=0.05, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(2)
    n = batch * steps
    x = rng.integers(0, n_users, n).astype(np.int32)
    cand = rng.integers(0, n_items, (n, 5)).astype(np.int32)
    lq = np.full((n, 5), -np.log(n_items), np.float32)
    y = np.zeros(n, np.int32)
    warm = batch * 3
    model.fit((x[:warm], cand[:warm], lq[:warm]), y[:warm], batch_size=batch, epochs=1,
              verbose=0)
    t0 = time.perf_counter()
    hist = model.fit((x, cand, lq), y, batch_size=batch, epochs=1, verbose=0)
    secs = time.perf_counter() - t0
    out = {"users": n_users, "items": n_items, "batch": batch, "steps": steps,
           "ms_per_step": round(secs / steps * 1000, 3), "loss": float(hist.history["loss"][-1])}
    print("mf", out, flush=True)
    return out


def check_scoring(n_users: int, n_items: int, k: int = 100) -> dict:
    from keras import ops

    from nightrec.ml import models, ranking

    models.keras_module()
    rng = np.random.default_rng(3)
    u = rng.standard_normal((n_users, 64)).astype(np.float32)
    v = rng.standard_normal((n_items, 64)).astype(np.float32)
    bias = np.zeros(n_items, np.float32)
    from scipy import sparse

    seen = sparse.csr_matrix((n_users, n_items), dtype=np.float32)
    t0 = time.perf_counter()
    cpu = np.concatenate([items for _, items, _ in ranking.iter_top_k(
        u, v, bias, seen, np.arange(n_users), k=k)])
    cpu_s = time.perf_counter() - t0
    vt = ops.convert_to_tensor(v)
    chunk = 8192  # 65536 rows: JAX's top_k asked for 122 GiB of workspace (H200, 2026-12-04)
    t0 = time.perf_counter()
    gpu = []
    for lo in range(0, n_users, chunk):
        scores = ops.matmul(ops.convert_to_tensor(u[lo:lo + chunk]), ops.transpose(vt))
        gpu.append(ops.convert_to_numpy(ops.top_k(scores, k=k)[1]))
    gpu = np.concatenate(gpu)
    gpu_s = time.perf_counter() - t0
    same = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(cpu[:5000], gpu[:5000])]))
    out = {"users": n_users, "items": n_items, "k": k, "cpu_kernel_s": round(cpu_s, 2),
           "device_matmul_topk_s": round(gpu_s, 2), "same_items_share": same}
    print("scoring", out, flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--scale", choices=["small", "full"], default="full")
    parser.add_argument("--only", choices=["all", "scoring"], default="all")
    args = parser.parse_args()
    from nightrec.ml import ials, models

    keras = models.keras_module()
    info = {"machine": machine(), "backend": keras.backend.backend(), "gpus": ials.gpu_count()}
    print(info, flush=True)
    full = args.scale == "full"
    figures = {"info": info, "ials": [], "mf": [], "scoring": None}
    sizes = [(200_000, 20_000, 8_000_000)] + ([(2_000_000, 100_000, 80_000_000)] if full else [])
    for n_users, n_items, n in sizes if args.only == "all" else []:
        figures["ials"].append(check_ials(n_users, n_items, n if full else n // 40, 3))
    for n_users in (200_000, 2_000_000) if args.only == "all" else []:
        figures["mf"].append(check_mf(n_users, 100_000, 50 if full else 5))
    figures["scoring"] = check_scoring(200_000 if full else 5_000, 100_000 if full else 5_000)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
