"""How the iALS defaults (``train.ials.alpha``, ``train.ials.regularization``) were chosen: on
the valid split only, never on a test split.

    .venv/bin/python benchmarks/select_ials.py [--ml100k DIR] [--rows 1000000]

Two datasets, each split by the pipeline's own ``split.split_interactions`` with params.yaml's
split (``global_time``: train, valid, test by time): MovieLens-100K through clean's k-core and
augment's labels (``bench_models._pipeline_frames``), and a generated log
(``bench_dag.interactions``, the latent-factor generator of the DAG benchmark; ``--rows``
events, 50k users x 20k items). For each (alpha, regularization) of the grid, iALS is fitted on
the train split with params.yaml's factors, iterations and CG steps, and scored by the train
step's own function (``evaluate.ranking_metric``, ndcg@10, train items excluded) on the valid
split. The test splits are never built into a figure. The printed choice is the grid point with
the best mean rank over the two datasets. Prints the CPU's vector features and the BLAS.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ALPHAS = (1.0, 3.0, 10.0, 30.0)
REGS = (1.0, 10.0, 100.0, 300.0, 1000.0)


def machine() -> str:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    from threadpoolctl import threadpool_info

    blas = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return (f"cpu: {'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'}"
            f", {os.cpu_count()} cores; blas: {', '.join(blas) or 'none loaded'}")


def generated(rows: int, seed: int, users: int = 50_000, items: int = 20_000) -> pd.DataFrame:
    import bench_dag

    from nightrec.core import schema

    u, i, _r, ts, _f = bench_dag.interactions(rows=rows, users=users, items=items, seed=seed)
    return pd.DataFrame({schema.USER_IDX: u, schema.ITEM_IDX: i, schema.TIMESTAMP: ts,
                         schema.LABEL: np.int8(1), schema.WEIGHT: np.float32(1.0)})


def grid(name: str, labelled: pd.DataFrame, params: dict, alphas=ALPHAS, regs=REGS) -> dict:
    from nightrec.core import schema, settings
    from nightrec.ml import ials
    from nightrec.tasks import evaluate, split

    parts = split.split_interactions(labelled, **split.split_kwargs(
        settings.step_params(split.PARAMS, params)))
    del parts["test"]  # never scored here
    n_users = int(labelled[schema.USER_IDX].max()) + 1
    n_items = int(labelled[schema.ITEM_IDX].max()) + 1
    pos = parts["train"][parts["train"][schema.LABEL] == 1]
    t = params["train"]["ials"]
    pop = {"user": np.zeros((n_users, 1), np.float32), "item": np.zeros((n_items, 1), np.float32),
           "item_bias": np.bincount(pos[schema.ITEM_IDX], minlength=n_items).astype(np.float32)}
    print(f"{name:10s} popularity valid ndcg@10 {evaluate.ranking_metric(pop, parts['train'], parts['valid'], metric='ndcg_at_10', n_users=n_users):.4f}", flush=True)  # noqa: E501
    out = {}
    for alpha, reg in itertools.product(alphas, regs):
        started = time.perf_counter()
        emb, _ = ials.fit(pos[schema.USER_IDX].to_numpy(), pos[schema.ITEM_IDX].to_numpy(), None,
                          n_users=n_users, n_items=n_items, factors=int(t["factors"]),
                          iterations=int(t["iterations"]), regularization=reg, alpha=alpha,
                          cg_steps=int(t["cg_steps"]), seed=int(params["seed"]))
        out[(alpha, reg)] = evaluate.ranking_metric(emb, parts["train"], parts["valid"],
                                                    metric="ndcg_at_10", n_users=n_users)
        print(f"{name:10s} alpha={alpha:5.1f} reg={reg:6.1f}  valid ndcg@10 "
              f"{out[(alpha, reg)]:.4f}  ({time.perf_counter() - started:.1f} s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ml100k", type=Path, default=Path(os.environ.get(
        "NIGHTREC_ML100K", ROOT.parent / "shared" / "data" / "ml-100k")))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--alphas", type=float, nargs="*", default=list(ALPHAS))
    parser.add_argument("--regs", type=float, nargs="*", default=list(REGS))
    parser.add_argument("--skip-ml100k", action="store_true")
    args = parser.parse_args(argv)
    from nightrec.core import settings

    print(machine())
    params = settings.load_params()
    results = {}
    if (args.ml100k / "u.data").exists() and not args.skip_ml100k:
        import bench_models

        results["ml-100k"] = grid("ml-100k", bench_models._pipeline_frames(args.ml100k, params)[0],
                                  params, args.alphas, args.regs)
    else:
        print(f"MovieLens-100K not found at {args.ml100k}: generated data only")
    results["generated"] = grid("generated", generated(args.rows, int(params["seed"]), args.users,
                                                        args.items), params, args.alphas, args.regs)
    ranks = {}
    for scores in results.values():
        order = sorted(scores, key=lambda k: -scores[k])
        for r, k in enumerate(order):
            ranks.setdefault(k, []).append(r)
    best = min(ranks, key=lambda k: (np.mean(ranks[k]), k))
    print(f"best mean valid rank: alpha={best[0]} regularization={best[1]} "
          + ", ".join(f"{n} {s[best]:.4f}" for n, s in results.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
