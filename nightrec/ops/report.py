"""The run report: one static HTML page per run, readable in a minute, that opens offline.

``reports/ds=<ds>/report.html`` in the bucket, with plots as inline PNGs (matplotlib): data
volumes and quarantine counts, the validation summary (linking the GE result), training curves,
model vs popularity (and the champion's) metrics over the last ``report.history_runs`` runs, the
score distribution, and coverage and popularity of what was recommended. A missing input (the run
failed before that step) becomes a line saying so, never an error: the report runs after every
run, failed ones included. ``runs/ds=<ds>/report/summary.json`` feeds ``nightrec status``.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import logging

import numpy as np
import pandas as pd

from nightrec.core import schema, settings
from nightrec.ops import alerts
from nightrec.store import layout, storage

PARAMS = ["report.history_runs", "report.sample_rows", "publish.max_age_hours"]
log = logging.getLogger(__name__)


def _tune_line(tune: dict | None) -> str:
    """The tune DAG's result as this run's train saw it (selection.json ``tune``), for the
    report: adopted or not, and why."""
    if not tune:
        return ""
    verdict = "adopted" if tune.get("adopted") else "not adopted"
    found = (f" of ds {tune['ds']} ({tune.get('model')}: {tune.get('params')}, valid "
             f"{tune.get('value')} against {tune.get('baseline_value')})" if tune.get("ds")
             else "")
    return html.escape(f"Tune DAG result{found}: {verdict}, {tune.get('why')}.").join(
        ("<p>", "</p>"))


def _challenge(rec: dict | None) -> str:
    """One challenger's paired comparison (selection.json ``choice``), for the report."""
    if not rec:
        return "-"
    return (f"{rec['gain']:+.4f} vs {rec['against']} ({rec['lower']:+.4f} / "
            f"{rec['needed']:.4f})")


def _tuned(candidate: dict) -> str:
    """A candidate's hyperparameters chosen in the run on the valid split (and how many points
    were searched), or its blend's components."""
    out = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in (candidate.get("params") or {}).items())
    if candidate.get("search"):
        out += f" (of {len(candidate['search'])})"
    if candidate.get("components"):
        out = " + ".join(candidate["components"]) + (f"; {out}" if out else "")
    return out or "-"


def _maybe_json(uri: str):
    return storage.read_json(uri) if storage.exists(uri) else None


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figure(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.set_title(title)
    return fig, ax


def plot_volumes(stats: dict) -> str:
    fig, ax = _figure("Rows: raw, clean, and quarantined by reason")
    labels = ["raw", "clean", *stats["by_reason"].keys()]
    values = [stats["raw_rows"], stats["clean_rows"], *stats["by_reason"].values()]
    colors = ["#4c72b0", "#55a868"] + ["#c44e52"] * len(stats["by_reason"])
    ax.barh(labels, values, color=colors)
    ax.set_xscale("symlog")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,}", va="center", fontsize=8)
    return _png(fig)


def plot_training(history: dict) -> str:
    fig, ax = _figure(f"Training (best epoch {history.get('best_epoch')})")
    for key in ("loss", "val_loss"):
        if key in history:
            ax.plot(range(1, len(history[key]) + 1), history[key], marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.legend()
    return _png(fig)


def plot_history(rows: list[dict], metric: str) -> str:
    fig, ax = _figure(f"{metric} over the last runs")
    frame = pd.DataFrame(rows).sort_values("ds")
    for col, style in (("model", "o-"), ("champion", "^:"), ("popularity", "s--")):
        if col in frame and frame[col].notna().any():
            ax.plot(frame["ds"], frame[col], style, label=col)
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    ax.legend()
    return _png(fig)


def plot_scores(scores: np.ndarray) -> str:
    fig, ax = _figure("Score distribution of published recommendations")
    ax.hist(scores[np.isfinite(scores)], bins=50, color="#4c72b0")
    ax.set_xlabel("score")
    return _png(fig)


def plot_popularity(rec_pop: np.ndarray, cat_pop: np.ndarray) -> str:
    fig, ax = _figure("Popularity of recommended items vs the catalogue")
    bins = np.logspace(0, np.log10(max(cat_pop.max(), 1) + 1), 30)
    ax.hist(cat_pop + 1, bins=bins, alpha=0.6, density=True, label="catalogue (per item)")
    ax.hist(rec_pop + 1, bins=bins, alpha=0.6, density=True, label="recommended (per slot)")
    ax.set_xscale("log")
    ax.set_xlabel("interactions per item + 1")
    ax.legend()
    return _png(fig)


def _run_days(ds: str, step: str, name: str, n: int) -> list[str]:
    """The last ``n`` ds up to ``ds`` whose run holds ``runs/ds=<day>/<step>/<name>``."""
    days = sorted({day for u in storage.list_uris(layout.runs_root())
                   if (day := layout.ds_of_run_key(u)) and u == layout.run_uri(day, step, name)})
    return [d for d in days if d <= ds][-n:]


def metric_history(ds: str, metric: str, n: int) -> list[dict]:
    """``[{"ds", "model", "champion", "popularity"}]`` for up to n runs up to ds with metrics
    (``champion`` is None for a run that had no champion to compare with)."""
    rows = []
    for day in _run_days(ds, "evaluate", "metrics.json", n):
        m = storage.read_json(layout.run_uri(day, "evaluate", "metrics.json"))
        rows.append({"ds": day, "model": m["model"][metric], "popularity": m["popularity"][metric],
                     "champion": m.get("champion", {}).get(metric)})
    return rows


def realized_history(ds: str, metric: str, n: int) -> list[dict]:
    """``[{"ds", "value", "table_ds"}]`` for up to n runs up to ds with realized figures."""
    rows = []
    for day in _run_days(ds, "monitor", "realized.json", n):
        r = storage.read_json(layout.run_uri(day, "monitor", "realized.json"))
        value = (r.get("metrics") or {}).get(metric)
        if value is not None:
            rows.append({"ds": day, "value": value, "table_ds": r["table"]["ds"]})
    return rows


def plot_realized(rows: list[dict], metric: str) -> str:
    fig, ax = _figure(f"realized {metric} of the previous table, by run")
    if rows:
        ax.plot([r["ds"] for r in rows], [r["value"] for r in rows], marker="o")
        ax.tick_params(axis="x", rotation=45)
    ax.set_ylabel(metric)
    return _png(fig)


def realized_section(ds: str, r: dict, p) -> str:
    """The report's realized-quality section from realized.json."""
    if r.get("error"):
        return f"<p class='failed'>Not measured: {html.escape(r['error'])}</p>"
    if not r.get("table"):
        return f"<p>{html.escape(r.get('note', 'nothing to measure'))}</p>"
    ks = r.get("ks") or []
    names = ("hit_rate", "recall", "ndcg", "mrr")
    head = "".join(f"<th>{n}@{k}</th>" for k in ks for n in names)

    def row(label: str, users: int, m: dict) -> str:
        cells = "".join(f"<td>{m[f'{n}_at_{k}']:.4f}</td>" if m else "<td>-</td>"
                        for k in ks for n in names)
        return f"<tr><td>{html.escape(label)}</td><td>{users}</td>{cells}</tr>"

    rows = row("all", r["users"], r.get("metrics") or {}) + "".join(
        row(name, seg["users"], seg["metrics"]) for name, seg in (r.get("segments") or {}).items())
    t = r.get("trailing") or {}
    metric = t.get("metric", "ndcg_at_10")
    trail = ("<p>No earlier runs to compare with.</p>" if not t.get("runs") else
             f"<p{' class=failed' if t.get('alert') else ''}>{html.escape(metric)} against the "
             f"median {t['median']:.4f} of the last {t['runs']} runs: drop "
             f"{(t.get('drop') or 0):.1%} (alert above {t['max_drop']:.0%})"
             f"{': ALERT written' if t.get('alert') else ''}.</p>")
    share = r.get("event_share_on_recommended")
    history = realized_history(ds, metric, int(p["report.history_runs"]))
    return (f"<p>The table of ds={html.escape(r['table']['ds'])} (model "
            f"{html.escape(str(r['table']['model_version']))}) on the {r['events']:,} events of "
            f"{r['users']:,} users after {html.escape(r['cutoff'])}; catalogue coverage "
            f"{(r.get('coverage') or 0):.1%}; share of events on a recommended item "
            f"{(share or 0):.1%}. New users are scored on the popular list.</p>"
            f"<table><tr><th>segment</th><th>users</th>{head}</tr>{rows}</table>" + trail
            + f'<img class="plot" alt="realized history" src="data:image/png;base64,'
            f'{plot_realized(history, metric)}">')


def drift_section(d: dict) -> str:
    """The report's input-drift section from validate's report (tasks/drift.py)."""
    if not d.get("previous"):
        return f"<p>{html.escape(d.get('note') or 'nothing to compare with')}</p>"

    def num(v) -> str:
        return "-" if v is None or abs(v) >= 1e299 else f"{v:.4g}"

    rows = "".join(
        f"<tr><td>{html.escape(c['check'])}</td><td>{num(c['value'])}</td><td>{num(c['min'])}"
        f"</td><td>{num(c['max'])}</td><td>{html.escape(c['action'])}</td><td class="
        f"'{'success' if c['ok'] else 'failed'}'>{'ok' if c['ok'] else 'BREACH'}</td></tr>"
        for c in d.get("checks", []))
    verdict = ("STOPPED the run: " + ", ".join(d["stop"]) if d.get("stop") else
               "warnings: " + ", ".join(d["warn"]) if d.get("warn") else "no drift")
    return (f"<p>Against ds={html.escape(d['previous'])} (the last accepted ds): "
            f"{html.escape(verdict)}.</p><table><tr><th>check</th><th>value</th><th>min</th>"
            f"<th>max</th><th>action</th><th></th></tr>{rows}</table>")


def output_checks_section(c: dict) -> str:
    """The report's output-checks section from publish's output_checks.json."""
    if not c.get("against"):
        return f"<p>{html.escape(c.get('note') or 'nothing to compare with')}</p>"
    rows = "".join(
        f"<tr><td>{html.escape(x['name'])}</td><td>{'-' if x['value'] is None else x['value']}"
        f"</td><td>{x['op']} {x['threshold']:g}</td><td class="
        f"'{'success' if x['ok'] else 'failed'}'>{'ok' if x['ok'] else 'BREACH'}</td><td>"
        f"{'' if x['judged'] else html.escape('not judged: ' + str(x['why']))}</td></tr>"
        for x in c["checks"])
    verdict = ("REFUSED: nothing was published" if c.get("refused") else
               html.escape(c.get("note") or "passed"))
    a = c["against"]
    return (f"<p>Against the latest table ds={html.escape(a['ds'])} (model "
            f"{html.escape(str(a.get('model_version')))}): {verdict}.</p><table><tr><th>check"
            f"</th><th>value</th><th>bound</th><th></th><th></th></tr>{rows}</table>")


def build_report(ds: str, *, run_id: str, task_states: dict[str, str], p) -> tuple[str, dict]:
    """Return ``(html, summary)`` for the run from what its steps left in the bucket."""
    sections: list[tuple[str, str]] = []

    def add(title: str, body: str) -> None:
        sections.append((title, body))

    def img(b64: str, alt: str) -> str:
        return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'

    failed = {t: s for t, s in task_states.items() if s in ("failed", "upstream_failed")}
    rows = "".join(f"<tr><td>{html.escape(t)}</td><td class='{s}'>{s}</td></tr>"
                   for t, s in task_states.items())
    add("Tasks", f"<table>{rows}</table>")

    stats = _maybe_json(layout.run_uri(ds, "clean", "stats.json"))
    if stats:
        add("Data volumes and quarantine", img(plot_volumes(stats), "volumes") +
            f"<p>invalid share {stats['invalid_fraction']:.2%}</p>")
    else:
        add("Data volumes and quarantine", "<p>clean did not run.</p>")

    val = _maybe_json(layout.run_uri(ds, "validate", "report.json"))
    if val:
        fails = "".join(f"<li>{html.escape(f['expectation'])}: {html.escape(json.dumps(f['observed'], default=str))}</li>"
                        for f in val["expectations"]["failures"])
        verdict = "passed" if val["success"] else "FAILED"
        add("Validation", f"<p>Contract {verdict}: {val['expectations']['n_expectations']} "
            f"expectations; invalid share {val['quarantine']['invalid_fraction']:.2%} (max "
            f"{val['quarantine']['max_invalid_fraction']:.2%}).</p><ul>{fails}</ul>"
            f"<p><a href=\"data_docs/index.html\">Great Expectations Data Docs</a> (beside this "
            f"report); the raw result is <code>{layout.run_uri(ds, 'validate', 'report.json')}"
            "</code>.</p>")

    if val and val.get("drift"):
        add("Input drift", drift_section(val["drift"]))

    hist = _maybe_json(layout.run_uri(ds, "train", "holdout", "history.json"))
    if hist:
        add("Training", img(plot_training(hist), "training curves"))

    selection = _maybe_json(layout.run_uri(ds, "train", "selection.json"))
    if selection:
        metric = selection.get("metric", "")
        choice = selection.get("choice") or {}

        def not_chosen(name: str) -> str:  # fitted, but its refits would overrun the budget
            why = (selection.get("not_chosen") or {}).get(name)
            return f"not chosen: {why}" if why else ""

        rows = "".join(
            f"<tr><td>{html.escape(n)}</td><td>{c.get(f'valid_{metric}', float('nan')):.4f}</td>"
            f"<td>{c.get('fit_s', '-')}</td><td>{c.get('best_epoch', '-')}</td>"
            f"<td>{html.escape(_tuned(c))}</td>"
            f"<td>{html.escape(_challenge((choice.get('challengers') or {}).get(n)))}</td>"
            f"<td>{'chosen' if n == selection.get('chosen') else html.escape(not_chosen(n))}"
            f"</td></tr>"
            for n, c in selection.get("candidates", {}).items())
        rows += "".join(f"<tr><td>{html.escape(n)}</td><td colspan=\"6\">skipped: "
                        f"{html.escape(str(why))}</td></tr>"
                        for n, why in (selection.get("skipped") or {}).items())
        add("Model selection",
            f"<p>Candidates on {selection.get('valid_users', '?')} valid users by valid "
            f"{html.escape(metric)}; time budget {selection.get('time_budget_s', '?')} s, train "
            f"took {selection.get('train_s', '?')} s. A challenger wins when the lower end of "
            f"its paired gain (confidence {choice.get('confidence', '-')}) exceeds "
            f"{choice.get('min_gain', '-')} of the choice so far.</p><table><tr>"
            f"<th>candidate</th><th>valid {html.escape(metric)}</th><th>fit s</th>"
            f"<th>epochs / iterations</th><th>tuned on valid</th>"
            f"<th>gain vs the choice so far (lower end / needed)</th><th></th></tr>{rows}"
            f"</table>{_tune_line(selection.get('tune'))}")

    metrics = _maybe_json(layout.run_uri(ds, "evaluate", "metrics.json"))
    if metrics:
        g = metrics["gate"]
        keys = [k for k in metrics["model"] if k.endswith("_at_10") or k == "catalogue_coverage"]
        champ = metrics.get("champion")

        def cell(side: dict | None, key: str) -> str:
            return f"<td>{side[key]:.4f}</td>" if side else "<td>-</td>"

        table = "".join(f"<tr><td>{k}</td>{cell(metrics['model'], k)}{cell(champ, k)}"
                        f"{cell(metrics['popularity'], k)}</tr>" for k in keys)
        history = metric_history(ds, g["metric"], int(p["report.history_runs"]))
        add("Evaluation", f"<p>Gate on {g['metric']}: model {g['model']:.4f} vs threshold "
            f"{g['threshold']:.4f} -> {'blessed' if g['blessed'] else 'NOT blessed'}</p>"
            f"<table><tr><th>metric</th><th>model</th><th>champion "
            f"{html.escape(str(metrics.get('champion_version') or '(none)'))}</th>"
            f"<th>popularity</th></tr>{table}</table>"
            + _champion_note(metrics.get("champion_comparison") or {}, g["metric"])
            + img(plot_history(history, g["metric"]), "metric history"))

    summary_extra: dict = {}
    real = _maybe_json(layout.run_uri(ds, "monitor", "realized.json"))
    if real:
        add("Realized quality of the previous table", realized_section(ds, real, p))
        metric = (real.get("trailing") or {}).get("metric", "ndcg_at_10")
        summary_extra["realized"] = {
            "table_ds": (real.get("table") or {}).get("ds"), "metric": metric,
            "value": (real.get("metrics") or {}).get(metric),
            "alert": bool((real.get("trailing") or {}).get("alert"))}
    checks = _maybe_json(layout.run_uri(ds, "publish", "output_checks.json"))
    if checks:
        add("Output checks against the latest table", output_checks_section(checks))
        summary_extra["output_checks"] = {"breaches": checks.get("breaches", []),
                                          "refused": checks.get("refused", False)}

    manifest = _maybe_json(layout.manifest_uri(ds))
    if manifest and manifest.get("publish_id"):
        rng = np.random.default_rng(0)
        # Seeded whole parts until report.sample_rows rows (a part is at most
        # publish.rows_per_part): memory flat in the table (200M rows at 2M users x 100).
        sample_rows = int(p["report.sample_rows"])
        frames, rows = [], 0
        for i in rng.permutation(len(manifest["parts"])):
            if rows >= sample_rows:
                break
            frames.append(storage.read_parquet(
                layout.listed_part_uri(manifest["parts"][i]["key"]),
                columns=[schema.ITEM_ID, schema.SCORE]))
            rows += len(frames[-1])
        recs = pd.concat(frames, ignore_index=True)
        if len(recs) > sample_rows:
            recs = recs.iloc[rng.choice(len(recs), sample_rows, replace=False)]
        from nightrec.tasks import seen as seen_step

        # users per item up to ds: the seen step's counts (one small object), not every event
        counts = seen_step.item_counts(layout.run_uri(ds, "seen", "interactions.parquet"))
        pop = pd.Series(counts[seen_step.COUNT].to_numpy(),
                        index=counts[schema.ITEM_ID].astype(str).to_numpy())
        rec_pop = pop.reindex(recs[schema.ITEM_ID].astype(str)).fillna(0).to_numpy()
        coverage = recs[schema.ITEM_ID].nunique() / max(len(pop), 1)
        add("Published recommendations",
            f"<p>{manifest['rows']:,} rows for {manifest['users']:,} users, model "
            f"{html.escape(manifest['model_version'])}; catalogue coverage {coverage:.1%}; mean "
            f"popularity of recommended items {rec_pop.mean():.1f} vs catalogue "
            f"{pop.mean():.1f}.</p>" + img(plot_scores(recs[schema.SCORE].to_numpy()), "scores")
            + img(plot_popularity(rec_pop, pop.to_numpy()), "popularity"))
        summary_extra.update(rows=manifest["rows"], model_version=manifest["model_version"])
    else:
        add("Published recommendations", "<p>Nothing was published by this run.</p>")
    if manifest and manifest.get("publish_id"):
        source = manifest.get("source", "model")
        summary_extra["source"] = source
        if source != "model":
            sections[-1] = (sections[-1][0], sections[-1][1] + (
                f"<p><b>Fallback</b>: this table is <code>{html.escape(source)}</code>, because "
                f"{html.escape(str(manifest.get('source_reason') or 'the gate refused'))}.</p>"))

    age = alerts.check_latest_age(ds=ds, run_id=run_id,
                                  max_age_hours=float(p["publish.max_age_hours"]))
    if age["ds"] is None:
        add("Latest table", "<p class='failed'>No table has been published yet.</p>")
    else:
        flag = (" class='failed'" if age["stale"] else "")
        add("Latest table", f"<p{flag}>Readers get ds={html.escape(age['ds'])} "
            f"({html.escape(str(age['source']))}, model "
            f"{html.escape(str(age['model_version']))}), published {age['age_hours']:.1f} h ago"
            f" (publish.max_age_hours {age['max_age_hours']:g}"
            f"{': STALE, alert written' if age['stale'] else ''}).</p>")
    summary_extra["latest"] = {k: age.get(k) for k in ("ds", "source", "age_hours", "stale")}

    state = "failed" if failed else "success"
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    body = "".join(f"<section><h2>{html.escape(t)}</h2>{b}</section>" for t, b in sections)
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>nightrec run {html.escape(ds)}</title><style>
body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;font-size:13px}}
.failed,.upstream_failed{{color:#c00;font-weight:bold}}.success{{color:#080}}
img.plot{{display:block;margin:8px 0;max-width:100%}}
</style></head><body><h1>nightrec: ds={html.escape(ds)} &mdash; {state}</h1>
<p>run <code>{html.escape(run_id)}</code>, report written {now}</p>{body}
<script>/* lets a headless browser check that every plot decoded */
addEventListener("load", () => {{ document.body.dataset.plotsRendered =
  [...document.images].filter(i => i.classList.contains("plot") && i.naturalWidth > 0).length; }});
</script></body></html>"""
    summary = {"ds": ds, "run_id": run_id, "state": state, "tasks": task_states,
               "failed": failed, "written_at": now, **summary_extra}
    return page, summary


def _champion_note(c: dict, metric: str) -> str:
    """How the champion was compared: only on test events after its training cutoff."""
    if not c.get("version"):
        return "<p>No champion yet: the gate compared the model with popularity only.</p>"
    if not c.get("compared"):
        return (f"<p>Champion {html.escape(str(c['version']))} not compared: "
                f"{html.escape(str(c.get('reason')))}.</p>")
    return (f"<p>The champion column is measured only on the {c.get('later_events')} test events "
            f"after the champion's training cutoff ({c.get('users')} users), which it never saw; "
            f"on those the new model has {metric} "
            f"{(c.get('model') or {}).get(metric, float('nan')):.4f}.</p>")


def report_uri(ds: str) -> str:
    return layout.report_uri(ds, "report.html")


def run(ds: str, *, run_id: str, task_states: dict[str, str], params: dict | None = None,
        started_at: dt.datetime | None = None) -> str:
    p = settings.step_params(PARAMS, params)
    page, summary = build_report(ds, run_id=run_id, task_states=task_states, p=p)
    if started_at is not None:
        summary["started_at"] = started_at.isoformat(timespec="seconds")
        summary["duration_s"] = round((dt.datetime.now(dt.UTC) - started_at).total_seconds(), 1)
    uri = report_uri(ds)
    storage.write_bytes(uri, page.encode(), content_type="text/html")
    summary["report"] = uri
    storage.write_json(layout.run_uri(ds, "report", "summary.json"), summary)
    log.info("run report: %s", uri)
    return uri
