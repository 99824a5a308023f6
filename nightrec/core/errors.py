"""Error kinds the orchestrator treats differently.

``PermanentError``: the input itself is wrong (a broken data contract, an unreadable snapshot).
Retrying cannot help, so the DAG fails such a task at once instead of spending its retries;
transient faults (S3 unavailable, a killed worker) raise anything else and are retried.
"""


class PermanentError(RuntimeError):
    """A failure that the same inputs will reproduce; do not retry."""
