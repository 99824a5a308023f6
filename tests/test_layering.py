"""Imports point one way: dags/ may import tasks/, tasks/ never imports airflow."""

import ast
import itertools
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_tasks_source_never_imports_airflow():
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p) if m.split(".")[0] == "airflow")
        for p in (ROOT / "tasks").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_every_task_module_loads_no_airflow():
    modules = [p.stem for p in (ROOT / "tasks").glob("*.py") if p.stem != "__init__"]
    code = (
        "import sys\n"
        + "".join(f"import tasks.{m}\n" for m in modules)
        + "print(sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_dags_import_cleanly_with_no_warnings(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    ours = [w for w in caught if "dags/" in str(w.filename) or "Deprecat" in w.category.__name__]
    assert ours == [], [str(w.message) for w in ours]
    assert {"nightly_recommendations", "rescore_recommendations", "tune_hyperparameters"} <= set(
        bag.dag_ids)


def test_nightly_dag_structure(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("nightly_recommendations")
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.schedule == "0 2 * * *"
    order = ["ingest", "clean", "validate", "augment", "seen", "choose", "split", "train",
             "evaluate", "register", "plan_shards", "score", "publish", "promote"]
    assert set(order) | {"gate", "fallback", "load_model", "report"} == set(dag.task_ids)
    for up, down in itertools.pairwise(order):
        assert down in dag.get_task(up).downstream_task_ids, (up, down)
    assert "report" in dag.get_task("publish").downstream_task_ids
    # The champion moves only after publish: promote is downstream of both register and publish.
    assert {"register", "publish"} <= dag.get_task("promote").upstream_task_ids
    assert {"register", "fallback"} == dag.get_task("gate").downstream_task_ids
    assert "plan_shards" in dag.get_task("fallback").downstream_task_ids
    assert {"split", "load_model"} == dag.get_task("choose").downstream_task_ids
    assert "plan_shards" in dag.get_task("load_model").downstream_task_ids
    assert dag.get_task("score").is_mapped and not dag.get_task("publish").is_mapped
    assert dag.get_task("report").is_teardown
    for t in dag.tasks:
        assert t.retries >= 1 and t.execution_timeout is not None, t.task_id
        assert t.on_failure_callback, t.task_id
    assert dag.doc_md and "ds" in dag.params
