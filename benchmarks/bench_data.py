"""Data stages at scale: ingest, clean, validate, augment, seen and split (DVC repro + push) on a
generated snapshot, each stage's ``run()`` in its own process, against a private SeaweedFS; with
``--baseline DIR``, the same stages of another checkout (the pandas version before issue 14) on
the same snapshot, back to back, and the ratios.

    .venv/bin/python benchmarks/bench_data.py --baseline /work/wt/baseline \\
        --json-out /tmp/bench-data-10m.json                 # 10M events, 200k users x 20k items
    .venv/bin/python benchmarks/bench_data.py --rows 100000000 --users 2000000 --items 100000 \\
        --files 8 --format parquet --baseline /work/wt/baseline \\
        --reference /tmp/bench-data-10m.json               # 100M; the baseline is skipped (30M cap)
    .venv/bin/python benchmarks/bench_data.py --rows 1000000 --baseline /work/wt/baseline  # a look

The snapshot (``nightrec/dev/bench_data_gen.py``) is generated once, seeded and one file at a
time, into the work folder: log-normal user activity, Zipf items, ratings 1..5, timestamps over
the 200 days before ds, a ``--bad-fraction`` of malformed rows, as ``--files`` CSV or Parquet
parts plus item and user side tables. Its generation is timed and not counted.

Each checkout then gets, in turn (the baseline first), a fresh SeaweedFS and state folder; the
snapshot is uploaded to ``raw/.../ds=<ds>/`` (not counted), and each stage runs as
``<checkout>/.venv/bin/python bench_data.py --stage S`` with ``PYTHONPATH`` and ``NIGHTREC_HOME``
at that checkout (the child checks that ``nightrec`` and ``nightrec.tasks`` were imported from
there). A stage gets its upstream's record as the DAG hands it over: the ``to_xcom()`` JSON,
rebuilt with ``records.<its "record">.from_xcom``; its fields pass through untouched, so the two
versions may differ in them. The DAG's wiring: clean <- ingest, validate <- clean,
augment <- validate, seen <- validate, split (``tasks/versioning.run``) <- augment.

Per stage:

- **wall**: ``run()`` alone (the stage module imported before the clock starts; what ``run()``
  imports lazily, Great Expectations say, counts); **process**: the stage process's lifetime;
- **CPU**: user + sys of the stage's process tree (``os.wait4`` on the stage process: it and
  every descendant it waited for; DVC runs the split in grandchildren) less what the process
  spent before ``run()`` (interpreter start and imports);
- **peak RSS**: the stage's process tree summed, sampled with psutil every ~0.2 s; imports
  included, the S3 server not (its own peak is printed apart). Cross-checks: the stage process's
  own ``VmHWM`` and the largest waited-for descendant's (``RUSAGE_CHILDREN``), and ``wait4``'s.

A stage whose tree passes a memory cap (``--baseline-mem-cap-gb``, default 16, for the baseline;
``--mem-cap-gb`` for the current checkout, off by default) is killed (SIGKILL to its process
group), reported as such, and the stages that need its output are not run. At 0.2 s a sample,
a fast allocation can pass the cap by a little before the kill. Above ``--baseline-max-rows``
(default 30M) the baseline is not run at all: the pandas version needs ~0.5 GB per million events.

Targets (issue 14): 10M: <= 2 min in all (the six stages' ``run()`` wall, summed; their process
lifetimes are printed beside) and <= 1.5 GB per stage. 100M (``--rows`` >= 50M selects these):
<= 25 min through split, each stage <= 4 GB; with ``--reference`` (a 10M run's ``--json-out``),
also <= 1.5x that run's peak for the same stage. Other sizes are held to the 10M targets as a bar.
The comparison also checks that ingest, clean, seen and split produced the same row counts in
both checkouts (the rules must not change with the engine).

Wall times on a shared 2-core machine carry noise (other work's load); CPU seconds are steadier.
At 50k rows the six stages still take ~50 s of wall: validate (Great Expectations' import and
Data Docs, ~13 s) and split (DVC prepare, repro, push and the split suite, ~27 s) are mostly
fixed costs.

Params: each checkout's own params.yaml, as shipped; every ``--set key=value`` (YAML value,
applied to both checkouts where the key's section exists) is printed, and the data steps'
params in effect are printed per checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DS = "2026-11-28"
# (stage, the stage whose record it takes): the DAG's wiring (dags/nightly_recommendations.py)
STAGES = (("ingest", None), ("clean", "ingest"), ("validate", "clean"), ("augment", "validate"),
          ("seen", "validate"), ("split", "augment"))
MODULES = {"split": "versioning"}
COUNTED = ("ingest", "clean", "seen", "split")  # their row counts must not change with the code  # the split stage's run() (DVC repro + push) lives there
PARAM_SECTIONS = ("resources", "ingest", "clean", "validate", "augment", "split")
TARGETS = {
    "10M": {"total_s": 2 * 60.0, "stage_gb": 1.5},
    "100M": {"total_s": 25 * 60.0, "stage_gb": 4.0},
}
REFERENCE_FACTOR = 1.5  # a stage's peak at 100M against its peak at 10M (--reference)
GB = 2**30
MB = 2**20
SAMPLE_S = 0.2


# ---------------------------------------------------------------------------- child modes
# Run by a checkout's own .venv python, with PYTHONPATH and NIGHTREC_HOME at that checkout: they
# import nothing from the checkout this script lives in.

def _code_root() -> Path:
    return Path(os.environ["NIGHTREC_HOME"]).resolve()


def _check_origin(*modules) -> None:
    """A stage must run the code of the checkout it is measured for, not this script's."""
    code = _code_root()
    for m in modules:
        path = Path(m.__file__).resolve()
        if not path.is_relative_to(code):
            raise SystemExit(f"{m.__name__} imported from {path}, not from {code}: "
                             "PYTHONPATH or the venv's editable install points elsewhere")


def _vm_hwm_kb() -> int:
    """This process's own peak RSS. Not ``ru_maxrss``: Linux carries that over from the parent
    across fork and exec, so a child would report at least its parent's RSS at fork time."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cpu_s(*whos: int) -> float:
    return sum(getattr(resource.getrusage(who), f) for who in whos
               for f in ("ru_utime", "ru_stime"))


def run_stage(stage: str, upstream_file: Path | None, out_file: Path,
              phase: str | None = None, phase_input: Path | None = None) -> None:
    """Child mode: run one stage's ``run()`` on its upstream's record; write its record and
    figures to ``out_file``. For the split, ``phase`` runs one of the processes the DAG runs
    instead: ``plan`` (the bucket specs), ``bucket`` (one mapped bucket, its spec in
    ``phase_input``) or ``finish`` (the reduce, the buckets' results in ``phase_input``)."""
    import importlib
    import logging

    import nightrec
    from nightrec.core import records

    logging.basicConfig(level=logging.INFO, format="%(asctime)s.%(msecs)03d %(name)s %(message)s",
                        datefmt="%H:%M:%S")

    module = importlib.import_module(f"nightrec.tasks.{MODULES.get(stage, stage)}")
    _check_origin(nightrec, records, module)
    record = None
    if stage != "ingest":  # the upstream step's record, as the DAG hands it over (XCom JSON)
        upstream = json.loads(upstream_file.read_text())
        record = getattr(records, upstream["record"]).from_xcom(upstream)
    cpu_before = _cpu_s(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    if phase == "plan":
        result = module.plan(record)
    elif phase == "bucket":
        result = module.run_bucket(json.loads(phase_input.read_text()))
    elif phase == "finish":
        result = module.finish(record, json.loads(phase_input.read_text()))
    else:
        result = module.run(DS) if record is None else module.run(record)
    wall = time.perf_counter() - started
    cpu = _cpu_s(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) - cpu_before
    out_file.write_text(json.dumps({
        "out": result.to_xcom() if hasattr(result, "to_xcom") else result, "wall_s": wall, "cpu_before_s": cpu_before, "self_cpu_s": cpu,
        "vm_hwm_mb": _vm_hwm_kb() / 1024,
        "children_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "module": module.__file__}, default=str))


def upload_snapshot(folder: Path) -> None:
    """Child mode: upload the generated snapshot to ``raw/<table>/ds=<DS>/`` of the S3 server
    the environment names, with the measured checkout's own storage and layout."""
    import nightrec
    from nightrec.store import layout, storage

    _check_origin(nightrec, storage)
    for f in sorted(folder.iterdir()):
        table = f.stem if f.stem in ("items", "users") else "interactions"
        storage.upload_from(f, layout.raw_prefix(DS, table) + f.name)


# ---------------------------------------------------------------------------- measuring

class TreeMonitor:
    """Samples the RSS of a process tree (and of the S3 server) every ``SAMPLE_S`` seconds;
    kills the tree's process group when it passes ``cap_bytes`` (0: no cap)."""

    def __init__(self, pid: int, weed_pid: int | None, cap_bytes: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.weed = psutil.Process(weed_pid) if weed_pid else None
        self.pid, self.cap = pid, cap_bytes
        self.peak = self.weed_peak = self.samples = 0
        self.series: list[tuple[float, int]] = []  # (unix time, tree RSS) about once a second
        self.killed_at = 0  # the sample that passed the cap, bytes
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from nightrec.dev.bench_scoring import tree_rss

        while not self._stop.is_set():
            rss = tree_rss(self.proc)
            self.samples += 1
            self.peak = max(self.peak, rss)
            if not self.series or time.time() - self.series[-1][0] >= 1.0 or rss > self.peak * 0.98:
                self.series.append((time.time(), rss))
            if self.weed is not None:
                try:
                    self.weed_peak = max(self.weed_peak, self.weed.memory_info().rss)
                except Exception:  # noqa: BLE001 - the server went away; the stage will fail
                    pass
            if self.cap and rss > self.cap and not self.killed_at:
                self.killed_at = rss
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._stop.wait(SAMPLE_S)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


def measure(cmd: list[str], *, env: dict, log: Path, weed_pid: int | None,
            cap_bytes: int) -> dict:
    """Run ``cmd`` in its own process group; its lifetime, the tree's CPU (wait4) and peaks."""
    with open(log, "w") as f:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        mon = TreeMonitor(proc.pid, weed_pid, cap_bytes)
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C here: do not leave a stage running in its own session
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            mon.stop()
            raise
        process_s = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        mon.stop()
    # the tree's RSS over time, beside the stage's log (whose lines carry the same clock)
    log.with_suffix(".rss.tsv").write_text("".join(
        f"{time.strftime('%H:%M:%S', time.localtime(t))}.{int(t % 1 * 1000):03d}\t{rss / MB:.0f}\n"
        for t, rss in mon.series))
    return {"rc": proc.returncode, "process_s": process_s,
            "tree_cpu_s": ru.ru_utime + ru.ru_stime, "wait4_maxrss_mb": ru.ru_maxrss / 1024,
            "peak_rss_mb": mon.peak / MB, "samples": mon.samples,
            "weed_peak_mb": mon.weed_peak / MB,
            "killed_at_mb": mon.killed_at / MB if mon.killed_at else None}


def _maps_split(code: Path) -> bool:
    """Whether the checkout's split is a map (plan, one task per bucket, finish), as the DAG runs
    it; the pandas version's is one ``run()``."""
    src = code / "tasks" / "versioning.py"
    return src.exists() and "def run_bucket(" in src.read_text()


def measure_mapped_split(base: list[str], out: Path, *, env: dict, vdir: Path,
                         weed_pid: int | None, cap_bytes: int) -> dict:
    """The split as the DAG runs it: a plan process, one process per bucket (each a mapped task
    instance, run here one after another: 2 cores) and the finish (the reduce). The figures are
    the stage's: lifetimes, wall and CPU summed, the peak the largest process's (each is its own
    task process in the DAG); ``mapped`` keeps each kind's figures. The finish writes ``out``."""
    runs: list[tuple[str, dict, dict]] = []

    def one(kind: str, extra: list[str], result: Path, log: str) -> dict | None:
        m = measure([*base, "--out", str(result), *extra], env=env, log=vdir / log,
                    weed_pid=weed_pid, cap_bytes=cap_bytes)
        if m["rc"] != 0 or m["killed_at_mb"]:
            if log != "split.log":
                shutil.copyfile(vdir / log, vdir / "split.log")
            return m
        runs.append((kind, m, json.loads(result.read_text())))
        return None

    plan_out = vdir / "split-plan.json"
    failed = one("plan", ["--phase", "plan"], plan_out, "split-plan.log")
    done = []
    if not failed:
        for i, spec in enumerate(json.loads(plan_out.read_text())["out"]):
            spec_file = vdir / f"split-bucket-{i:03d}.spec.json"
            spec_file.write_text(json.dumps(spec))
            res = vdir / f"split-bucket-{i:03d}.json"
            failed = one("bucket", ["--phase", "bucket", "--phase-input", str(spec_file)], res,
                         f"split-bucket-{i:03d}.log")
            if failed:
                break
            done.append(runs[-1][2]["out"])
    if not failed:
        done_file = vdir / "split-done.json"
        done_file.write_text(json.dumps(done))
        failed = one("finish", ["--phase", "finish", "--phase-input", str(done_file)], out,
                     "split.log")
    if failed:
        return failed
    ms = [m for _, m, _ in runs]
    kinds = {k: {"processes": sum(1 for kk, _, _ in runs if kk == k),
                 "peak_rss_mb": max(m["peak_rss_mb"] for kk, m, _ in runs if kk == k),
                 "wall_s": sum(c["wall_s"] for kk, _, c in runs if kk == k)}
             for k in ("plan", "bucket", "finish")}
    return {"rc": 0, "process_s": sum(m["process_s"] for m in ms),
            "tree_cpu_s": sum(m["tree_cpu_s"] for m in ms),
            "wait4_maxrss_mb": max(m["wait4_maxrss_mb"] for m in ms),
            "peak_rss_mb": max(m["peak_rss_mb"] for m in ms),
            "samples": sum(m["samples"] for m in ms),
            "weed_peak_mb": max(m["weed_peak_mb"] for m in ms), "killed_at_mb": None,
            "mapped": {"wall_s": sum(c["wall_s"] for _, _, c in runs),
                       "self_cpu_s": sum(c["self_cpu_s"] for _, _, c in runs),
                       "cpu_before_s": sum(c["cpu_before_s"] for _, _, c in runs),
                       "vm_hwm_mb": max(c["vm_hwm_mb"] for _, _, c in runs), "kinds": kinds}}


def _summary(stage: str, out: dict) -> str:
    """A line on what the stage produced, from the JSON it wrote (empty when the fields this
    reads are not there: the record's shape may differ between versions)."""
    from nightrec.store import layout, storage

    try:
        if stage == "ingest":
            return f"{storage.read_json(out['files'])['rows']:,} raw rows"
        if stage == "clean":
            s = storage.read_json(out["stats"])
            reasons = ", ".join(f"{v:,} {k}" for k, v in sorted(
                s["by_reason"].items(), key=lambda kv: -kv[1]))
            placed = s["clean_rows"] + s["quarantined_rows"] + s.get("forgotten_rows", 0)
            check = ("every raw row in clean or quarantine" if placed == s["raw_rows"] else
                     f"ROWS LOST: raw {s['raw_rows']:,} != {placed:,} placed")
            return (f"{s['clean_rows']:,} kept; quarantined {s['quarantined_rows']:,}: {reasons}"
                    f" ({check}: raw {s['raw_rows']:,})")
        if stage == "validate":
            suites = storage.read_json(out["report"])["suites"].values()
            return "contract holds: " + ", ".join(
                f"{s['suite']} {s['n_expectations']} expectations" for s in suites)
        if stage == "seen":
            s = storage.read_json(layout.run_uri(DS, "seen", "stats.json"))
            return f"{s['pairs']:,} pairs, {s['users']:,} users, {s['items']:,} items"
        if stage == "split":
            meta = storage.read_json(out["meta"])
            rows = meta["stats"]["rows"]
            timings = ", ".join(f"{k} {v:.1f} s" for k, v in meta.get("timings_s", {}).items())
            return ("train/valid/test " + "/".join(f"{rows[p]:,}" for p in ("train", "valid",
                                                                            "test"))
                    + (f"; {timings}" if timings else ""))
    except Exception as e:  # noqa: BLE001 - a summary, never a failure
        return f"(no summary: {type(e).__name__} {e})"
    return ""


# ---------------------------------------------------------------------------- params

def _parse_sets(items: list[str]) -> list[tuple[str, object]]:
    import yaml

    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: KEY=VALUE, e.g. resources.memory_gb=2")
        out.append((key, yaml.safe_load(value)))
    return out


def checkout_params(code: Path, sets: list[tuple[str, object]], dest: Path
                    ) -> tuple[dict, Path | None, list[str]]:
    """The checkout's params with the overrides that apply to it; the private params file
    (None: none applied, the shipped file is used) and the overrides it could not take."""
    import yaml

    params = yaml.safe_load((code / "params.yaml").read_text())
    skipped = []
    applied = 0
    for key, value in sets:
        node = params
        *parents, last = key.split(".")
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            skipped.append(key)
            continue
        node[last] = value
        applied += 1
    if not applied:
        return params, None, skipped
    dest.write_text(yaml.safe_dump(params, sort_keys=False))
    return params, dest, skipped


# ---------------------------------------------------------------------------- driver

def _git(code: Path) -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(code), *a], capture_output=True, text=True,
                              check=False).stdout.strip()
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") \
        else ""
    return f"{git('rev-parse', '--short', 'HEAD') or '?'} ({git('log', '-1', '--format=%s')[:60]})" \
        f"{dirty}"


def _python(code: Path) -> Path:
    py = code / ".venv" / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"{py} is missing: run `make setup` in {code}")
    return py


def _versions_line(py: Path) -> str:
    code = ("import importlib.metadata as m\n"
            "def v(p):\n"
            "    try:\n"
            "        return f'{p} {m.version(p)}'\n"
            "    except m.PackageNotFoundError:\n"
            "        return f'{p} -'\n"
            "print(', '.join(v(p) for p in ('pandas', 'pyarrow', 'duckdb', "
            "'great-expectations', 'dvc')))")
    return subprocess.run([str(py), "-c", code], capture_output=True, text=True,
                          check=False).stdout.strip()


def _dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def run_version(label: str, code: Path, *, snapshot: Path, work: Path, base_env: dict,
                params_file: Path | None, cap_gb: float) -> dict:
    """Fresh SeaweedFS and state for ``code``; upload the snapshot; run every stage."""
    from nightrec.store import s3server, storage

    py = _python(code)
    vdir = work / label
    vdir.mkdir()
    ports = s3server.free_port_pairs(5)
    cfg = s3server.ServerConfig(data_dir=vdir / "s3", s3_port=ports[0], master_port=ports[1],
                                volume_port=ports[2], filer_port=ports[3], admin_port=ports[4],
                                bucket="nightrec-bench")
    env = {**base_env, "PYTHONPATH": str(code), "NIGHTREC_HOME": str(code),
           "NIGHTREC_STATE": str(vdir / "state"), "NIGHTREC_BUCKET": cfg.bucket,
           "TMPDIR": str(vdir / "tmp")}
    (vdir / "tmp").mkdir()
    if params_file:
        env["NIGHTREC_PARAMS"] = str(params_file)
    res: dict = {"label": label, "code": str(code), "stages": []}
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the last server's: new ones
        os.environ.pop(k, None)
    os.environ["NIGHTREC_BUCKET"] = cfg.bucket  # s3server reads it
    s3server.up(cfg)
    try:
        env.update(s3server.client_env(cfg))
        os.environ.update({k: env[k] for k in ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                               "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                               "NIGHTREC_BUCKET")})
        storage._client.cache_clear()  # this process reads the stages' JSON from this server
        weed_pid = int(cfg.pid_file.read_text())
        script = str(Path(__file__).resolve())
        t0 = time.perf_counter()
        subprocess.run([str(py), script, "--upload", str(snapshot)], env=env, check=True)
        res["upload_s"] = time.perf_counter() - t0
        print(f"[{label}] {code} @ {_git(code)}: fresh SeaweedFS, snapshot uploaded in "
              f"{res['upload_s']:.0f} s (not counted)", flush=True)
        records: dict[str, Path] = {}
        stopped: str | None = None
        for stage, upstream in STAGES:
            row: dict = {"stage": stage}
            res["stages"].append(row)
            if stopped:
                row["status"] = f"not run ({stopped})"
                continue
            out = vdir / f"{stage}.json"
            base = [str(py), script, "--stage", stage]
            if upstream:
                base += ["--upstream", str(records[upstream])]
            if stage == "split" and _maps_split(code):
                m = measure_mapped_split(base, out, env=env, vdir=vdir, weed_pid=weed_pid,
                                         cap_bytes=int(cap_gb * GB))
            else:
                m = measure([*base, "--out", str(out)], env=env, log=vdir / f"{stage}.log", weed_pid=weed_pid,
                            cap_bytes=int(cap_gb * GB))
            row.update(m)
            if m["killed_at_mb"]:
                row["status"] = (f"killed at the {cap_gb:g} GB cap (tree at "
                                 f"{m['killed_at_mb'] / 1024:.2f} GB after "
                                 f"{m['process_s']:.0f} s)")
                stopped = f"{stage} killed at the memory cap"
            elif m["rc"] != 0:
                tail = (vdir / f"{stage}.log").read_text(errors="replace")[-3000:]
                why = ("killed by SIGKILL, not by this script: the kernel's OOM killer?"
                       if m["rc"] == -signal.SIGKILL else f"exit {m['rc']}")
                row["status"] = f"failed: {why}"
                print(f"[{label}] {stage} failed ({why}); log tail:\n{tail}", flush=True)
                stopped = f"{stage} failed"
            else:
                child = json.loads(out.read_text())
                if "mapped" in m:  # the finish's figures; wall and CPU over every process
                    child.update(wall_s=m["mapped"]["wall_s"],
                                 cpu_before_s=m["mapped"]["cpu_before_s"],
                                 self_cpu_s=m["mapped"]["self_cpu_s"],
                                 vm_hwm_mb=m["mapped"]["vm_hwm_mb"])
                records[stage] = vdir / f"{stage}.record.json"
                records[stage].write_text(json.dumps(child["out"]))
                row.update(status="ok", wall_s=child["wall_s"],
                           cpu_s=m["tree_cpu_s"] - child["cpu_before_s"],
                           self_cpu_s=child["self_cpu_s"], vm_hwm_mb=child["vm_hwm_mb"],
                           children_maxrss_mb=child["children_maxrss_mb"],
                           record=child["out"].get("record"),
                           summary=_summary(stage, child["out"]))
                if "mapped" in m:
                    row["mapped"] = m["mapped"]["kinds"]
                    row["summary"] += "; processes " + ", ".join(
                        f"{k} {v['processes']}x peak {v['peak_rss_mb']:.0f} MB"
                        for k, v in row["mapped"].items())
            _print_row(label, row)
        res["s3_bytes"] = _dir_bytes(cfg.data_dir)
        res["state_bytes"] = _dir_bytes(vdir / "state")
        res["weed_peak_mb"] = max((r.get("weed_peak_mb") or 0 for r in res["stages"]), default=0)
    finally:
        s3server.down(cfg)
        storage._client.cache_clear()
    return res


def _print_row(label: str, r: dict) -> None:
    if r.get("status") != "ok":
        print(f"[{label}] {r['stage']:9s} {r.get('status')}", flush=True)
        return
    print(f"[{label}] {r['stage']:9s} {r['wall_s']:7.1f} s (process {r['process_s']:6.1f} s, "
          f"CPU {r['cpu_s']:6.1f} s)  peak RSS {r['peak_rss_mb']:7.0f} MB  {r['summary']}",
          flush=True)


def _scale(rows: int) -> str:
    return "100M" if rows >= 50_000_000 else "10M"


def _target_note(r: dict, targets: dict, reference: dict | None) -> str:
    notes = []
    ok = r["peak_rss_mb"] / 1024 <= targets["stage_gb"]
    notes.append(f"{'ok' if ok else 'OVER'} <= {targets['stage_gb']:g} GB")
    if reference:
        ref = reference.get(r["stage"])
        if ref:
            x = r["peak_rss_mb"] / ref
            notes.append(f"{x:.2f}x ref {'ok' if x <= REFERENCE_FACTOR else 'OVER'}")
        else:
            notes.append("no ref")
    return ", ".join(notes)


def print_table(res: dict, targets: dict, reference: dict | None, with_targets: bool) -> None:
    print(f"\n{res['label']}: {res['code']}")
    if res.get("skipped"):
        print(f"  not run: {res['skipped']}")
        return
    head = (f"  {'stage':9s} {'wall s':>7s} {'proc s':>7s} {'CPU s':>7s} {'peak MB':>8s}"
            f" {'VmHWM/child/wait4 MB':>21s}  " + (f"{'target':30s} " if with_targets else "")
            + "what")
    print(head)
    for r in res["stages"]:
        if r.get("status") != "ok":
            print(f"  {r['stage']:9s} {r.get('status')}")
            continue
        cross = (f"{r['vm_hwm_mb']:.0f}/{r['children_maxrss_mb']:.0f}/"
                 f"{r['wait4_maxrss_mb']:.0f}")
        tgt = f"{_target_note(r, targets, reference):30s} " if with_targets else ""
        print(f"  {r['stage']:9s} {r['wall_s']:7.1f} {r['process_s']:7.1f} {r['cpu_s']:7.1f} "
              f"{r['peak_rss_mb']:8.0f} {cross:>21s}  {tgt}{r['summary']}")
    ok_rows = [r for r in res["stages"] if r.get("status") == "ok"]
    complete = len(ok_rows) == len(STAGES)
    wall = sum(r["wall_s"] for r in ok_rows)
    proc = sum(r["process_s"] for r in ok_rows)
    cpu = sum(r["cpu_s"] for r in ok_rows)
    peak = max((r["peak_rss_mb"] for r in ok_rows), default=0.0)
    line = (f"  {'total':9s} {wall:7.1f} {proc:7.1f} {cpu:7.1f} {peak:8.0f} (max)"
            + ("" if complete else "  (stages that ran)"))
    if with_targets:
        t_ok = complete and wall <= targets["total_s"]
        m_ok = complete and peak / 1024 <= targets["stage_gb"]
        line += (f"\n  targets: all stages' wall {wall / 60:.1f} min "
                 f"{'ok' if t_ok else 'MISSED'} <= {targets['total_s'] / 60:g} min (their "
                 f"processes {proc / 60:.1f} min); every stage's peak "
                 f"{'ok' if m_ok else 'MISSED'} <= {targets['stage_gb']:g} GB")
    print(line)
    print(f"  SeaweedFS peak RSS {res.get('weed_peak_mb', 0):.0f} MB (not counted); its data "
          f"{res.get('s3_bytes', 0) / GB:.2f} GiB, state folder "
          f"{res.get('state_bytes', 0) / GB:.2f} GiB at the end")


def _ratio_cell(c: float, b: float, digits: int) -> str:
    x = f"{c / b:5.2f}x" if b else "    -"
    return f"{c:7.{digits}f} / {b:7.{digits}f} ({x})"


def _counts(summary: str) -> str:
    """A summary's row counts, the timings left out: what must not change between versions."""
    return "" if summary.startswith("(no summary") else summary.split(";")[0] \
        if "train/valid/test" in summary else summary


def print_comparison(cur: dict, base: dict) -> None:
    print("\ncurrent vs baseline (current / baseline, and the ratio: < 1 is the current smaller)")
    if base.get("skipped"):
        print(f"  baseline not run: {base['skipped']}")
        return
    print(f"  {'stage':9s} {'wall s':>26s} {'CPU s':>26s} {'peak RSS MB':>26s}  counts")
    by = {r["stage"]: r for r in base["stages"]}
    both = []
    for r in cur["stages"]:
        b = by.get(r["stage"], {})
        if r.get("status") != "ok" or b.get("status") != "ok":
            print(f"  {r['stage']:9s} current: {r.get('status')}; baseline: {b.get('status')}")
            continue
        both.append((r, b))
        counts = (_counts(r["summary"]), _counts(b["summary"])) if r["stage"] in COUNTED \
            else ("", "")
        print(f"  {r['stage']:9s} {_ratio_cell(r['wall_s'], b['wall_s'], 1):>26s} "
              f"{_ratio_cell(r['cpu_s'], b['cpu_s'], 1):>26s} "
              f"{_ratio_cell(r['peak_rss_mb'], b['peak_rss_mb'], 0):>26s}  "
              + ("" if not any(counts) else "same" if counts[0] == counts[1] else
                 f"DIFFER: current {counts[0]!r}, baseline {counts[1]!r}"))
    if both:
        def total(i: int, k: str) -> float:
            return sum(pair[i][k] for pair in both)

        def peak(i: int) -> float:
            return max(pair[i]["peak_rss_mb"] for pair in both)

        print(f"  {'total':9s} {_ratio_cell(total(0, 'wall_s'), total(1, 'wall_s'), 1):>26s} "
              f"{_ratio_cell(total(0, 'cpu_s'), total(1, 'cpu_s'), 1):>26s} "
              f"{_ratio_cell(peak(0), peak(1), 0):>26s}   (peak: the largest stage's"
              + ("" if len(both) == len(STAGES) else "; stages both ran only") + ")")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--files", type=int, default=4, help="interaction files in the snapshot")
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv")
    parser.add_argument("--bad-fraction", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=20261128)
    parser.add_argument("--baseline", type=Path,
                        help="another checkout (with its own .venv) to run first, e.g. the "
                             "pandas version: /work/wt/baseline")
    parser.add_argument("--baseline-max-rows", type=int, default=30_000_000,
                        help="above this many rows the baseline is not run")
    parser.add_argument("--baseline-mem-cap-gb", type=float, default=16.0,
                        help="a baseline stage whose process tree passes this is killed")
    parser.add_argument("--mem-cap-gb", type=float, default=0.0,
                        help="the same for the current checkout (0: no cap)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params override for both checkouts, e.g. resources.memory_gb=2")
    parser.add_argument("--reference", type=Path,
                        help="a 10M run's --json-out: each stage's peak is compared with it")
    parser.add_argument("--json-out", type=Path, help="also write the figures here")
    parser.add_argument("--work", type=Path, help="folder for the work dir (default: TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    # child modes
    parser.add_argument("--stage", choices=[s for s, _ in STAGES], help=argparse.SUPPRESS)
    parser.add_argument("--upstream", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--upload", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=("plan", "bucket", "finish"), help=argparse.SUPPRESS)
    parser.add_argument("--phase-input", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        run_stage(args.stage, args.upstream, args.out, args.phase, args.phase_input)
        return 0
    if args.upload:
        upload_snapshot(args.upload)
        return 0

    sys.path.insert(0, str(ROOT))
    import psutil

    from nightrec.dev.bench_scoring import machine

    print(machine(), flush=True)  # the CPU's vector width and the BLAS: machines differ
    cpu_model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "?")
    print(f"{os.cpu_count()} CPUs ({cpu_model}), {psutil.virtual_memory().total / GB:.1f} GiB "
          f"memory, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    scale = _scale(args.rows)
    targets = TARGETS[scale]
    reference = None
    if args.reference:
        ref = json.loads(args.reference.read_text())
        reference = {r["stage"]: r["peak_rss_mb"] for r in ref["versions"]["current"]["stages"]
                     if r.get("status") == "ok"}
        print(f"reference peaks ({args.reference}, {ref['rows']:,} rows): "
              + ", ".join(f"{k} {v:.0f} MB" for k, v in reference.items()))
    sets = _parse_sets(args.set)
    checkouts = [("current", ROOT)]
    baseline_skip = None
    if args.baseline:
        base = args.baseline.resolve()
        _python(base)
        if args.rows > args.baseline_max_rows:
            baseline_skip = (f"{args.rows:,} rows > --baseline-max-rows "
                             f"{args.baseline_max_rows:,} (the pandas version needs ~0.5 GB per "
                             f"million events: ~{args.rows / 1e6 * 0.5:.0f} GB)")
        else:
            checkouts.insert(0, ("baseline", base))

    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nightrec-bench-data-", dir=args.work))
    print(f"work dir {work} ({shutil.disk_usage(work).free / GB:.0f} GiB free)")
    print("params (the data steps' sections in effect, per checkout):")
    params_files: dict[str, Path | None] = {}
    shown: dict[str, str] = {}
    for label, code in checkouts + ([("baseline", args.baseline.resolve())]
                                    if baseline_skip else []):
        params, pfile, skipped = checkout_params(code, sets, work / f"params-{label}.yaml")
        params_files[label] = pfile
        where = (f"{code}/params.yaml as shipped" if not pfile else
                 f"{code}/params.yaml with " + ", ".join(f"{k}={v!r}" for k, v in sets
                                                         if k not in skipped))
        print(f"  {label}: {where}" + (f"; not applied (no such section there): "
                                      f"{', '.join(skipped)}" if skipped else ""))
        for sec in PARAM_SECTIONS:
            text = json.dumps(params.get(sec), default=str) if sec in params else "(absent)"
            if label != "current" and shown.get(sec) == text:
                text = "(same as current)"
            else:
                shown.setdefault(sec, text)
            print(f"    {sec}: {text}")
    print(f"targets: the {scale} snapshot's (issue 14): <= {targets['total_s'] / 60:g} min in "
          f"all, <= {targets['stage_gb']:g} GB per stage"
          + (f", <= {REFERENCE_FACTOR:g}x the reference run's peak per stage"
             if reference else "")
          + ("" if args.rows in (10_000_000, 100_000_000) else
             f" (held to them at {args.rows:,} rows as a bar only)"), flush=True)

    base_env = {k: v for k, v in os.environ.items() if k not in (
        "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE",
        "NIGHTREC_PARAMS", "NIGHTREC_BUCKET", "NIGHTREC_HOME", "NIGHTREC_STATE", "PYTHONPATH",
        "VIRTUAL_ENV")}
    base_env.update(GX_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1")
    figures: dict = {"rows": args.rows, "users": args.users, "items": args.items,
                     "files": args.files, "format": args.format, "seed": args.seed,
                     "bad_fraction": args.bad_fraction, "sets": dict(sets), "scale": scale,
                     "machine": machine(), "versions": {}}
    try:
        snapshot = work / "snapshot"
        t0 = time.perf_counter()
        # a child, so that this process stays small; the current checkout's generator for both
        subprocess.run([sys.executable, "-m", "nightrec.dev.bench_data_gen", "--out",
                        str(snapshot), "--rows", str(args.rows), "--users", str(args.users),
                        "--items", str(args.items), "--files", str(args.files), "--format",
                        args.format, "--bad-fraction", str(args.bad_fraction), "--seed",
                        str(args.seed), "--ds", DS],
                       env={**base_env, "PYTHONPATH": str(ROOT)}, check=True)
        figures["generate_s"] = time.perf_counter() - t0
        figures["snapshot_bytes"] = _dir_bytes(snapshot)
        print(f"snapshot generated in {figures['generate_s']:.0f} s (not counted), "
              f"{figures['snapshot_bytes'] / GB:.2f} GiB", flush=True)
        for label, code in checkouts:
            cap = args.baseline_mem_cap_gb if label == "baseline" else args.mem_cap_gb
            res = run_version(label, code, snapshot=snapshot, work=work, base_env=base_env,
                              params_file=params_files[label], cap_gb=cap)
            res["git"] = _git(code)
            res["libraries"] = _versions_line(_python(code))
            figures["versions"][label] = res
            if not args.keep:
                shutil.rmtree(work / label, ignore_errors=True)
        if baseline_skip:
            figures["versions"]["baseline"] = {"label": "baseline",
                                               "code": str(args.baseline.resolve()),
                                               "skipped": baseline_skip}
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n=== {args.rows:,} events, {args.users:,} users x {args.items:,} items, "
          f"{args.files} {args.format} files ({args.bad_fraction:g} malformed), seed "
          f"{args.seed}; {machine()}")
    vs = figures["versions"]
    for label in ("baseline", "current"):
        if label in vs:
            if "git" in vs[label]:
                print(f"\n[{label}] {vs[label]['git']}; {vs[label]['libraries']}", end="")
            print_table(vs[label], targets, reference, with_targets=label == "current")
    if "baseline" in vs:
        print_comparison(vs["current"], vs["baseline"])
    print("\ncolumns: wall = run() alone; proc = the stage process's lifetime (imports "
          "included); CPU = user+sys of the process tree during run(); peak = the tree's RSS "
          f"summed, sampled every {SAMPLE_S} s; VmHWM/child/wait4 = the stage process's own peak, "
          "its largest waited-for descendant's, wait4's (cross-checks)")
    if args.json_out:
        args.json_out.write_text(json.dumps(figures, indent=2, default=str))
        print(f"figures written to {args.json_out}")
    failed = [r for v in vs.values() for r in v.get("stages", []) if r.get("status") != "ok"
              and v["label"] == "current"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
