"""nightrec: nightly batch recommendations (Airflow 3, DVC, Great Expectations, Keras 3, S3).

Importing ``nightrec`` loads nothing: each role folder is imported on its own, so a reader-only
install (``nightrec.table``) never pulls in the pipeline. The folders, and what each may import
(``tests/test_layering.py`` enforces it):

- ``nightrec.table``  the published-table contract, the reader and the HTTP endpoint
- ``nightrec.core``   settings (params.yaml, environment), column names, error types
- ``nightrec.store``  the object store, the key layout, leases, the embedded S3 server
- ``nightrec.ml``     model families, the top-K kernel, metrics: pure compute, no I/O
- ``nightrec.tasks``  the pipeline steps, one module per step (source folder: ``tasks/``)
- ``nightrec.ops``    the operator's side: cli, alerts, report, retention
- ``nightrec.dev``    sample-data generators and benchmark helpers
- ``nightrec.orchestration``  the Airflow-side helpers the DAG files share
"""
