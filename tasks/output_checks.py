"""Output checks before publish: today's table against the table readers see now (the latest).

A silent bug that changes every user's list (a mis-joined id map, a shuffled shard) passes the
gate when its holdout metric is fine, and the table contract too: every row is well formed. What
gives it away is the change from the table being served. Publish compares the staged table
with the latest one on:

- **users dropped**: the share of the latest table's users with no list today
  (``monitor.output.max_users_dropped``);
- **catalogue coverage**: distinct items in the lists' heads today over those of the latest
  table, at the depth both tables have (the first ``TOP`` ranks, fewer when a table's
  ``top_k`` is smaller: a manual run with ``top_k`` 5 is compared with the latest table's first
  5 ranks, not its 100), over every user (``monitor.output.min_coverage_ratio``);
- **overlap@10**: for the users in both tables, ``|today's top 10 & latest top 10| / min(sizes)``,
  averaged (``monitor.output.min_overlap_at_10``), and the same against a *chance* pairing (each
  user's list today against another user's list in the latest table, a fixed rotation of the
  sorted users). Their ratio, the overlap lift, is about 1 when lists no longer belong to their
  users, whatever the model (``monitor.output.min_overlap_lift``); it is only judged when the
  chance overlap is below ``monitor.output.personal_max_chance_overlap``, i.e. when the latest
  lists are personal (a popularity table gives everyone nearly the same list);
- **score scale**: the median absolute score of the top 10, today over latest
  (``monitor.output.max_score_scale_change``, either way); only judged when both tables come
  from the same model family (the ``model_version`` prefix: EASE, mf and iALS scores live on
  different scales).

A breach refuses the publish (:class:`OutputCheckError`, nothing becomes visible) unless the run
is forced (``force_publish``); checks are recorded either way in
``runs/ds=<ds>/publish/output_checks.json``. A backfill (a ds earlier than the latest's) is
checked and recorded, never refused: it does not change what readers see.

Scale. Nothing holds a whole table. Users are sampled by a stable hash of ``user_id``
(:func:`user_hash`) under a threshold set from ``monitor.output.sample_users``; the same hash
under the smaller of two thresholds gives the same users in both tables, so the comparison is
exact on that sample. Today's summary (:class:`Summary`: the sampled users' top 10, the distinct
items) is built during publish's one validation pass over the staged parts, and written next to
the run (``runs/ds=<ds>/publish/output_summary.json`` and ``.parquet``), so that the next publish
reads the latest table's summary instead of the table. A latest table without a summary (or
whose summary belongs to another publish of its ds) is summarised by streaming it through the
reader, one part at a time.
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pandas as pd

from nightrec.core import schema
from nightrec.core.errors import PermanentError
from nightrec.store import layout, storage
from nightrec.table.reader import RecommendationReader, TableNotFound

PARAMS = [
    "monitor.output.sample_users",
    "monitor.output.max_users_dropped",
    "monitor.output.min_coverage_ratio",
    "monitor.output.min_overlap_at_10",
    "monitor.output.min_overlap_lift",
    "monitor.output.personal_max_chance_overlap",
    "monitor.output.max_score_scale_change",
]
TOP = 10  # the list head compared (overlap@10, score scale)
HASH_SPACE = 2**64
log = logging.getLogger(__name__)


class OutputCheckError(PermanentError):
    """Today's table differs from the latest one beyond the thresholds; nothing was published."""


def user_hash(user_ids) -> np.ndarray:
    """A stable 64-bit hash of each user id (pandas' SipHash with its fixed key): the same user
    gets the same value in every run, process and version of the table."""
    values = np.asarray(user_ids, dtype=object)
    return pd.util.hash_array(values, categorize=False)


def threshold(users: int, sample_users: int) -> int:
    """Users whose :func:`user_hash` is below this are sampled: about ``sample_users`` of
    ``users`` (all of them when there are fewer)."""
    if users <= 0 or sample_users >= users:
        return HASH_SPACE
    return int(HASH_SPACE * (sample_users / users))


class Summary:
    """What the comparison needs of one table, built a batch at a time: the top ``TOP`` rows of
    the users below ``limit`` (user_id, item_id, rank, score), the distinct items, and each
    item's best rank within the first ``TOP`` over every user (``head_rank``: what coverage
    at a given depth counts)."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.items: set = set()
        self.head_rank: dict = {}
        self.depth = 0  # the deepest rank (at most TOP) the table's lists reach
        self._frames: list[pd.DataFrame] = []
        self._top: pd.DataFrame | None = None

    def add(self, batch) -> None:
        """One Arrow table or record batch of the table's rows (any columns order)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        self.items.update(pc.unique(batch.column(schema.ITEM_ID)).to_pylist())
        head = batch.filter(pc.less_equal(batch.column(schema.RANK), TOP))
        if not head.num_rows:
            return
        self.depth = max(self.depth, int(pc.max(head.column(schema.RANK)).as_py()))
        best = pa.table({"i": head.column(schema.ITEM_ID), "r": head.column(schema.RANK)}
                        ).group_by("i").aggregate([("r", "min")])
        for item, rank in zip(best.column("i").to_pylist(), best.column("r_min").to_pylist(),
                              strict=True):
            if rank < self.head_rank.get(item, TOP + 1):
                self.head_rank[item] = int(rank)
        cols = [schema.USER_ID, schema.ITEM_ID, schema.RANK, schema.SCORE]
        frame = head.select(cols).to_pandas()
        if self.limit < HASH_SPACE:
            frame = frame[user_hash(frame[schema.USER_ID].to_numpy()) < np.uint64(self.limit)]
        if len(frame):
            self._frames.append(frame)
            self._top = None

    @property
    def top(self) -> pd.DataFrame:
        if self._top is None:
            cols = [schema.USER_ID, schema.ITEM_ID, schema.RANK, schema.SCORE]
            self._top = (pd.concat(self._frames, ignore_index=True) if self._frames
                         else pd.DataFrame(columns=cols))
            self._frames = [self._top] if len(self._top) else []
        return self._top

    def head_items(self, depth: int) -> int:
        """Distinct items in the first ``depth`` ranks of any user's list."""
        return sum(1 for r in self.head_rank.values() if r <= depth)

    def to_store(self, ds: str, *, publish_id: str, model_version: str) -> None:
        """Written next to the run, for the next publish to compare against."""
        buf = io.BytesIO()
        self.top.to_parquet(buf, index=False)
        storage.write_bytes(layout.run_uri(ds, "publish", "output_summary.parquet"),
                            buf.getvalue())
        buf = io.BytesIO()
        pd.DataFrame({schema.ITEM_ID: list(self.head_rank),
                      schema.RANK: np.array(list(self.head_rank.values()), np.int16)}
                     ).to_parquet(buf, index=False)
        storage.write_bytes(layout.run_uri(ds, "publish", "output_head_items.parquet"),
                            buf.getvalue())
        storage.write_json(layout.run_uri(ds, "publish", "output_summary.json"), {
            "publish_id": publish_id, "model_version": model_version, "limit": str(self.limit),
            "items": len(self.items), "depth": self.depth})

    @classmethod
    def from_store(cls, ds: str, publish_id: str | None) -> tuple[Summary, int] | None:
        """``(summary, distinct items)`` as the publish of ``publish_id`` wrote it; None when
        there is none (or it is another publish's)."""
        uri = layout.run_uri(ds, "publish", "output_summary.json")
        meta = storage.read_json(uri) if storage.exists(uri) else None
        heads = layout.run_uri(ds, "publish", "output_head_items.parquet")
        if (not meta or meta.get("publish_id") != publish_id or "depth" not in meta
                or not storage.exists(heads)):
            return None  # none, another publish's, or written before head_rank existed
        out = cls(int(meta["limit"]))
        out.depth = int(meta["depth"])
        data = storage.read_bytes(layout.run_uri(ds, "publish", "output_summary.parquet"))
        out._frames = [storage.parquet_frame(data)]
        ranks = storage.parquet_frame(storage.read_bytes(heads))
        out.head_rank = dict(zip(ranks[schema.ITEM_ID], ranks[schema.RANK].astype(int),
                                 strict=True))
        return out, int(meta["items"])


def latest_summary(limit: int) -> tuple[dict, Summary, int] | None:
    """``(pointer, summary, distinct items)`` of the table readers see now; None before the
    first publish."""
    bucket = storage.split_uri(layout.recs_root())[0]
    reader = RecommendationReader(bucket)
    try:
        pointer = reader.latest()
    except TableNotFound:
        return None
    stored = Summary.from_store(pointer["ds"], pointer.get("publish_id"))
    if stored is not None:
        return pointer, *stored
    log.info("no output summary for the latest table (ds=%s): streaming it", pointer["ds"])
    summary = Summary(limit)
    for batch in reader.iter_batches(pointer["ds"]):
        summary.add(batch)
    return pointer, summary, len(summary.items)


def family(model_version: str | None) -> str:
    return (model_version or "").split("-", 1)[0]


def _lists(top: pd.DataFrame) -> dict:
    ordered = top.sort_values([schema.USER_ID, schema.RANK])
    return {u: set(g) for u, g in ordered.groupby(schema.USER_ID, sort=True)[schema.ITEM_ID]}


def _overlap(a: list[set], b: list[set]) -> float:
    vals = [len(x & y) / min(len(x), len(y)) for x, y in zip(a, b, strict=True) if x and y]
    return float(np.mean(vals)) if vals else math.nan


def compare(new: Summary, new_items: int, old: Summary, old_items: int, *,
            same_family: bool, p) -> dict:
    """The checks of ``new`` against ``old`` (pure): ``{"figures", "checks", "breaches"}``."""
    limit = np.uint64(min(new.limit, old.limit, HASH_SPACE - 1))
    new_top, old_top = new.top, old.top
    if min(new.limit, old.limit) < HASH_SPACE:  # the users both samples hold
        new_top = new_top[user_hash(new_top[schema.USER_ID].to_numpy()) < limit]
        old_top = old_top[user_hash(old_top[schema.USER_ID].to_numpy()) < limit]
    new_lists, old_lists = _lists(new_top), _lists(old_top)
    common = sorted(set(new_lists) & set(old_lists))
    dropped = (1 - len(set(old_lists) & set(new_lists)) / len(old_lists)) if old_lists else 0.0
    overlap = _overlap([new_lists[u] for u in common], [old_lists[u] for u in common])
    if len(common) > 1:  # each user's list today against the next user's list in the latest
        rotated = common[1:] + common[:1]
        chance = _overlap([new_lists[u] for u in common], [old_lists[u] for u in rotated])
    else:
        chance = math.nan
    lift = overlap / chance if chance and not math.isnan(chance) else math.nan
    scale_new = float(np.median(np.abs(new_top[schema.SCORE]))) if len(new_top) else math.nan
    scale_old = float(np.median(np.abs(old_top[schema.SCORE]))) if len(old_top) else math.nan
    scale = (max(scale_new / scale_old, scale_old / scale_new)
             if scale_new > 0 and scale_old > 0 else math.nan)
    personal = not math.isnan(chance) and chance < float(
        p["monitor.output.personal_max_chance_overlap"])
    depth = min(new.depth, old.depth)  # the ranks both tables have, at most TOP
    old_head = old.head_items(depth)
    coverage = new.head_items(depth) / old_head if old_head else math.nan
    checks = [
        _check("users_dropped", dropped, "<=", float(p["monitor.output.max_users_dropped"])),
        _check("coverage_ratio", coverage, ">=", float(p["monitor.output.min_coverage_ratio"])),
        _check("overlap_at_10", overlap, ">=", float(p["monitor.output.min_overlap_at_10"])),
        _check("overlap_lift", lift, ">=", float(p["monitor.output.min_overlap_lift"]),
               judged=personal, why="the latest lists are not personal (chance overlap "
               f"{chance:.3f})" if not personal else None),
        _check("score_scale_change", scale, "<=",
               float(p["monitor.output.max_score_scale_change"]), judged=same_family,
               why=None if same_family else "the model family changed"),
    ]
    figures = {"sampled_users_latest": len(old_lists), "sampled_users_today": len(new_lists),
               "common_users": len(common), "items_latest": old_items, "items_today": new_items,
               "coverage_depth": depth, "head_items_latest": old_head,
               "head_items_today": new.head_items(depth),
               "chance_overlap_at_10": chance, "score_scale_today": scale_new,
               "score_scale_latest": scale_old}
    return {"figures": figures, "checks": checks,
            "breaches": [c["name"] for c in checks if c["judged"] and not c["ok"]]}


def _check(name: str, value: float, op: str, bound: float, *, judged: bool = True,
           why: str | None = None) -> dict:
    if math.isnan(value):  # nothing to compare (no common users, an empty table)
        judged, why = False, why or "not measurable"
    ok = (value <= bound if op == "<=" else value >= bound) if judged else True
    return {"name": name, "value": None if math.isnan(value) else round(float(value), 6),
            "op": op, "threshold": bound, "judged": judged, "ok": bool(ok), "why": why}


def check(ds: str, today: Summary, *, model_version: str, forced: bool, p) -> dict:
    """Compare today's summary with the latest table's; the record publish writes. ``refused``
    is True when a judged check broke, the run is not forced and ``ds`` is not a backfill."""
    found = latest_summary(today.limit)
    if found is None:
        return {"ds": ds, "against": None, "checks": [], "breaches": [], "refused": False,
                "note": "nothing published yet: no table to compare with"}
    pointer, old, old_items = found
    result = compare(today, len(today.items), old, old_items,
                     same_family=family(model_version) == family(pointer.get("model_version")),
                     p=p)
    backfill = ds < pointer["ds"]
    refused = bool(result["breaches"]) and not forced and not backfill
    note = None
    if result["breaches"] and forced:
        note = "forced: published despite the breaches"
    elif result["breaches"] and backfill:
        note = f"a backfill (latest is ds={pointer['ds']}): recorded, not refused"
    return {"ds": ds, "against": {"ds": pointer["ds"], "publish_id": pointer.get("publish_id"),
                                  "model_version": pointer.get("model_version")},
            "model_version": model_version, **result, "refused": refused, "forced": forced,
            "note": note}
