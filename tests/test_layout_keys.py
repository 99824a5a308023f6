"""Every object key comes from the layout module (nightrec/store/layout.py) or, for the published
table's own keys, from the table contract (nightrec/table/contract.py), which layout builds on.

The check reads the source (comments and docstrings aside) of every other module of the package
and the steps, and fails on any of the ways a key used to be built by hand:
- ``storage.s3_uri(...)`` (a key turned into a URI) outside the store and table folders;
- a string that starts with one of the store's top-level folders (``runs/``, ``models/``...);
- a URI plus a literal file name (``prefix + "meta.json"``), or ``storage.join(x, "meta.json")``.
A file name handed to layout itself (``layout.run_uri(ds, "clean", "stats.json")``) is fine: the
folder it lands in is layout's.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY_MODULES = {"nightrec/store/layout.py", "nightrec/table/contract.py"}
# storage turns keys into URIs; the table package reads through its own objects module
URI_MODULES = {"nightrec/store/storage.py"} | {
    p.relative_to(ROOT).as_posix() for p in (ROOT / "nightrec" / "table").glob("*.py")}
ROOTS = ("runs/", "models/", "recommendations/", "staging/", "state/", "audit/", "raw/",
         "alerts/", "reports/", "dvcstore")
FILE_NAME = re.compile(r"^[\w.-]*\.(json|parquet|html|csv|npz|h5|lock|dir)$")


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _text(node: ast.AST) -> str | None:
    """A string literal's text; an f-string's literal parts with ``{}`` for each field."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def key_problems(path: Path, rel: str) -> list[str]:
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)  # and f-strings' literal parts, read with their f-string:
    docs |= {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            if name == "s3_uri" and rel not in URI_MODULES | KEY_MODULES:
                found.append(f"{rel}:{line}: storage.s3_uri outside layout")
            if name == "join" and isinstance(node.func.value, ast.Name) and \
                    node.func.value.id == "storage" and any(
                        (t := _text(a)) is not None for a in node.args[1:]):
                found.append(f"{rel}:{line}: storage.join with a literal ({t!r})")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            for side in (node.left, node.right):
                t = _text(side)
                if t is not None and (FILE_NAME.match(t) or re.match(r"^/?\w[\w.-]*/", t)):
                    found.append(f"{rel}:{line}: a key built by '+' ({t!r})")
        if id(node) in docs:
            continue
        t = _text(node)
        if t is not None and t.startswith(ROOTS):
            found.append(f"{rel}:{line}: a literal key {t!r}")
    return sorted(set(found), key=lambda p: int(p.split(":")[1]))


def _sources() -> dict[str, Path]:
    paths = [*(ROOT / "nightrec").rglob("*.py"), *(ROOT / "tasks").rglob("*.py")]
    return {p.relative_to(ROOT).as_posix(): p for p in sorted(paths)}


def test_no_object_key_is_built_outside_the_layout_module():
    problems = [p for rel, path in _sources().items() if rel not in KEY_MODULES
                for p in key_problems(path, rel)]
    assert problems == []


def test_the_check_finds_each_way_a_key_was_built_by_hand(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        '"""Docstrings may say runs/ds=<ds>/ freely."""\n'
        "def f(ds, prefix, v):\n"
        '    a = storage.s3_uri(f"reports/ds={ds}/")\n'
        '    b = prefix + "meta.json"\n'
        '    c = storage.join(prefix, "history.json")\n'
        '    d = f"models/{v}/"\n'
        '    e = layout.run_uri(ds, "clean", "stats.json")  # fine: layout places it\n'
    )
    found = key_problems(bad, "tasks/bad.py")
    assert [p.split(":")[1] for p in found] == ["3", "3", "4", "5", "6"], found
