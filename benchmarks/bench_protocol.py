"""Issue 16's evaluation protocol on MovieLens-100K: nightrec against tuned baselines.

Each protocol x seed in one run, every method on the same 80% / 20% split.

    .venv/bin/python benchmarks/bench_protocol.py [--ml100k DIR] [--protocols random temporal
        global_time] [--seeds 1 2 3] [--json-out FILE] [--skip-nightrec]

Protocols (the 20% test; the other 80% is all any method sees):

- ``random``: a seeded random 20% of each user's events (one split per ``--seeds`` seed);
- ``temporal``: each user's latest 20% (deterministic: run once, with the first seed);
- ``global_time``: one cutoff at the 80% quantile of all timestamps; test = the events at or
  after it of users with an event before it (items first seen after the cut stay relevant: a
  miss for every method); train = every event before it (run once, with the first seed).

Rows, all on the same split and scored the same way:

1. ``nightrec (published table)``: ``nightrec run`` on the 80% (bench_models.run_nightrec) with
   the repo's params.yaml except ``split.method`` (random -> random_per_user, temporal ->
   leave_last_fraction, global_time -> global_time), so that its own model selection validates
   the way it is measured. Its train step's ``selection.json`` gives the chosen family and each
   candidate's valid figure and fit seconds; "train s" is the step's ``train_s`` (every
   selection fit plus the refits: the shipped one and, with the default ``train.gate_fit``,
   the gated one).
2. ``EASE, lambda chosen on valid``: a validation split carved out of the 80% the way the
   protocol carves the test (random: a seeded random 10% of each user's 80%; temporal: each
   user's latest 10%; global_time: the events after the 90% time quantile of the 80%); plain
   EASE (no dropout, numpy float64) for each lambda of ``--ease-lambdas`` fitted on the rest,
   the best NDCG@10 on valid refit on the whole 80%. The ratio column divides by this row.
3. ``EASE, lambda chosen on test (upper reference, not a fair baseline)``: the lambda of that
   grid with the best test NDCG@10: what no honest selection can beat with plain EASE.
4. ``iALS (implicit), reg & alpha chosen on valid``: implicit 0.7's CPU
   AlternatingLeastSquares (factors 64, 15 iterations, conjugate gradient, seeded), the pair of
   ``--ials-reg`` x ``--ials-alpha`` with the best valid NDCG@10 refit on the 80%, scored by
   ``user_factors @ item_factors.T``. implicit's convention: an observed pair has confidence
   ``alpha`` (unobserved: 1) and ``regularization`` is a plain L2 weight on every user and item
   vector, not scaled by their counts.
5. ``popularity``: train counts.

"train s" of rows 2-5 is the final fit on the 80% (EASE: the Gram matrix and the inverse); the
grid searches' seconds are their own column. Metrics are bench_models.score_table's
(nightrec/ml/metrics.py): full ranking over the items of the 80%, the user's 80% items excluded,
every held-out item relevant, every test user counted (no list: 0). The table reports NDCG@10
and Recall@10 as mean +- sample standard deviation over seeds; the JSON has every figure per
seed. The MovieLens licence forbids redistribution: the data is read from ``--ml100k`` and
never copied into the repo; without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_models as bm  # noqa: E402 - the shared helpers, next to this file

ROOT = bm.ROOT
KS = bm.KS
PROTOCOLS = ["random", "temporal", "global_time"]
SPLIT_METHOD = {"random": "random_per_user", "temporal": "leave_last_fraction",
                "global_time": "global_time"}
TEST_FRACTION = 0.2
VALID_SEED_OFFSET = 10_000  # the random valid carve of seed s draws with seed s + this
EASE_LAMBDAS = [10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
IALS_REG = [0.1, 1, 3, 10, 30, 100, 300, 1000]
IALS_ALPHA = [1, 3, 10, 40]
IALS_FACTORS, IALS_ITERATIONS = 64, 15
NIGHTREC = "nightrec (published table)"
EASE_VAL = "EASE, lambda chosen on valid"
EASE_TEST = "EASE, lambda chosen on test (upper reference, not a fair baseline)"
IALS = "iALS (implicit), reg & alpha chosen on valid"
POP = "popularity"


def carve(df: pd.DataFrame, protocol: str, seed: int, fraction: float):
    """``(kept, held)``: ``df`` split the way ``protocol`` holds out ``fraction``. random and
    temporal per user (bench_models.holdout_split); global_time at one cutoff, the
    ``1 - fraction`` quantile of the timestamps: held = the events at or after it of users with
    an event before it (their items may be new), kept = every event before it."""
    if protocol in ("random", "temporal"):
        return bm.holdout_split(df, protocol, seed, fraction)
    cut = np.quantile(df["t"], 1.0 - fraction, method="higher")
    kept = df[df["t"] < cut]
    held = df[(df["t"] >= cut) & df["u"].isin(kept["u"].unique())]
    return kept, held


def _score(lists: dict[str, list[str]], test: pd.DataFrame) -> dict:
    return bm.score_table(lists, test, KS)


def _csr(x: np.ndarray):
    import scipy.sparse as sp

    return sp.csr_matrix(x.astype(np.float32))


def ease_grid(train: pd.DataFrame, evaluate_on: pd.DataFrame, lambdas: list[float], k: int):
    """For each lambda, plain EASE fitted on ``train`` scored on ``evaluate_on``:
    ``{lambda: (metrics, fit seconds)}``; fit seconds = the Gram matrix + the inverse."""
    users, items, x = bm.interaction_matrix(train)
    started = time.perf_counter()
    gram = x.T @ x
    gram_s = time.perf_counter() - started
    out = {}
    for lam in lambdas:
        started = time.perf_counter()
        scores = bm.ease_scores(x, lam, gram)
        fit_s = gram_s + time.perf_counter() - started
        out[lam] = (_score(bm.top_k_lists(scores, x, users, items, k), evaluate_on), fit_s)
    return out


def ials_fit(train: pd.DataFrame, reg: float, alpha: float, seed: int, k: int):
    """implicit's CPU iALS on ``train``: ``(top-k lists, fit seconds)``, seen excluded."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    users, items, x = bm.interaction_matrix(train)
    ui = _csr(x)
    with threadpool_limits(1, "blas"):  # implicit's own threads; it warns on a threaded BLAS
        started = time.perf_counter()
        model = AlternatingLeastSquares(factors=IALS_FACTORS, regularization=reg, alpha=alpha,
                                        iterations=IALS_ITERATIONS, random_state=seed)
        model.fit(ui, show_progress=False)
        fit_s = time.perf_counter() - started
    scores = np.asarray(model.user_factors, dtype=np.float64) @ np.asarray(
        model.item_factors, dtype=np.float64).T
    return bm.top_k_lists(scores, x, users, items, k), fit_s


def baseline_rows(train: pd.DataFrame, test: pd.DataFrame, protocol: str, seed: int,
                  args: argparse.Namespace) -> dict[str, dict]:
    """Rows 2-5 of the module doc on one split: ``{method: {metrics, train_s, select_s,
    chosen, grid}}``."""
    k = max(KS)
    sub, valid = carve(train, protocol, seed + VALID_SEED_OFFSET, args.valid_fraction)
    rows = {}

    started = time.perf_counter()
    on_valid = ease_grid(sub, valid, args.ease_lambdas, k)
    select_s = time.perf_counter() - started
    lam_val = max(args.ease_lambdas, key=lambda lam: on_valid[lam][0]["ndcg_at_10"])
    on_test = ease_grid(train, test, args.ease_lambdas, k)
    lam_test = max(args.ease_lambdas, key=lambda lam: on_test[lam][0]["ndcg_at_10"])
    grid = {str(lam): {"valid_ndcg_at_10": on_valid[lam][0]["ndcg_at_10"],
                       "test_ndcg_at_10": on_test[lam][0]["ndcg_at_10"]}
            for lam in args.ease_lambdas}
    rows[EASE_VAL] = {**on_test[lam_val][0], "train_s": on_test[lam_val][1],
                      "select_s": select_s, "chosen": f"lambda={lam_val:g}", "grid": grid}
    rows[EASE_TEST] = {**on_test[lam_test][0], "train_s": on_test[lam_test][1],
                       "select_s": None, "chosen": f"lambda={lam_test:g}"}

    started = time.perf_counter()
    ials_grid = {}
    for reg in args.ials_reg:
        for alpha in args.ials_alpha:
            lists, fit_s = ials_fit(sub, reg, alpha, seed, k)
            ials_grid[(reg, alpha)] = (_score(lists, valid)["ndcg_at_10"], fit_s)
    select_s = time.perf_counter() - started
    reg, alpha = max(ials_grid, key=lambda key: ials_grid[key][0])
    lists, fit_s = ials_fit(train, reg, alpha, seed, k)
    edge = [name for name, value, grid_values in (("reg", reg, args.ials_reg),
                                                  ("alpha", alpha, args.ials_alpha))
            if value in (min(grid_values), max(grid_values)) and len(grid_values) > 1]
    rows[IALS] = {**_score(lists, test), "train_s": fit_s, "select_s": select_s,
                  "chosen": f"reg={reg:g} alpha={alpha:g}", "chosen_at_grid_edge": edge,
                  "grid": {f"reg={r:g} alpha={a:g}": {"valid_ndcg_at_10": v, "fit_s": s}
                           for (r, a), (v, s) in ials_grid.items()}}

    started = time.perf_counter()
    users, items, x = bm.interaction_matrix(train)
    counts = x.sum(0)
    fit_s = time.perf_counter() - started
    rows[POP] = {**_score(bm.top_k_lists(np.tile(counts, (len(users), 1)), x, users, items, k),
                          test), "train_s": fit_s, "select_s": None, "chosen": ""}
    rows["_valid"] = {"valid_events": len(valid), "valid_users": int(valid["u"].nunique()),
                      "sub_train_events": len(sub)}
    return rows


def nightrec_row(train: pd.DataFrame, test: pd.DataFrame, protocol: str, ml: Path) -> dict:
    """Row 1 of the module doc: the published table scored on ``test``, its checks (seen items
    recommended, test users without a list or with a short one) and the train selection."""
    params = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["split"]["method"] = SPLIT_METHOD[protocol]
    outputs: dict = {}
    with tempfile.TemporaryDirectory(prefix="nightrec-protocol-") as tmp:
        try:
            recs, wall = bm.run_nightrec(train, ml, params, Path(tmp), outputs)
        except SystemExit as e:  # run_nightrec's failure: report it, go on with the baselines
            kept = Path(tempfile.mkdtemp(prefix="bench-protocol-failed-"))
            for log in (Path(tmp) / "state" / "logs").glob("*.log"):
                shutil.copy(log, kept / log.name)
            print(f"  nightrec run FAILED (its logs kept in {kept}): {str(e)[-1500:]}")
            return {"error": str(e)[-3000:], "logs": str(kept),
                    "override": {"split.method": SPLIT_METHOD[protocol]}}
    seen = set(zip(train["u"].astype(str), train["i"].astype(str)))
    test_users = set(test["u"].astype(str))
    k = 10
    sel = outputs.get("selection") or {}
    return {
        **_score(recs, test),
        "train_s": sel.get("train_s"), "wall_s": wall, "select_s": None,
        "chosen": sel.get("chosen", "?"),
        "override": {"split.method": SPLIT_METHOD[protocol]},
        "seen_recommended": sum((u, i) in seen for u, items in recs.items() for i in items),
        "test_users_without_list": len(test_users - set(recs)),
        "test_users_with_fewer_than_10": sum(len(recs.get(u, [])) < k for u in test_users),
        "table_users": len(recs),
        "selection": sel or None,
        "evaluate_metrics": outputs.get("metrics"),
    }


def _git(*cmd: str) -> str:
    proc = subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True,
                          check=False)
    return proc.stdout.strip()


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def print_protocol(protocol: str, runs: dict[int, dict]) -> None:
    seeds = sorted(runs)
    first = runs[seeds[0]]
    print(f"\n### {protocol}: {first['split']['test_users']} test users, "
          f"{first['split']['train_events']} train / {first['split']['test_events']} test events"
          f", seeds {seeds} (nightrec split.method: {SPLIT_METHOD[protocol]})")
    print("| method | NDCG@10 | Recall@10 | train s | select s | chosen | NDCG@10 / EASE "
          "val-lambda |")
    print("|---|---|---|---|---|---|---|")
    for method in (NIGHTREC, EASE_VAL, EASE_TEST, IALS, POP):
        rows = [runs[s]["methods"].get(method) for s in seeds]
        rows = [r for r in rows if r and "ndcg_at_10" in r]
        if not rows:
            print(f"| {method} | (not run or failed) | | | | | |")
            continue
        ok = [s for s in seeds if "ndcg_at_10" in runs[s]["methods"].get(method, {})]
        ratios = [runs[s]["methods"][method]["ndcg_at_10"]
                  / runs[s]["methods"][EASE_VAL]["ndcg_at_10"] for s in ok]
        train_s = [r["train_s"] for r in rows if r.get("train_s") is not None]
        select_s = [r["select_s"] for r in rows if r.get("select_s") is not None]
        cells = [method, _mean_std([r["ndcg_at_10"] for r in rows]),
                 _mean_std([r["recall_at_10"] for r in rows]),
                 f"{np.mean(train_s):.2f}" if train_s else "?",
                 f"{np.mean(select_s):.1f}" if select_s else "",
                 " / ".join(str(r["chosen"]) for r in rows if r["chosen"]),
                 f"{np.mean(ratios):.3f}"]
        print("| " + " | ".join(cells) + " |")
    for s in seeds:
        n = runs[s]["methods"].get(NIGHTREC, {})
        if "error" in n:
            print(f"seed {s}: nightrec FAILED ({n['error'][-300:]!r})")
            continue
        if not n:
            continue
        print(f"seed {s}: nightrec wall {n['wall_s']:.0f} s; table: {n['table_users']} users, "
              f"seen items recommended {n['seen_recommended']}, test users without a list "
              f"{n['test_users_without_list']}, with < 10 items "
              f"{n['test_users_with_fewer_than_10']}")
        sel = n.get("selection") or {}
        cands = "; ".join(
            f"{name}: valid {c.get('valid_' + sel.get('metric', 'ndcg_at_10'), float('nan')):.4f}"
            f", fit {c.get('fit_s')} s"
            + (f", params {c['params']}" if c.get("params") else "")
            + (f", reg {c['regularization']}" if "regularization" in c and not c.get("params")
               else "")
            + (f", skipped points {sum('skipped' in v for v in c['search'].values())}"
               if any("skipped" in v for v in (c.get("search") or {}).values()) else "")
            + (f", best epoch {c['best_epoch']}" if "best_epoch" in c else "")
            for name, c in (sel.get("candidates") or {}).items())
        print(f"  train selection: chosen {sel.get('chosen')}; {cands or 'not read'}; skipped "
              f"{sel.get('skipped') or 'none'}; train_s {sel.get('train_s')} (budget "
              f"{sel.get('time_budget_s')} s), valid users {sel.get('valid_users')}")
    for s in seeds:
        i = runs[s]["methods"].get(IALS, {})
        if i.get("chosen_at_grid_edge"):
            print(f"seed {s}: iALS choice {i['chosen']} is at the grid's edge "
                  f"({', '.join(i['chosen_at_grid_edge'])})")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ml100k", type=Path, default=Path(os.environ.get(
        "NIGHTREC_ML100K", ROOT.parent / "shared" / "data" / "ml-100k")))
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=PROTOCOLS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3],
                        help="random: one split per seed; temporal, global_time: the first")
    parser.add_argument("--valid-fraction", type=float, default=0.1,
                        help="share of the 80%% carved out as the baselines' validation split")
    parser.add_argument("--ease-lambdas", nargs="+", type=float, default=EASE_LAMBDAS)
    parser.add_argument("--ials-reg", nargs="+", type=float, default=IALS_REG)
    parser.add_argument("--ials-alpha", nargs="+", type=float, default=IALS_ALPHA)
    parser.add_argument("--skip-nightrec", action="store_true",
                        help="the baselines only (no `nightrec run`)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if not (args.ml100k / "u.data").exists():
        print(f"MovieLens-100K not found at {args.ml100k}; nothing to benchmark")
        return {}
    from nightrec.dev import bench_scoring

    machine = bench_scoring.machine()
    print(machine)
    out = {"machine": machine, "commit": _git("log", "-1", "--format=%h"),
           "git_status": _git("status", "--short").splitlines(), "ml100k": str(args.ml100k),
           "valid_fraction": args.valid_fraction, "ease_lambdas": args.ease_lambdas,
           "ials": {"factors": IALS_FACTORS, "iterations": IALS_ITERATIONS,
                    "reg": args.ials_reg, "alpha": args.ials_alpha},
           "split_method_override": {p: SPLIT_METHOD[p] for p in args.protocols},
           "protocols": {}}
    print(f"commit {out['commit']}; git status: {out['git_status'] or 'clean'}")
    ratings = pd.read_csv(args.ml100k / "u.data", sep="\t", names=["u", "i", "r", "t"])
    for protocol in args.protocols:
        runs = {}
        for seed in args.seeds if protocol == "random" else args.seeds[:1]:
            train, test = carve(ratings, protocol, seed, TEST_FRACTION)
            print(f"\n{protocol} seed {seed}: {len(train)} train / {len(test)} test events, "
                  f"{test['u'].nunique()} test users", flush=True)
            methods = {}
            if not args.skip_nightrec:
                print(f"  nightrec run with split.method: {SPLIT_METHOD[protocol]}", flush=True)
                methods[NIGHTREC] = nightrec_row(train, test, protocol, args.ml100k)
            started = time.perf_counter()
            base = baseline_rows(train, test, protocol, seed, args)
            valid = base.pop("_valid")
            methods.update(base)
            print("  " + "; ".join(f"{m}: {r.get('ndcg_at_10', float('nan')):.4f}"
                                   for m, r in methods.items())
                  + f" (baselines {time.perf_counter() - started:.0f} s)", flush=True)
            runs[seed] = {"split": {"train_events": len(train), "test_events": len(test),
                                    "test_users": int(test["u"].nunique()),
                                    "test_items_unseen_in_train": int(
                                        (~test["i"].isin(train["i"].unique())).sum()),
                                    **valid},
                          "methods": methods}
        out["protocols"][protocol] = runs
        print_protocol(protocol, runs)
    text = json.dumps(out, default=str)
    print("\n" + text)
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
