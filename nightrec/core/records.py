"""What each DAG task hands the next: one frozen record per step, serialised as XCom JSON.

A step's ``run()`` takes the record of the step before it and returns its own. A record names
exactly the fields a later step may rely on, so a step never gets a dict that grew through the
DAG, and a field nobody sets is a ``TypeError`` where the record is built, not a ``KeyError``
three tasks later.

On the wire (XCom) a record is a JSON object: its fields plus ``"record": "<ClassName>"``.
``from_xcom`` refuses another record's JSON and any field it does not know, so a DAG wired to the
wrong upstream fails at the first task, with both names.

Fields hold URIs (``s3://...`` or local paths), small JSON values and, for models, the model
dict scoring takes (``embeddings``, ``users``, ``items`` URIs, ``model_version``,
``data_version``, optional ``holdout_embeddings``, ``train_cutoff``, ``metrics``, ``artifacts``,
``source``, ``source_reason``; nightrec/tasks/registry.py and score.py).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Self


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepRecord:
    """Base of every record: ``ds`` is the run's partition."""

    ds: str

    def to_xcom(self) -> dict[str, Any]:
        out = {"record": type(self).__name__}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_xcom() if isinstance(value, StepRecord) else value
        return out

    @classmethod
    def from_xcom(cls, data: dict[str, Any] | StepRecord) -> Self:
        if isinstance(data, cls):
            return data
        if isinstance(data, StepRecord):
            raise TypeError(f"{cls.__name__} expected, got a {type(data).__name__}")
        kind = data.get("record")
        if kind != cls.__name__:
            raise TypeError(f"{cls.__name__} expected, got XCom of {kind or 'no record'}: "
                            f"{sorted(data)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names - {"record"}
        if unknown:
            raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
        nested = _nested_records(cls)
        return cls(**{k: nested[k].from_xcom(v) if k in nested else v
                      for k, v in data.items() if k != "record"})


@functools.cache
def _nested_records(cls: type) -> dict[str, type[StepRecord]]:
    """The fields of ``cls`` that hold another record (rebuilt from their own XCom JSON)."""
    hints = typing.get_type_hints(cls)
    return {name: hint for name, hint in hints.items()
            if isinstance(hint, type) and issubclass(hint, StepRecord)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ingested(StepRecord):
    """ingest: the raw-string table of every line of the snapshot, and what it read."""

    interactions: str  # Parquet, raw strings plus file and line
    files: str  # JSON: files read, ignored, blank lines
    items: str | None = None  # the optional item catalogue (Parquet), as ingested
    users: str | None = None  # the optional user attributes (Parquet)
    started_at: str | None = None  # when the run began (ISO, UTC): the report's clock


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cleaned(StepRecord):
    """clean: the clean table and the quarantine (every raw row is in exactly one)."""

    interactions: str
    quarantine: str
    stats: str  # JSON: counts by reason, rows in and out
    raw: str  # ingest's raw-string table, which validate checks too
    items: str | None = None
    users: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Validated(StepRecord):
    """validate: the contract held (a broken one raises); the clean table is passed on."""

    interactions: str
    report: str  # JSON: every suite's result
    items: str | None = None
    users: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Augmented(StepRecord):
    """augment: labelled, weighted interactions and the side-feature tables."""

    interactions: str
    item_features: str
    user_features: str
    feature_encoding: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Seen(StepRecord):
    """seen: every interaction up to ds with valid ids (what is never recommended back)."""

    seen: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Split(StepRecord):
    """split: the three parts, as pushed to the DVC remote; ``data_version`` is their hash."""

    data_version: str
    train: str
    valid: str
    test: str
    item_features: str
    user_features: str
    feature_encoding: str
    validation: str  # JSON: the split suite's result
    meta: str  # JSON: ds, data_version, remote, split stats


@dataclasses.dataclass(frozen=True, kw_only=True)
class Trained(StepRecord):
    """train: the selection (holdout) fit, the shipped refit (``full``: on train + valid +
    test, or on train + valid: ``train.ship_fit``) and the fit evaluate gates (``gated_fit``:
    ``full``, ``holdout``, or ``gated``, a train + valid refit of its own: ``train.gate_fit``)."""

    model_version: str
    data_version: str
    chosen: str  # the model family selected on the valid split
    selection: dict  # per candidate: the valid metric, and why the chosen one won
    train_cutoff: int | None  # latest event (unix s) the shipped model saw
    full_embeddings: str  # the shipped fit
    holdout_embeddings: str  # the train-only selection fit
    gated_embeddings: str | None = None  # the fit evaluate gates on test (None: full_embeddings)
    gated_cutoff: int | None = None  # latest event (unix s) the gated fit saw
    gated_fit: str = "full"  # which fit gated_embeddings is: full, holdout or gated
    artifacts: dict  # per fit: embeddings, history, weights; the selection; TensorBoard logs
    split: Split  # the parts the fits came from (evaluate scores on them)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Evaluated(StepRecord):
    """evaluate: the metrics, the gate's verdict and the model dict the gate judged."""

    model: dict
    metrics: str
    blessed: bool
    gate: dict


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelChoice(StepRecord):
    """register, fallback or load_model: the one model this run scores."""

    model: dict
    registered: bool = False  # a new blessed model was registered (promote moves the champion)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scored(StepRecord):
    """score, every shard collected: the staged parts publish validates and makes visible."""

    run_key: str  # the run whose staging folder holds the parts
    shards: int
    parts: list[str]  # every shard's staged Parquet parts, in shard (user_id) order
    rows: int
    users: int
    user_kinds: dict | None  # users scored from the model, folded in, or given popular items
    top_k: int
    staging: str
    seen: str | None  # the seen table (the manifest's popular items come from it)
    model_version: str
    data_version: str
    metrics: str | None = None
    source: str = "model"  # model, champion_fallback, popularity_fallback, champion_rescore
    source_reason: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class RescorePlan(StepRecord):
    """rescore_recommendations' plan: the registered model to score ds with, and ds's seen table."""

    model: dict
    seen: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Published(StepRecord):
    """publish: the committed manifest (None on a dry run) and whether latest moved to it."""

    manifest: str | None
    rows: int
    users: int | None = None
    publish_id: str | None = None
    latest_moved: bool = False
    dry_run: bool = False
    expired: list[str] = dataclasses.field(default_factory=list)  # ds partitions retention removed

