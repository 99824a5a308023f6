"""Airflow-side helpers for the DAG files in dags/: params, default args, callbacks, assets.

This package may import Airflow; ``tasks/`` never does. DAG files import from here and from
``tasks`` (inside tasks), and hold nothing but wiring.
"""
