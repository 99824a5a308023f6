"""Step 7, evaluate and gate: full-ranking metrics on the test split, against popularity.

What is gated is train's ``gated_embeddings``, a fit that never saw the test split
(tasks/train.py, ``train.ship_fit``): with ``all`` the chosen candidate's selection fit (train
only; the same family and hyperparameters as the shipped refit on train + valid + test), with
``train_valid`` the shipped train + valid refit itself. For each test user, every item is ranked
(the user's train and valid items excluded) and the top ``max(evaluate.k)`` is compared with the
user's held-out positives (see nightrec/ml/metrics.py). The popularity baseline ranks items by
their count of positives in the data the gated fit was fitted on (train, or train + valid), with
the same exclusions.

The current champion (tasks/registry.py), when there is one, is compared only on events its
gated fit never trained on: the test events later than its ``gated_cutoff`` (registry meta,
unix seconds; ``train_cutoff`` for a version registered before ``ship_fit``). The new gated fit
and the champion's (its ``gated_embeddings``, re-indexed onto this run's users and items by
external id) are both scored on that subset, every other event of a user counting as known
(excluded from ranking): gated fit against gated fit, each fitted on the same share of its own
night's data. ``metrics.json`` records the subset's size and both figures under
``champion_comparison``; with no later test event, or a champion without a cutoff (registered
before it existed), there is no comparison and the reason is recorded.

The gate blesses the model when both hold (``evaluate.gate_metric``):

- ``model >= popularity * (1 + evaluate.min_lift_over_popularity)`` on the test split, the
  absolute floor;
- ``model >= champion * (1 - evaluate.max_regression_vs_champion)`` on the champion's subset,
  when there is a comparison (a first run has none), so a worse model never replaces a better
  one.

``metrics.json`` records every side, the candidates train compared, and the verdict with its
reason. It is the ``evaluate`` stage's DVC metrics file.

Sampling. Ranking every test user against the whole catalogue costs about as much as scoring
them all; above ``evaluate.max_users`` eligible users (warm, with a positive test event), a
seeded sample of exactly that many (``np.random.default_rng`` from ``seed``, the first of its
``SeedSequence``'s two children) is ranked, and the same users serve the model and popularity
(and, on the champion's subset, sampled from that subset the same way, the model and the
champion). Each sampled side then gets a percentile bootstrap confidence interval of each
ranking metric: ``evaluate.bootstrap_samples`` resamples of the evaluated users (the seed's
second child; the same resamples for every side of a comparison, so their intervals are
paired), two-sided at ``evaluate.ci_level``. It says how far the sample's figure may be from
the whole population's. Unsampled runs report no interval: their figures are the population's.
The gate still compares the point estimates (a sampled run's figures are unbiased estimates
of the full ones); the interval is reported so that ops can see how close a verdict was.

What this adds to ``metrics.json``, beside the figures (which keep their keys and floats):

- on every run, ``n_test_users``: the eligible test users; ``evaluated_users``: those ranked
  (equal to it unless sampled); ``sampled``: bool; ``bootstrap``: ``{"samples", "level"}``
  when sampled, else null;
- ``model``, ``popularity`` and, when compared, ``champion``: each also holds, when sampled,
  ``"ci": {"ndcg_at_10": [lo, hi], ...}`` for every ``<metric>_at_<k>``. Catalogue coverage and
  mean item popularity are of the evaluated users' lists (a sample covers less of the
  catalogue than everyone would) and have no interval: they are not means over users;
- ``champion_comparison``, when it compared: ``users`` (eligible), ``evaluated_users`` and
  ``sampled`` likewise, its ``model`` and ``champion`` with a ``ci`` when sampled.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from nightrec.core import schema, settings
from nightrec.core.records import Evaluated, Trained
from nightrec.ml import metrics, models, ranking
from nightrec.store import layout, storage
from nightrec.tasks import split

PARAMS = [
    "evaluate.k",
    "evaluate.gate_metric",
    "evaluate.min_lift_over_popularity",
    "evaluate.max_regression_vs_champion",
    "evaluate.max_users",
    "evaluate.bootstrap_samples",
    "evaluate.ci_level",
    "seed",
]

# the split columns evaluate reads (run): a part's other columns are never loaded, the label
# only when some label is not 1, the timestamps only of the test part (the champion's cutoff)
PART_COLUMNS = [schema.USER_IDX, schema.ITEM_IDX, schema.LABEL, schema.TIMESTAMP]


@dataclass(frozen=True)
class Sampling:
    """At most ``max_users`` test users ranked (a seeded sample above it) and the bootstrap
    interval of a sample's metrics: ``bootstrap_samples`` resamples, two-sided ``ci_level`` in
    (0, 1). params.yaml ``evaluate.max_users``, ``evaluate.bootstrap_samples``,
    ``evaluate.ci_level`` and ``seed``."""

    max_users: int
    bootstrap_samples: int
    ci_level: float
    seed: int

    def __post_init__(self):
        if self.max_users < 1:
            raise ValueError(f"evaluate.max_users must be >= 1, got {self.max_users}")
        if self.bootstrap_samples < 1:
            raise ValueError(f"evaluate.bootstrap_samples must be >= 1, got "
                             f"{self.bootstrap_samples}")
        if not 0.0 < self.ci_level < 1.0:
            raise ValueError(f"evaluate.ci_level must be in (0, 1), got {self.ci_level}")

    @classmethod
    def from_params(cls, p: settings.StepParams) -> Sampling:
        return cls(max_users=int(p["evaluate.max_users"]),
                   bootstrap_samples=int(p["evaluate.bootstrap_samples"]),
                   ci_level=float(p["evaluate.ci_level"]), seed=int(p["seed"]))

    def _seeds(self) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
        # independent streams for the user sample and the bootstrap, both from one seed
        sample, bootstrap = np.random.SeedSequence(self.seed).spawn(2)
        return sample, bootstrap

    def sample_rows(self, n: int) -> np.ndarray | None:
        """Sorted positions of exactly ``max_users`` of ``n`` users (seeded, without
        replacement), or None when ``n <= max_users``: everyone is ranked."""
        if n <= self.max_users:
            return None
        rng = np.random.default_rng(self._seeds()[0])
        return np.sort(rng.choice(n, size=self.max_users, replace=False))

    def ci(self, per_user: dict[str, np.ndarray]) -> dict[str, list[float]]:
        """``{metric: [lo, hi]}`` of the sampled users' per-user values."""
        return metrics.bootstrap_ci(per_user, samples=self.bootstrap_samples,
                                    level=self.ci_level, seed=self._seeds()[1])

    def record(self) -> dict:
        return {"samples": self.bootstrap_samples, "level": self.ci_level}


def recommend(emb: dict, seen, users: np.ndarray, k: int, ranks=None) -> np.ndarray:
    """Top-``k`` item indices (n_users, k) of ``users`` for either model kind, ``seen`` excluded
    (and, for an item-item model, used as the user vectors: nightrec/ml/models.py; weighted by
    recency with ``ranks``, :func:`known_ranks`, when the model has a half-life)."""
    user_vecs, item_vecs, bias = models.scoring_inputs(emb, seen, ranks, users)
    chunks = ranking.iter_top_k(user_vecs, item_vecs, bias, models.ranked_seen(emb, seen), users,
                                k=k)
    return models.to_items(emb, np.concatenate([items for _, items, _ in chunks]))


def _seen(known: pd.DataFrame | list[pd.DataFrame], *, n_users: int, n_items: int):
    """The seen CSR of ``known``, 0/1 (int8): a frame, or several whose rows together are what
    is known (a list spares a concatenated copy of them). 0/1 as EASE was fitted on
    (``models.interaction_matrix``); counts in int8 would wrap at 256 repeats of a pair, and a
    wrapped 0 would be dropped by a sum of matrices."""
    seen = None
    for frame in known if isinstance(known, list) else [known]:
        m = ranking.seen_matrix(frame, n_users=n_users, n_items=n_items,
                                user_col=schema.USER_IDX, item_col=schema.ITEM_IDX)
        m.data[:] = 1
        if seen is not None:
            m = seen + m
            m.data[:] = 1
        seen = m
    return seen


def known_users(seen) -> int:
    """Users with some known event: the seen matrix's non-empty rows (no hash of every row)."""
    return int(np.count_nonzero(np.diff(seen.indptr)))


def targets(known: pd.DataFrame | list[pd.DataFrame], target: pd.DataFrame, *, n_users: int,
            n_items: int):
    """``(seen CSR of known, users to rank (sorted int64), their relevant items)``, the last a
    :class:`nightrec.ml.metrics.Relevant` with one row per user to rank. ``known``: a frame,
    or a list of frames (:func:`_seen`).

    Users to rank: those with a positive target event *and* some known history; a user with no
    history (cold) is not a ranking question any model here can answer, and is left out (counted
    by tasks/split.py's stats). Cold target items stay relevant: they count as misses.
    """
    seen = _seen(known, n_users=n_users, n_items=n_items)
    pos = schema.positives(target)
    user = pos[schema.USER_IDX].to_numpy(np.int64)
    item = pos[schema.ITEM_IDX].to_numpy(np.int64)
    candidates = np.unique(user)
    users = candidates[np.diff(seen.indptr)[candidates] > 0]
    row = np.searchsorted(users, user)
    warm = row < len(users)
    warm[warm] = users[row[warm]] == user[warm]
    return seen, users, metrics.Relevant.from_pairs(row[warm], item[warm], n_rows=len(users))


def known_ranks(known: pd.DataFrame | list[pd.DataFrame], *, n_users: int, n_items: int,
                models_: tuple[dict, ...] = (), users: np.ndarray | None = None):
    """The recency ranks (``models.pair_ranks``) of the ``known`` pairs, what a
    recency-weighted item-item model weights its user rows by, when one of ``models_`` is one
    and the frames have timestamps; else None (0/1 rows). ``users``: only those users' pairs
    are ranked (the ones a metric ranks: the sort is of their rows, not of every known row)."""
    if not any(models.recency_half_life(e) is not None for e in models_ if e is not None):
        return None
    frames = known if isinstance(known, list) else [known]
    if not all(schema.TIMESTAMP in f for f in frames):
        return None
    cols = [schema.USER_IDX, schema.ITEM_IDX, schema.TIMESTAMP]
    if users is not None:
        frames = [f[np.isin(f[schema.USER_IDX].to_numpy(), users)] for f in frames]
    u, i, t = (np.concatenate([f[c].to_numpy() for f in frames]) for c in cols)
    frames = None
    return models.pair_ranks(u, i, t, n_users=n_users, n_items=n_items)


def ranking_metric(emb: dict, known: pd.DataFrame, target: pd.DataFrame, *, metric: str,
                   n_users: int, ranks=None) -> float:
    """One metric (``ndcg_at_10``...) of ``emb`` on ``target``, ``known`` excluded: what train
    uses to choose candidates and epochs on the valid split. ``ranks``: :func:`known_ranks` of
    ``known`` when the caller has them (a search scores many models on the same users)."""
    return float(np.mean(ranking_metric_per_user(emb, known, target, metric=metric,
                                                 n_users=n_users, ranks=ranks)))


def ranking_metric_per_user(emb: dict, known: pd.DataFrame, target: pd.DataFrame, *,
                            metric: str, n_users: int, ranks=None) -> np.ndarray:
    """:func:`ranking_metric` of each target user (in user index order) instead of their mean,
    for a paired comparison of two models on the same users."""
    k = int(metric.rsplit("_at_", 1)[1])
    n_items = models.n_items(emb)
    seen, users, rel = targets(known, target, n_users=n_users, n_items=n_items)
    if len(users) == 0:
        raise ValueError("no positive target events to measure a ranking metric on")
    if ranks is None:
        ranks = known_ranks(known, n_users=n_users, n_items=n_items, models_=(emb,), users=users)
    return metrics.user_metrics(recommend(emb, seen, users, k, ranks), rel, [k])[metric]


def popularity_model(train: pd.DataFrame | list[pd.DataFrame], *, n_users: int,
                     n_items: int) -> dict:
    """Popularity as a factor model: zero vectors, item bias = count of train positives
    (``train``: a frame, or a list of frames counted together)."""
    counts = np.zeros(n_items, np.float64)
    for frame in train if isinstance(train, list) else [train]:
        (items,) = schema.positive_columns(frame, [schema.ITEM_IDX])
        counts += np.bincount(items, minlength=n_items)[:n_items]
    counts = counts.astype(np.float32)
    return {"user": np.zeros((n_users, 1), np.float32), "item": np.zeros((n_items, 1), np.float32),
            "item_bias": counts}


def _side_metrics(recs: np.ndarray, rel: metrics.Relevant, ks: list[int], *,
                  share: np.ndarray, n_items: int, ci: Sampling | None = None) -> dict:
    """The ranking metrics (means over users), catalogue coverage and mean item popularity of
    one side's ``recs``; with ``ci``, also ``"ci": {metric: [lo, hi]}`` (the bootstrap)."""
    per_user = metrics.user_metrics(recs, rel, ks)
    out = {name: float(np.mean(v)) for name, v in per_user.items()}
    shown = recs[:, : min(ks)]
    shown = shown[shown >= 0]
    out["catalogue_coverage"] = float(len(np.unique(shown)) / n_items)
    # mean share of fit users who interacted with a recommended item (lower: less head)
    out["mean_item_popularity"] = float(share[shown].mean()) if shown.size else 0.0
    if ci is not None:
        out["ci"] = ci.ci(per_user)
    return out


def _sample(users: np.ndarray, rel: metrics.Relevant, sampling: Sampling | None):
    """``(users, rel, sampled)``: a seeded sample of the users to rank when there are more than
    ``sampling.max_users`` (None: all of them)."""
    rows = None if sampling is None else sampling.sample_rows(len(users))
    if rows is None:
        return users, rel, False
    return users[rows], rel.take(rows), True


def evaluate_embeddings(
    emb: dict[str, np.ndarray], parts: dict[str, pd.DataFrame], *, ks: list[int], n_users: int,
    sampling: Sampling | None = None, fitted_on: list[str] | None = None,
) -> dict:
    """Metrics on ``parts['test']`` of the model and of popularity counted on the parts
    ``fitted_on`` (default train + valid: what the model was fitted on), the user's train and
    valid items excluded from ranking. ``sampling`` None: every eligible user is ranked (no
    interval); else see the module doc, Sampling."""
    n_items = models.n_items(emb)
    known = parts.get("known")
    if known is None:
        known = [parts["train"], parts["valid"]]  # not concatenated
    counted = known if fitted_on in (None, ["train", "valid"]) else [parts[n] for n in fitted_on]
    seen, users, rel = targets(known, parts["test"], n_users=n_users, n_items=n_items)
    n_test_users = len(users)
    users, rel, sampled = _sample(users, rel, sampling)
    ranks = known_ranks(known, n_users=n_users, n_items=n_items, models_=(emb,), users=users)
    k = max(ks)
    pop = popularity_model(counted, n_users=n_users, n_items=n_items)
    share = pop["item_bias"] / max(1, known_users(seen))
    ci = sampling if sampled else None
    out = {name: _side_metrics(recommend(e, seen, users, k, ranks), rel, ks, share=share,
                               n_items=n_items, ci=ci)
           for name, e in (("model", emb), ("popularity", pop))}
    out.update(n_test_users=n_test_users, evaluated_users=len(users), sampled=sampled,
               bootstrap=ci.record() if ci else None)
    return out


def compare_with_champion(
    emb: dict[str, np.ndarray], champion, parts: dict[str, pd.DataFrame], *,
    train_cutoff: int | None, ks: list[int], n_users: int, sampling: Sampling | None = None,
) -> dict:
    """The model and the champion on the test events later than the champion's
    ``train_cutoff`` (unix seconds), each user's other events excluded from ranking.

    ``champion``: its weights aligned to this run (:func:`nightrec.ml.models.align`), or a callable
    returning them, called only when there is something to compare on. Returns ``{"compared":
    bool, "reason", "train_cutoff", "test_events", "later_events", "users", "evaluated_users",
    "sampled", "model": metrics, "champion": metrics}`` (the last four only when compared);
    ``users`` are the eligible users, ``evaluated_users`` those ranked, both sides on the same
    ones (``sampling``: as in :func:`evaluate_embeddings`).
    """
    test = parts["test"]
    out = {"compared": False, "train_cutoff": train_cutoff, "test_events": len(test)}
    if train_cutoff is None:
        return {**out, "reason": "the champion has no train_cutoff (registered before it was "
                                 "recorded): its training events are unknown"}
    later = test[test[schema.TIMESTAMP] > int(train_cutoff)]
    out["later_events"] = len(later)
    if not len(schema.positives(later)):
        return {**out, "reason": f"no positive test event after the champion's train_cutoff "
                                 f"{int(train_cutoff)}: it may have trained on all of them"}
    n_items = models.n_items(emb)
    before = [parts["known"]] if "known" in parts else [parts["train"], parts["valid"]]
    known = [*before, test[test[schema.TIMESTAMP] <= int(train_cutoff)]]  # not concatenated
    seen, users, rel = targets(known, later, n_users=n_users, n_items=n_items)
    out["users"] = len(users)
    if len(users) == 0:
        return {**out, "reason": "the test events after the champion's train_cutoff are all of "
                                 "users with no history"}
    users, rel, sampled = _sample(users, rel, sampling)
    out.update(evaluated_users=len(users), sampled=sampled)
    champion = champion() if callable(champion) else champion
    pop = popularity_model(known, n_users=n_users, n_items=n_items)
    share = pop["item_bias"] / max(1, known_users(seen))
    k = max(ks)
    ranks = known_ranks(known, n_users=n_users, n_items=n_items, models_=(emb, champion),
                        users=users)
    for name, e in (("model", emb), ("champion", champion)):
        out[name] = _side_metrics(recommend(e, seen, users, k, ranks), rel, ks, share=share,
                                  n_items=n_items, ci=sampling if sampled else None)
    return {**out, "compared": True,
            "reason": f"on the {len(later)} test events after the champion's train_cutoff"}


def gate(result: dict, *, gate_metric: str, min_lift: float, max_regression: float) -> dict:
    """Bless when the model beats popularity by ``min_lift`` (relative) on the test split and,
    if ``result["champion_comparison"]`` compared a champion, is not worse than it by more than
    ``max_regression`` (relative) on that comparison's events. On the point estimates, sampled
    or not: a side's ``ci`` is reported for ops, never gated on."""
    model, pop = result["model"][gate_metric], result["popularity"][gate_metric]
    floor = pop * (1.0 + min_lift)
    verdict = {
        "metric": gate_metric,
        "model": model,
        "popularity": pop,
        "threshold": floor,
        "beats_popularity": bool(model >= floor),
        "champion": None,
        "champion_threshold": None,
        "model_on_champion_events": None,
        "no_regression": True,
    }
    comparison = result.get("champion_comparison") or {}
    if comparison.get("compared"):
        champ = comparison["champion"][gate_metric]
        mine = comparison["model"][gate_metric]
        verdict.update(champion=champ, champion_threshold=champ * (1.0 - max_regression),
                       model_on_champion_events=mine,
                       no_regression=bool(mine >= champ * (1.0 - max_regression)))
    verdict["blessed"] = verdict["beats_popularity"] and verdict["no_regression"]
    reasons = []
    if not verdict["beats_popularity"]:
        reasons.append(f"{gate_metric} {model:.4f} < popularity floor {floor:.4f}")
    if not verdict["no_regression"]:
        reasons.append(f"{gate_metric} {verdict['model_on_champion_events']:.4f} < champion "
                       f"tolerance {verdict['champion_threshold']:.4f} (on the champion's "
                       f"{comparison.get('later_events')} unseen test events)")
    verdict["reason"] = "; ".join(reasons) or "passed"
    return verdict


ROUTE_PARAMS = ["publish.fallback"]  # the gate's default when the run gives no fallback param


def route(evaluated: Evaluated, *, forced: bool, fallback: bool | None) -> list[str]:
    """The ``gate`` branch: ``["register"]`` for a blessed model or a forced publish,
    ``["fallback"]`` when the gate refuses and the fallback is on (``fallback``; None:
    ``publish.fallback``), else ``[]``: nothing is published. Records the decision."""
    verdict = evaluated.gate
    record_decision(evaluated.ds, verdict, forced=forced)
    if fallback is None:
        fallback = bool(settings.step_params(ROUTE_PARAMS)["publish.fallback"])
    log = logging.getLogger("nightrec.gate")
    if evaluated.blessed:
        log.info("blessed: %s", verdict)
        return ["register"]
    if forced:
        log.warning("OVERRIDE: NOT blessed (%s) but force_publish=true; publishing anyway, "
                    "the model is not promoted: %s", verdict["reason"], verdict)
        return ["register"]
    if fallback:
        log.warning("NOT blessed (%s); publishing the fallback (the champion re-scored on "
                    "today's seen items, or popularity): %s", verdict["reason"], verdict)
        return ["fallback"]
    log.warning("NOT blessed (%s) and fallback is off; nothing is published and the "
                "previous table stays latest: %s", verdict["reason"], verdict)
    return []


def record_decision(ds: str, verdict: dict, *, forced: bool) -> dict:
    """Write ``runs/ds=<ds>/gate/decision.json``: the verdict, whether ops forced publication
    (``force_publish``, an override of an unblessed model), and so whether it publishes."""
    import datetime as dt

    decision = {
        "ds": ds,
        "blessed": bool(verdict["blessed"]),
        "override": bool(forced and not verdict["blessed"]),
        "publish": bool(verdict["blessed"] or forced),
        "verdict": verdict,
        "decided_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    storage.write_json(layout.run_uri(ds, "gate", "decision.json"), decision)
    return decision


def _champion(trained: Trained):
    """``(champion version or None, its gated fit's cutoff or None, load)``: ``load()`` gives
    the champion's gated weights (``gated_embeddings``: that fit trained only up to the cutoff)
    aligned to this run by external id."""
    from nightrec.tasks import registry, score

    version = registry.champion()
    if version is None:
        return None, None, None
    meta = registry.meta(version)
    cutoff = meta.get("gated_cutoff", meta.get("train_cutoff"))

    def load() -> dict:
        model = registry.model_uris(version)
        emb = dict(np.load(io.BytesIO(storage.read_bytes(model["gated_embeddings"]))))
        return models.align(
            emb,
            model_users=score.ids_by_index(model["users"], schema.USER_IDX, schema.USER_ID),
            model_items=score.ids_by_index(model["items"], schema.ITEM_IDX, schema.ITEM_ID),
            user_ids=score.ids_by_index(trained.split.user_features, schema.USER_IDX,
                                        schema.USER_ID),
            item_ids=score.ids_by_index(trained.split.item_features, schema.ITEM_IDX,
                                        schema.ITEM_ID),
        )

    return version, None if cutoff is None else int(cutoff), load


def _recency_champion(version: str | None) -> bool:
    """Whether the champion ``version`` weights its user rows by recency (one small member of
    its embeddings read)."""
    if version is None:
        return False
    from nightrec.tasks import registry, score

    head = score.read_embeddings(registry.model_uris(version)["gated_embeddings"],
                                 only=("recency_half_life",))
    return models.recency_half_life(head) is not None


def _evaluate(emb, parts, p: settings.StepParams, *, n_users: int, champion=None,
              fitted_on: list[str] | None = None) -> dict:
    """Test metrics, the champion comparison (``champion``: :func:`_champion`'s triple, or
    None) and the gate's verdict. ``fitted_on``: the parts the gated fit saw (popularity's)."""
    ks = list(p["evaluate.k"])
    sampling = Sampling.from_params(p)
    result = evaluate_embeddings(emb, parts, ks=ks, n_users=n_users, sampling=sampling,
                                 fitted_on=fitted_on)
    version, cutoff, load = champion or (None, None, None)
    if version is None:
        comparison = {"compared": False, "reason": "no champion"}
    else:
        comparison = compare_with_champion(emb, load, parts, train_cutoff=cutoff, ks=ks,
                                           n_users=n_users, sampling=sampling)
    result["champion_comparison"] = {"version": version, **comparison}
    if comparison["compared"]:
        result["champion"] = comparison["champion"]
    result["gate"] = gate(
        result, gate_metric=p["evaluate.gate_metric"],
        min_lift=float(p["evaluate.min_lift_over_popularity"]),
        max_regression=float(p["evaluate.max_regression_vs_champion"]),
    )
    return result


def run(trained: Trained, params: dict | None = None) -> Evaluated:
    ds = trained.ds
    p = settings.step_params(PARAMS, params)
    # the fit that never saw the test split (train.gate_fit): the train + valid refit (the
    # shipped one with train.ship_fit: train_valid, else one of its own) or the selection fit
    gated = trained.gated_embeddings or trained.full_embeddings
    gated_fit = trained.gated_fit if trained.gated_embeddings else "full"
    fitted_on = ["train"] if gated_fit == "holdout" else ["train", "valid"]
    gated_cutoff = trained.gated_cutoff if trained.gated_embeddings else trained.train_cutoff
    emb = dict(np.load(io.BytesIO(storage.read_bytes(gated))))
    # only what targets, popularity and the champion's cutoff read: not weights, ratings, ids;
    # not the label when the parts' statistics say every label is 1, and the timestamps of
    # the test part only. "known" (train + valid, what ranking excludes) is one frame, part
    # after part (no concat or sort copies): train and valid are views of it
    uris = [getattr(trained.split, n) for n in split.PARTS]
    constant = split.column_ranges(uris, [schema.LABEL])[schema.LABEL] == (1, 1)
    columns = [c for c in PART_COLUMNS if not (c == schema.LABEL and constant)]
    # a recency-weighted item-item model (this one or the champion) ranks the known items by
    # time: their timestamps too
    champion = _champion(trained)
    recency = models.recency_half_life(emb) is not None or _recency_champion(champion[0])
    known, (n_train, _) = split.read_parts(uris[:2], columns=columns if recency else columns[:-1])
    test, _ = split.read_parts(uris[2:], columns=columns)
    parts = {"train": known.iloc[:n_train], "valid": known.iloc[n_train:], "test": test,
             "known": known}
    n_users = len(storage.read_parquet(trained.split.user_features, columns=[schema.USER_IDX]))
    result = _evaluate(emb, parts, p, n_users=n_users, champion=champion, fitted_on=fitted_on)
    result.update(
        ds=ds, model_version=trained.model_version, data_version=trained.data_version,
        train_cutoff=trained.train_cutoff, gated_fit=gated_fit,
        gated_cutoff=gated_cutoff, shipped_on=trained.selection.get("shipped_on"),
        champion_version=champion[0],
        champion_compared=result["champion_comparison"]["compared"],
        selection=trained.selection,
    )
    uri = layout.run_uri(ds, "evaluate", "metrics.json")
    storage.write_json(uri, result)
    model = {
        "embeddings": trained.full_embeddings,
        "holdout_embeddings": trained.holdout_embeddings,
        "gated_embeddings": gated,
        "gated_fit": gated_fit,
        "gated_cutoff": gated_cutoff,
        "users": trained.split.user_features,
        "items": trained.split.item_features,
        "model_version": trained.model_version,
        "data_version": trained.data_version,
        "train_cutoff": trained.train_cutoff,
        "metrics": uri,
        "artifacts": trained.artifacts,
    }
    return Evaluated(ds=ds, model=model, metrics=uri, blessed=result["gate"]["blessed"],
                     gate=result["gate"])
