"""nightrec's importable package: one module per pipeline step, plus shared plumbing.

Orchestration lives in ``dags/``; nothing here imports Airflow (``tests/test_layering.py``).
Each step module has a pure core, a ``run(...)`` that reads and writes URIs (local paths or
``s3://``), and a ``main()`` that ``dvc.yaml`` calls.
"""
