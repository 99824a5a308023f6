"""Column names and dtypes shared by every step, the expectation suites and the published table.

Change a name here and ``tests/test_expectations.py`` tells you which suite still uses the old one.
"""

USER_ID = "user_id"
ITEM_ID = "item_id"
RATING = "rating"
TIMESTAMP = "timestamp"  # int64 unix seconds, UTC

USER_IDX = "user_idx"  # dense 0..n_users-1 index given by clean
ITEM_IDX = "item_idx"
LABEL = "label"
WEIGHT = "weight"
SPLIT = "split"

REASON = "reason"  # quarantine reason code
RAW_ROW = "raw_row"  # 0-based row number in the ingested snapshot
SOURCE_FILE = "source_file"

RANK = "rank"
SCORE = "score"
MODEL_VERSION = "model_version"
DS = "ds"

INTERACTION_COLUMNS = [USER_ID, ITEM_ID, RATING, TIMESTAMP]
RECOMMENDATION_COLUMNS = [USER_ID, RANK, ITEM_ID, SCORE, MODEL_VERSION, DS]

# Quarantine reason codes. "Invalid" reasons count towards validate.max_invalid_fraction;
# policy reasons (duplicates, k-core) are normal hygiene and do not.
REASON_MISSING_FIELD = "missing_field"
REASON_UNPARSEABLE = "unparseable_value"
REASON_NOT_FINITE = "not_finite"
REASON_RATING_RANGE = "rating_out_of_range"
REASON_TIMESTAMP_RANGE = "timestamp_out_of_range"
REASON_DUPLICATE = "duplicate_event"
REASON_KCORE = "below_k_core"
INVALID_REASONS = frozenset(
    {
        REASON_MISSING_FIELD,
        REASON_UNPARSEABLE,
        REASON_NOT_FINITE,
        REASON_RATING_RANGE,
        REASON_TIMESTAMP_RANGE,
    }
)
