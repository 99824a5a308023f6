"""Column names and dtypes shared by every step, the expectation suites and the published table.

Change a name here and ``tests/test_expectations.py`` tells you which suite still uses the old one.
The published table's columns are the table contract's (nightrec/table/contract.py), named here
too so that every step keeps one import for column names.
"""

from nightrec.table import contract

USER_ID = contract.USER_ID
ITEM_ID = contract.ITEM_ID
RATING = "rating"
TIMESTAMP = "timestamp"  # int64 unix seconds, UTC

USER_IDX = "user_idx"  # dense 0..n_users-1 index given by clean
ITEM_IDX = "item_idx"
LABEL = "label"
WEIGHT = "weight"
SPLIT = "split"

REASON = "reason"  # quarantine reason code
RAW_ROW = "raw_row"  # where the row is in SOURCE_FILE: text, 1-based line; Parquet, 1-based row
SOURCE_FILE = "source_file"  # the raw object's name under raw/interactions/ds=<ds>/
PARSE_ERROR = "parse_error"  # a reason code ingest already knows (bad field count, encoding)
RAW_TEXT = "raw_text"  # the raw line, kept only for rows ingest could not split into fields


def positive_columns(frame, columns: list[str]) -> list:
    """``columns`` of ``frame``'s positive rows (label 1) as numpy arrays; a frame whose every
    row is positive gives views, not copies. A frame without a label column is all positives
    (train reads no label column when the split's statistics say every label is 1), and a
    missing ``weight`` column reads as 1."""
    import numpy as np

    def col(c):
        if c == WEIGHT and c not in frame:
            return np.ones(len(frame), np.float32)
        return frame[c].to_numpy()

    pos = None if LABEL not in frame else frame[LABEL].to_numpy() == 1
    if pos is None or pos.all():
        return [col(c) for c in columns]
    return [col(c)[pos] for c in columns]


def positives(frame):
    """``frame``'s positive rows (the frame itself when it has no label column: see
    :func:`positive_columns`)."""
    return frame if LABEL not in frame else frame[frame[LABEL] == 1]


# What replaces an erased user's id where a row must stay (nightrec/ops/retention.py): "~" is in no id
# the default clean.id_pattern accepts, so it never names a real user. Scoring skips such users.
FORGOTTEN_PREFIX = "~forgotten:"

RANK = contract.RANK
SCORE = contract.SCORE
MODEL_VERSION = contract.MODEL_VERSION
DS = contract.DS

INTERACTION_COLUMNS = [USER_ID, ITEM_ID, RATING, TIMESTAMP]
# Ingest's output: the interaction columns as raw strings, plus where each row came from.
RAW_COLUMNS = [*INTERACTION_COLUMNS, SOURCE_FILE, RAW_ROW, PARSE_ERROR, RAW_TEXT]

RECOMMENDATION_COLUMNS = list(contract.COLUMNS)

# Input column names (lower-cased, spaces as '_') that mean a schema column.
COLUMN_ALIASES = {
    USER_ID: ("user_id", "userid", "user", "uid", "customer_id", "visitorid", "visitor_id"),
    ITEM_ID: ("item_id", "itemid", "item", "movie_id", "movieid", "product_id", "iid"),
    RATING: ("rating", "score", "value"),
    TIMESTAMP: ("timestamp", "ts", "time", "event_time", "unix_timestamp", "datetime"),
}

# Quarantine reason codes, in precedence order: a row failing several rules gets the first.
# "Invalid" reasons count towards validate.max_invalid_fraction; policy reasons (duplicates,
# k-core) are normal hygiene and do not. README "Quarantine reason codes" explains each.
REASON_FIELD_COUNT = "wrong_field_count"
REASON_ENCODING = "invalid_encoding"
REASON_REPEATED_HEADER = "repeated_header"
REASON_MISSING_FIELD = "missing_field"
REASON_UNPARSEABLE_ID = "unparseable_id"
REASON_NOT_FINITE = "not_finite"
REASON_UNPARSEABLE = "unparseable_value"
REASON_RATING_RANGE = "rating_out_of_range"
REASON_TIMESTAMP_RANGE = "timestamp_out_of_range"
REASON_NOT_IN_CATALOGUE = "item_not_in_catalogue"
REASON_DUPLICATE = "duplicate_event"
REASON_KCORE = "below_k_core"
REASONS = (
    REASON_FIELD_COUNT,
    REASON_ENCODING,
    REASON_REPEATED_HEADER,
    REASON_MISSING_FIELD,
    REASON_UNPARSEABLE_ID,
    REASON_NOT_FINITE,
    REASON_UNPARSEABLE,
    REASON_RATING_RANGE,
    REASON_TIMESTAMP_RANGE,
    REASON_NOT_IN_CATALOGUE,
    REASON_DUPLICATE,
    REASON_KCORE,
)
INVALID_REASONS = frozenset(REASONS) - {REASON_DUPLICATE, REASON_KCORE}
