"""``chatforge models``: list, show, diff, tag, promote, roll back and delete registered model versions.

    chatforge models list [--name RUN] [--stage sft]
    chatforge models show default@champion           # or a version (prefix)
    chatforge models diff 1a2b3c4d5e6f 0f9e8d7c6b5a
    chatforge models promote 1a2b3c4d5e6f --why "checks +2 points"     # default@champion
    chatforge models tag 1a2b3c4d5e6f staging
    chatforge models rollback default --alias champion
    chatforge models history default --alias champion --at 2026-12-01T12:00
    chatforge models delete 1a2b3c4d5e6f --yes

A reference is ``NAME@ALIAS``, ``@ALIAS`` (in the run of ``--name``) or a version. The
registered model's NAME is its run's name.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from chatforge.registry.core import CHAMPION, Registry, RegistryError, Version, parse_time


def add_models_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="registered model versions: list, show, diff, tag, promote, rollback, delete, mlflow",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", default="runs", help="directory holding the runs and registry/ (default: runs)")
    p.add_argument("--name", default="default", help="the registered model (= run) for @ALIAS (default: default)")
    s = p.add_subparsers(dest="models_cmd", required=True)
    ls = s.add_parser("list", help="every version, oldest first, with its aliases")
    ls.add_argument("name_filter", nargs="?", metavar="NAME", help="only this registered model (run)")
    ls.add_argument("--stage")
    ls.add_argument("--json", action="store_true")
    sh = s.add_parser("show", help="one version's record, aliases, evaluations and where its files are")
    sh.add_argument("ref")
    sh.add_argument("--json", action="store_true")
    df = s.add_parser("diff", help="two versions' config and metrics side by side")
    df.add_argument("a")
    df.add_argument("b")
    for cmd, text in (("tag", "point NAME@ALIAS at a version"), ("promote", "make a version NAME@champion")):
        t = s.add_parser(cmd, help=text)
        t.add_argument("ref")
        if cmd == "tag":
            t.add_argument("alias")
        t.add_argument("--why", default="", help="recorded in the alias history")
    un = s.add_parser("untag", help="remove NAME@ALIAS")
    un.add_argument("alias", help="ALIAS or NAME@ALIAS")
    un.add_argument("--why", default="")
    rb = s.add_parser("rollback", help="point an alias back at the version it held before")
    rb.add_argument("name_arg", nargs="?", metavar="NAME")
    rb.add_argument("--alias", default=CHAMPION)
    rb.add_argument("--why", default="")
    hi = s.add_parser("history", help="alias moves and decisions, oldest first (append-only)")
    hi.add_argument("name_arg", nargs="?", metavar="NAME")
    hi.add_argument("--alias")
    hi.add_argument("--at", help="only print what ALIAS (default champion) pointed at on this date / time")
    hi.add_argument("--json", action="store_true")
    de = s.add_parser("delete", help="delete a version's record and files (name it in full; --yes)")
    de.add_argument("version")
    de.add_argument("--yes", action="store_true", help="really delete")
    de.add_argument("--why", default="")
    ml = s.add_parser("mlflow", help="mirror versions, aliases and decisions into MLflow (needs the mlflow extra)")
    ml.add_argument("name_arg", nargs="?", metavar="NAME", help="only this registered model (default: all)")
    ml.add_argument("--uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI), e.g. sqlite:///runs/mlflow.db")
    p.set_defaults(func=cmd_models)
    return p


def _metric_line(v: Version) -> str:
    p = v.primary
    if not p or p.get("value") is None:
        return ""
    value = p["value"]
    return f"{p['name']} {value:.4g}" if isinstance(value, (int, float)) else f"{p['name']} {value}"


def cmd_models(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    reg = Registry(args.runs_dir)
    console = Console(highlight=False)
    cmd = args.models_cmd
    if cmd == "list":
        versions = reg.list(args.name_filter, args.stage)
        if args.json:
            print(json.dumps([{**v.record, "aliases": reg.aliases_of(v.version)} for v in versions], indent=2))
            return
        if not versions:
            console.print(f"no versions registered in {reg.root} (a training stage registers its model)")
            return
        table = Table(title=f"registry {reg.root}")
        for col in ("version", "name", "stage", "parent"):  # ids are copied from here: never wrapped
            table.add_column(col, no_wrap=True, min_width=12 if col in ("version", "parent") else None)
        for col in ("primary metric", "aliases", "created"):
            table.add_column(col)
        for v in versions:
            table.add_row(v.version, v.name, v.stage, v.parent or "-", _metric_line(v),
                          " ".join(f"@{a}" for a in reg.aliases_of(v.version)), v.created_at[:19])
        console.print(table)
    elif cmd == "show":
        v = reg.resolve(args.ref, args.name)
        path = reg.path_of(v.version, must_exist=False)
        out = {**v.record, "aliases": reg.aliases_of(v.version), "path": str(path) if path else None,
               "lineage": [x.version + " " + x.stage for x in lineage(reg, v)],
               "evals": [{"kind": e["kind"], "at": e["at"]} for e in reg.evals(v.version)]}
        if args.json:
            print(json.dumps(out, indent=2))
            return
        console.print(f"[bold]{v.name} {v.stage} {v.version}[/bold]  "
                      + " ".join(f"@{a}" for a in out["aliases"]), markup=True)
        console.print(f"  files:   {out['path'] or '(gone)'}")
        console.print(f"  lineage: {' <- '.join(out['lineage'])}")
        console.print(f"  created: {v.created_at}   code: {v.record.get('code')}")
        for split, d in (v.record.get("data") or {}).items():
            console.print(f"  data {split}: {d.get('source')} ({d.get('fingerprint')})")
        for k, val in v.metrics.items():
            console.print(f"  {k}: {val}")
        for e in out["evals"]:
            console.print(f"  eval {e['kind']} at {e['at']}")
    elif cmd == "diff":
        a, b = reg.resolve(args.a, args.name), reg.resolve(args.b, args.name)
        console.print(diff_table(a, b))
    elif cmd in ("tag", "promote"):
        v = reg.resolve(args.ref, args.name)
        alias = args.alias.lstrip("@") if cmd == "tag" else CHAMPION
        e = reg.set_alias(v.name, alias, v.version, why=args.why)
        console.print(f"{v.name}@{alias}: {e['previous'] or '(unset)'} -> {v.version}")
    elif cmd == "untag":
        name, _, alias = args.alias.rpartition("@")
        e = reg.remove_alias(name or args.name, alias, why=args.why)
        console.print(f"{e['name']}@{alias}: {e['previous']} -> (unset)")
    elif cmd == "rollback":
        name = args.name_arg or args.name
        e = reg.rollback(name, args.alias, why=args.why)
        console.print(f"{name}@{args.alias}: {e['previous']} -> {e['version']}")
    elif cmd == "history":
        name = args.name_arg or args.name
        if args.at:
            alias = args.alias or CHAMPION
            held = reg.aliases(name, at=parse_time(args.at)).get(alias)
            console.print(f"{name}@{alias} at {args.at}: {held or '(unset)'}")
            return
        events = [e for e in reg.events() if e.get("name") == name and e.get("event") in ("alias", "decision",
                                                                                       "delete")
                  and (args.alias is None or e.get("alias") in (None, args.alias))]
        if args.json:
            print(json.dumps(events, indent=2))
            return
        for e in events:
            if e["event"] == "alias":
                console.print(f"{e['at'][:19]}  {e['by']}: @{e['alias']} {e['previous'] or '-'} -> "
                              f"{e['version'] or '(unset)'}  {e.get('why', '')}")
            elif e["event"] == "decision":
                console.print(f"{e['at'][:19]}  {e['by']}: decision {e.get('decision')} "
                              f"challenger {e.get('challenger')} vs champion {e.get('champion')}: "
                              f"{'; '.join(e.get('reasons', []))}")
            else:
                console.print(f"{e['at'][:19]}  {e['by']}: deleted {e['version']}  {e.get('why', '')}")
    elif cmd == "mlflow":
        from chatforge.registry.mlflow_mirror import mirror

        out = mirror(reg, args.uri, args.name_arg)
        for model, c in out["models"].items():
            console.print(f"MLflow {out['uri']}: model {model!r}: {c['created']} versions added, {c['existing']} "
                          f"already there, {c['aliases_set']} aliases set, {c['aliases_removed']} removed",
                          markup=False)
        if not out["models"]:
            console.print(f"no versions registered in {reg.root}")
    elif cmd == "delete":
        if not args.yes:
            raise RegistryError(f"delete {args.version}: add --yes to delete its record and files")
        e = reg.delete(args.version, why=args.why)
        console.print(f"deleted {e['version']} ({e['path'] or 'no files left'})")


def lineage(reg: Registry, v: Version) -> list[Version]:
    """The version, its parent, its parent's parent, ... as far as they are registered."""
    chain, seen = [v], {v.version}
    while chain[-1].parent and chain[-1].parent not in seen:
        try:
            parent = reg.get(chain[-1].parent)
        except RegistryError:
            break
        chain.append(parent)
        seen.add(parent.version)
    return chain


def diff_table(a: Version, b: Version) -> Any:
    from rich.table import Table

    from chatforge.train.stage import metric_goal

    table = Table(title=f"{a.version} ({a.stage}) vs {b.version} ({b.stage})")
    for col in ("field", a.version, b.version, "change"):
        table.add_column(col, overflow="fold")
    for key in sorted(set(a.metrics) | set(b.metrics)):
        x, y = a.metrics.get(key), b.metrics.get(key)
        change = ""
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x != y:
            better = (y > x) == (metric_goal(key) == "max")
            change = ("+" if y > x else "") + f"{y - x:.4g} " + ("better" if better else "worse")
        table.add_row(key, _fmt(x), _fmt(y), change)
    flat_a, flat_b = _flatten(a.record.get("config") or {}), _flatten(b.record.get("config") or {})
    for key in sorted(set(flat_a) | set(flat_b)):
        if flat_a.get(key) != flat_b.get(key):
            table.add_row(f"config {key}", _fmt(flat_a.get(key)), _fmt(flat_b.get(key)), "differs")
    for key in ("stage", "parent"):
        x, y = getattr(a, key), getattr(b, key)
        if x != y:
            table.add_row(key, str(x), str(y), "differs")
    return table


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
