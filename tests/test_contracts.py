"""The contracts between files: suites vs schema, dvc.yaml vs the params each module reads."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from nightrec.core import schema, settings

ROOT = Path(__file__).resolve().parents[1]
SUITES = sorted((ROOT / "expectations").glob("*.json"))


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_every_expectation_in_each_suite_is_loaded(path):
    from nightrec.tasks.validate import load_suite

    spec = json.loads(path.read_text())
    assert len(load_suite(path).expectations) == len(spec["expectations"]) > 0


def test_load_suite_refuses_a_suite_ge_would_shorten(tmp_path):
    from nightrec.tasks.validate import ContractError, load_suite

    bad = {"name": "bad", "expectations": [
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "user_id"}},
        {"type": "expect_column_values_to_be_purple", "kwargs": {"column": "user_id"}}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(Exception) as exc:
        load_suite(tmp_path / "bad.json")
    assert exc.type is ContractError or "purple" in str(exc.value)


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_suites_use_schema_column_names(path):
    """Table suites name schema columns; the drift suite names drift's checks, every one."""
    from nightrec.tasks import drift

    names = {v for k, v in vars(schema).items() if k.isupper() and isinstance(v, str)}
    used = set()
    for e in json.loads(path.read_text())["expectations"]:
        kw = e["kwargs"]
        used.update([kw["column"]] if "column" in kw else [])
        used.update(kw.get("column_list", []) + kw.get("column_set", []))
    if path.name == "drift.json":
        assert used == set(drift.CHECKS)
    else:
        assert used and used <= names


def test_clean_suite_fails_on_broken_data_and_names_the_expectation():
    from nightrec.tasks.validate import check_contract, describe_failure

    p = settings.step_params(importlib.import_module("nightrec.tasks.validate").PARAMS)
    df = pd.DataFrame({"user_id": ["1", "1"], "item_id": ["a", "a"], "rating": [4.0, 9.0],
                       "timestamp": [1_780_000_000] * 2, "user_idx": [0, 0], "item_idx": [0, 0]})
    stats = {"invalid_fraction": 0.0, "by_reason": {}}
    report = check_contract(df, stats, ds="2026-11-28", p=p)
    assert report["success"] is False
    failed = {f["expectation"] for f in report["expectations"]["failures"]}
    assert {"unexpected_rows_expectation", "expect_column_values_to_be_between",
            "expect_table_row_count_to_be_between"} <= failed
    assert "unexpected_rows_expectation" in describe_failure(report)


def test_dvc_stages_list_exactly_the_params_their_modules_read():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = importlib.import_module(f"nightrec.tasks.{name}")
        assert sorted(stage["params"]) == sorted(module.PARAMS), name
        settings.step_params(module.PARAMS)  # every declared key exists in params.yaml


def test_step_params_refuses_undeclared_keys():
    p = settings.step_params(["split.test_fraction"])
    with pytest.raises(KeyError):
        p["split.valid_fraction"]


@pytest.mark.parametrize("bad", ["2026-13-01", "2026-02-30", "../2026-11-28", "2026-11-28/x",
                                 "20261128", "", None, "２０２６-11-28"])
def test_ds_is_checked_before_any_key_is_built(bad):
    from nightrec.store import layout

    with pytest.raises(ValueError):
        layout.recs_prefix(bad)


def test_dvc_stages_list_the_code_they_run():
    """Each stage's deps name its module and every nightrec module that importing it loads (what
    ``python -m nightrec.tasks.<stage>`` runs), so a code change reruns the stage
    (tests/test_dvc.py shows it in a kept workspace)."""
    import subprocess
    import sys

    def source(module: str) -> str:
        parts = module.split(".")
        if parts[:2] == ["nightrec", "tasks"]:
            parts = ["tasks", *parts[2:]]
        path = ROOT.joinpath(*parts)
        return (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(
            ROOT).as_posix()

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        code = (f"import sys, nightrec.tasks.{name}; print(' '.join(sorted(m for m in "
                "sys.modules if m.split('.')[0] == 'nightrec')))")
        loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.split()
        files = {source(m) for m in loaded}
        deps = {d for d in stage["deps"] if d.endswith(".py")}
        assert files == deps, name
        assert all((ROOT / d).is_file() for d in deps)
