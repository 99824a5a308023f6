"""Run one DAG for one ds through Airflow in this process (``dag.test()``), and report.

Called by ``nightrec run`` in a subprocess, so Airflow's settings are in the environment before
Airflow is imported. Writes ``--result-file`` (JSON) at the end: the run's state, each task's
state, and the first failed task with its error. Exit 0 only on success.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def airflow_env(state: Path) -> dict[str, str]:
    home = state / "airflow"
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": os.environ.get(
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{home}/airflow.db"
        ),
    }


def ensure_db(state: Path) -> None:
    home = state / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    marker = home / ".migrated"
    if marker.exists():
        return
    airflow = str(Path(sys.executable).parent / "airflow")
    subprocess.run([airflow, "db", "migrate"], check=True, stdout=subprocess.DEVNULL)
    marker.write_text("ok")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dag-id", default="nightly_recommendations")
    parser.add_argument("--ds", required=True)
    parser.add_argument("--conf", default="{}", help="JSON run conf (params)")
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--result-file", required=True, type=Path)
    args = parser.parse_args(argv)
    for k, v in airflow_env(args.state).items():
        os.environ.setdefault(k, v)
    ensure_db(args.state)

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    if bag.import_errors:
        print(f"DAG import errors: {bag.import_errors}", file=sys.stderr)
        return 2
    dag = bag.get_dag(args.dag_id)
    conf = {**json.loads(args.conf), "ds": args.ds}
    logical = dt.datetime.fromisoformat(args.ds).replace(hour=2, tzinfo=dt.UTC)
    dr = dag.test(logical_date=logical, run_conf=conf)
    states = {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}
    result = {"dag_id": args.dag_id, "run_id": dr.run_id, "state": str(dr.state), "tasks": states}
    failed = [t for t, s in states.items() if s in ("failed", "upstream_failed")]
    if failed:
        sys.path.insert(0, str(ROOT))
        from tasks.alerts import read_failure

        alert = read_failure(dr.run_id) or {}
        result["failed_task"] = alert.get("task_id") or failed[0]
        result["error"] = alert.get("error", "see the task log above")
    args.result_file.write_text(json.dumps(result))
    return 0 if result["state"] == "success" and states.get("publish") == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
