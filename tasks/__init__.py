"""The pipeline steps, one module per step, installed as ``nightrec.tasks`` (README, "Layout").

Each step module has a pure core with keyword-only parameters and a ``run(record)`` that reads
the previous step's record (``nightrec.core.records``), reads and writes URIs (``s3://`` or
local paths) and returns its own record. Steps may import ``nightrec.ml``, ``store``, ``core`` and
``table``, never Airflow (``tests/test_layering.py``); the DAG files in ``dags/`` only wire them.
"""
