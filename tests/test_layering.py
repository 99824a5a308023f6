"""Imports point one way, and a file's folder says which way.

The rule (README, "Layout"): each role folder of the ``nightrec`` package may import only the
roles listed for it below, and only the third-party libraries its role needs. Airflow is
imported by ``dags/`` and ``nightrec/orchestration/`` alone; the published-table package
(``nightrec/table/``) needs nothing beyond the standard library, pyarrow, boto3 and
prometheus-client, so it installs alone (tests/test_reader_install.py installs it into a bare
virtualenv).
"""

import ast
import itertools
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# role -> the nightrec roles it may import (itself included). Lower rows never import upper ones.
MAY_IMPORT = {
    "table": {"table"},
    "core": {"core", "table"},
    "store": {"store", "core", "table"},
    "ml": {"ml", "core"},
    "tasks": {"tasks", "ml", "store", "core", "table"},
    "dev": {"dev", "ml", "store", "core", "table"},
    "ops": {"ops", "tasks", "dev", "ml", "store", "core", "table"},
    "orchestration": {"orchestration", "ops", "tasks", "ml", "store", "core", "table"},
}
# Third-party imports a role may not make (anywhere in the file, lazy imports included).
HEAVY = {"airflow", "tensorflow", "keras", "dvc", "great_expectations", "optuna", "faiss"}
NEVER = {
    "table": HEAVY | {"pandas", "numpy", "yaml", "scipy", "numba", "s3fs"},
    "core": HEAVY | {"boto3", "botocore"},
    "store": HEAVY,
    "ml": {"airflow", "dvc", "great_expectations", "boto3", "botocore", "optuna"},
    "tasks": {"airflow"},
    "dev": {"airflow", "dvc", "great_expectations"},
    "ops": {"airflow"},
    "orchestration": set(),
}


def _role(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    if rel[0] == "tasks":
        return "tasks"
    assert rel[0] == "nightrec"
    return rel[1] if len(rel) > 2 else "core"  # nightrec/__init__.py imports nothing anyway


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update([node.module] + [f"{node.module}.{a.name}" for a in node.names])
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; write the role out")
    return names


def _our_role(module: str) -> str | None:
    """``nightrec.store.layout`` -> ``store``; None for anything not ours."""
    parts = module.split(".")
    if parts[0] != "nightrec":
        return None
    return parts[1] if len(parts) > 1 else "core"


def _sources() -> list[Path]:
    return sorted([*(ROOT / "nightrec").rglob("*.py"), *(ROOT / "tasks").rglob("*.py")])


def test_every_file_imports_only_what_its_folder_may():
    offenders = {}
    for path in _sources():
        role = _role(path)
        for module in _imported_modules(path):
            top = module.split(".")[0]
            ours = _our_role(module)
            if top in ("tasks", "orchestration"):
                bad = "the old top-level name"
            elif ours is not None and ours not in MAY_IMPORT[role] and ours in MAY_IMPORT:
                bad = f"role {ours!r} is not below {role!r}"
            elif top in NEVER[role]:
                bad = f"{top} is not for the {role!r} folder"
            else:
                continue
            offenders.setdefault(str(path.relative_to(ROOT)), []).append(f"{module}: {bad}")
    assert offenders == {}


def test_the_rule_covers_every_folder():
    folders = {p.name for p in (ROOT / "nightrec").iterdir() if p.is_dir() and p.name[0] != "_"}
    assert folders | {"tasks"} == set(MAY_IMPORT)
    for role, allowed in MAY_IMPORT.items():  # the rule has no cycles: a strict order
        for other in allowed - {role}:
            assert role not in MAY_IMPORT[other], (role, other)


def test_the_rule_catches_a_wrong_import(tmp_path, monkeypatch):
    """The checker itself: a table module importing the store, or a step importing airflow."""
    fake = tmp_path / "nightrec" / "table" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from nightrec.store import storage\nimport pandas\n")
    step = tmp_path / "tasks" / "y.py"
    step.parent.mkdir()
    step.write_text("def f():\n    from airflow.sdk import task\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    try:
        test_every_file_imports_only_what_its_folder_may()
    except AssertionError as e:
        message = str(e)
    else:
        raise AssertionError("the layering check passed a wrong import")
    assert "nightrec/table/x.py" in message and "pandas" in message
    assert "tasks/y.py" in message and "airflow" in message


def test_importing_every_module_outside_orchestration_loads_no_airflow():
    modules = [f"nightrec.tasks.{p.stem}" for p in (ROOT / "tasks").glob("*.py")
               if p.stem != "__init__"]
    modules += [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in
                (ROOT / "nightrec").rglob("*.py")
                if p.stem != "__init__" and "orchestration" not in p.parts]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print(sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_the_old_generic_import_names_are_gone():
    """``tasks`` and ``orchestration`` were top-level import names that any other project's
    ``tasks`` (Celery's convention) shadowed. Outside the checkout they do not import."""
    for name in ("tasks", "orchestration"):
        out = subprocess.run([sys.executable, "-c", f"import {name}"], cwd="/",
                             capture_output=True, text=True)
        assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, name
    out = subprocess.run([sys.executable, "-c", "import nightrec.tasks.clean"], cwd="/",
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


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
    order = ["ingest", "clean", "validate", "augment", "plan_split", "split_bucket", "split",
             "train", "evaluate", "register", "plan_shards", "score", "publish", "promote"]
    assert set(order) | {"seen", "choose", "gate", "fallback", "load_model", "report",
                         "realized"} == set(dag.task_ids)
    for up, down in itertools.pairwise(order):
        assert down in dag.get_task(up).downstream_task_ids, (up, down)
    assert "seen" in dag.get_task("validate").downstream_task_ids  # beside augment
    assert {"seen"} == dag.get_task("choose").upstream_task_ids
    assert {"choose", "fallback", "plan_shards"} <= dag.get_task("seen").downstream_task_ids
    assert "report" in dag.get_task("publish").downstream_task_ids
    # realized quality: after validate, beside the rest, before the report
    assert {"validate"} == dag.get_task("realized").upstream_task_ids
    assert {"report"} == dag.get_task("realized").downstream_task_ids
    # The champion moves only after publish: promote is downstream of both register and publish.
    assert {"register", "publish"} <= dag.get_task("promote").upstream_task_ids
    assert {"register", "fallback"} == dag.get_task("gate").downstream_task_ids
    assert "plan_shards" in dag.get_task("fallback").downstream_task_ids
    assert {"plan_split", "load_model"} == dag.get_task("choose").downstream_task_ids
    assert "split" in dag.get_task("augment").downstream_task_ids  # DVC's input, the buckets
    assert dag.get_task("split_bucket").is_mapped and not dag.get_task("split").is_mapped
    assert "plan_shards" in dag.get_task("load_model").downstream_task_ids
    assert dag.get_task("score").is_mapped and not dag.get_task("publish").is_mapped
    assert dag.get_task("report").is_teardown
    for t in dag.tasks:
        assert t.retries >= 1 and t.execution_timeout is not None, t.task_id
        assert t.on_failure_callback, t.task_id
    assert dag.doc_md and "ds" in dag.params
