"""Mirror the registry into MLflow, for teams whose tools read MLflow (`chatforge models mlflow`).

The registry in ``runs/registry/`` stays the source of truth; MLflow gets a copy that can be
re-made at any time, so mirroring is idempotent: run it after every stage, round or alias move,
or once at the end, and the MLflow side ends up the same.

What goes where:

* each chatforge run (a registered model ``NAME``) is an MLflow experiment ``chatforge/NAME`` and
  an MLflow registered model ``NAME``;
* each version is one MLflow run in that experiment (params: the stage's config flattened;
  metrics: the record's numeric metrics and training figures; tags: version, parent, stage, task,
  data fingerprints, code versions; artifact ``chatforge_version.json``: the whole record) and one
  MLflow model version whose ``source`` is the version's directory, tagged ``chatforge.version``
  (MLflow numbers its versions 1, 2, ...; the tag is how a later mirror finds them again);
* aliases are set to the MLflow version holding the same weights, and aliases removed here are
  removed there. MLflow keeps no history of alias moves, so the history (``chatforge models
  history``) is also written, as JSON, into the registered model's tag ``chatforge.alias_history``;
* each round's decision becomes tags on the challenger's MLflow version; a deleted version's
  MLflow version is tagged ``chatforge.deleted`` (its record was the only thing MLflow pointed at).

MLflow is optional (``pip install 'chatforge[mlflow]'``: mlflow-skinny and alembic, for the SQLite
store MLflow 3 wants); nothing else in chatforge imports it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from chatforge.errors import ChatforgeError
from chatforge.registry.core import Registry, Version

TAG = "chatforge.version"
MAX_PARAM = 500  # longer values (lists, long strings) are cut: params are for filtering, the record is the truth


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError as e:
        raise ChatforgeError("mirroring the registry needs MLflow: pip install 'chatforge[mlflow]' "
                             "(mlflow-skinny and alembic)") from e
    return mlflow


def tracking_uri(uri: str | None) -> str:
    """The MLflow tracking URI: the one given, else ``$MLFLOW_TRACKING_URI``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise ChatforgeError("no MLflow tracking URI: give --uri (e.g. sqlite:///runs/mlflow.db or "
                             "http://mlflow.example:5000) or set MLFLOW_TRACKING_URI")
    return uri


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif prefix:
        out[prefix[:-1]] = d
    return out


def _params(v: Version) -> dict[str, str]:
    return {k[:250]: str(val)[:MAX_PARAM] for k, val in _flatten(v.record.get("config") or {}).items()}


def _metrics(v: Version) -> dict[str, float]:
    out = {}
    for prefix, d in (("", v.metrics), ("train.", v.record.get("train") or {})):
        for k, val in _flatten(d).items():
            if isinstance(val, bool) or not isinstance(val, int | float):
                continue
            if val == val and abs(val) != float("inf"):  # MLflow refuses NaN and infinities
                out[f"{prefix}{k}"[:250]] = float(val)
    if isinstance(v.record.get("wall_time_s"), int | float):
        out["wall_time_s"] = float(v.record["wall_time_s"])
    return out


def _tags(v: Version) -> dict[str, str]:
    tags = {TAG: v.version, "chatforge.stage": v.stage, "chatforge.task": str(v.record.get("task")),
            "chatforge.parent": v.parent or "", "chatforge.created_at": v.created_at,
            "chatforge.weights_sha256": str(v.record.get("weights_sha256", ""))}
    for split, d in (v.record.get("data") or {}).items():
        if isinstance(d, dict):
            tags[f"chatforge.data.{split}"] = f"{d.get('source')} {d.get('fingerprint')}"
    for k, val in (v.record.get("code") or {}).items():
        tags[f"chatforge.code.{k}"] = str(val)
    primary = v.primary or {}
    if primary.get("name"):
        tags["chatforge.primary"] = f"{primary['name']}={primary.get('value')}"
    return tags


def mirror(registry: Registry, uri: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Copy ``registry`` (only registered model ``name`` when given) into the MLflow at ``uri``.
    Returns counts: versions created and already there, aliases set and removed, per model."""
    mlflow = _mlflow()
    uri = tracking_uri(uri)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    versions = registry.list(name)
    summary: dict[str, Any] = {"uri": uri, "models": {}}
    for model in dict.fromkeys(v.name for v in versions):
        counts = {"created": 0, "existing": 0, "aliases_set": 0, "aliases_removed": 0}
        summary["models"][model] = counts
        try:
            client.get_registered_model(model)
        except MlflowException:
            client.create_registered_model(model, description=f"chatforge run {model!r}: every model its stages "
                                                              "saved (mirrored from runs/registry)")
        known = {mv.tags.get(TAG): mv for mv in client.search_model_versions(f"name='{model}'")}
        exp = client.get_experiment_by_name(f"chatforge/{model}")
        exp_id = exp.experiment_id if exp else client.create_experiment(f"chatforge/{model}")
        for v in (x for x in versions if x.name == model):
            if v.version in known:
                counts["existing"] += 1
                continue
            run = client.create_run(exp_id, run_name=f"{v.stage} {v.version}", tags=_tags(v))
            rid = run.info.run_id
            params = _params(v)
            items = list(params.items())
            for k in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(rid, params=[mlflow.entities.Param(a, b) for a, b in items[k:k + 100]])
            for key, val in _metrics(v).items():
                client.log_metric(rid, key, val)
            client.log_dict(rid, v.record, "chatforge_version.json")
            client.set_terminated(rid)
            path = registry.path_of(v.version, must_exist=False)
            source = str(Path(path).resolve()) if path else str((registry.runs_dir / v.record["stage_dir"]).resolve())
            known[v.version] = client.create_model_version(
                model, source=source, run_id=rid, tags={TAG: v.version, "chatforge.stage": v.stage},
                description=f"{v.stage} {v.version}" + (f", parent {v.parent}" if v.parent else ""))
            counts["created"] += 1
        # aliases: what the log says now, and nothing else
        current = registry.aliases(model)
        rm = client.get_registered_model(model)
        there = dict(getattr(rm, "aliases", {}) or {})
        for alias, version in current.items():
            mv = known.get(version)
            if mv is not None and str(there.get(alias)) != str(mv.version):
                client.set_registered_model_alias(model, alias, mv.version)
                counts["aliases_set"] += 1
        for alias in set(there) - set(current):
            client.delete_registered_model_alias(model, alias)
            counts["aliases_removed"] += 1
        history = [{k: e.get(k) for k in ("at", "by", "alias", "previous", "version", "why")}
                   for e in registry.history(model) if e.get("event") == "alias"]
        client.set_registered_model_tag(model, "chatforge.alias_history", json.dumps(history)[-5000:])
        for d in registry.decisions(model):
            mv = known.get(d.get("challenger"))
            if mv is not None:
                key = f"chatforge.decision.{d.get('round', d.get('at', ''))}"
                text = f"{d.get('decision')} vs {d.get('champion')}: {'; '.join(d.get('reasons', []))}"
                client.set_model_version_tag(model, mv.version, key[:250], text[:5000])
        for e in registry.events():
            if e.get("event") == "delete" and e.get("name") == model and e.get("version") in known:
                client.set_model_version_tag(model, known[e["version"]].version, "chatforge.deleted", e.get("at", ""))
    return summary
