"""``chatforge safety check|eval|redteam``: moderate texts, measure the moderation layers, red-team a model.

* ``check TEXT|FILE``: each text's category and which layer caught it (rules or classifier)
  and the policy's action for the place (``--place prompt|answer``). A FILE is JSONL (the
  ``text`` field of each row) or plain text (one text a line).
* ``eval``: per-category precision and recall of rules, classifier and both, on held-out
  labelled data (default: the run's ``supportworld/safety/test.jsonl``).
* ``redteam [MODEL]``: the unsafe-answer rate of a chat model on the held-out red-team prompts,
  raw and as ``serve --guard`` delivers them (``chatforge.safety.redteam``).

Results of ``eval`` and ``redteam`` are written to ``runs/<run>/safety/*.json`` (the report's
safety section reads them) and, for a registered model, kept with its version in the registry.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from chatforge.errors import ChatforgeError
from chatforge.io import dumps_line
from chatforge.safety.pipeline import (
    keep_result,
    moderation_metrics,
    moderation_tables,
    redteam_metrics,
    redteam_tables,
    report_case,
)


def _run(args: argparse.Namespace) -> Any:
    from chatforge.paths import RunPaths

    return RunPaths.of(args.runs_dir or "runs", args.name or "default")


def moderator_for(args: argparse.Namespace, run: Any, device: str = "cpu") -> Any:
    """The policy of ``--policy`` with the classifier of ``--classifier`` (default: the run's moderation
    model when it exists and the policy names none; ``--rules-only`` for none)."""
    from chatforge.safety.moderation import Moderator
    from chatforge.safety.policy import load_policy

    policy = load_policy(args.policy)
    classifier: Path | None = None
    if not getattr(args, "rules_only", False):
        if args.classifier:
            classifier = Path(args.classifier)
        elif policy.classifier:
            classifier = Path(policy.classifier) if Path(policy.classifier).is_absolute() \
                else run.root / policy.classifier
        else:
            default = run.stage("finetune/moderation").model
            classifier = default if (default / "config.json").is_file() else None
        if classifier is not None and not (classifier / "config.json").is_file():
            raise ChatforgeError(f"{classifier}: no moderation model there (train one with `chatforge finetune "
                                 "moderation`, or pass --rules-only)")
    return Moderator(policy, classifier, device)


def _texts(arg: str) -> list[tuple[str, str]]:
    """``(where, text)`` of TEXT or of each line of FILE."""
    p = Path(arg)
    if not p.is_file():
        return [("text", arg)]
    out = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            if p.suffix == ".jsonl":
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ChatforgeError(f"{p}:{i}: malformed JSON: {e.msg}") from e
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ChatforgeError(f"{p}:{i}: needs a string field 'text'")
                out.append((f"{p}:{i}", obj["text"]))
            else:
                out.append((f"{p}:{i}", line.rstrip("\n")))
    return out


def cmd_check(args: argparse.Namespace) -> None:
    run = _run(args)
    moderator = moderator_for(args, run)
    texts = _texts(args.text)
    verdicts = moderator.check_many([t for _, t in texts], args.place, [args.context] * len(texts)
                                    if args.context is not None else None)
    if args.json:
        for (where, text), v in zip(texts, verdicts):
            sys.stdout.write(dumps_line({"where": where, "text": text, **v.to_dict()}) + "\n")
        return
    for (where, _text), v in zip(texts, verdicts):
        if not v.flagged:
            print(f"{where}: safe ({args.place}: {v.action})")
            continue
        f = v.findings[0]
        how = f"{f.rule} {f.evidence!r}" if f.layer == "rules" else f"p={f.score:.2f}"
        others = sorted({g.category for g in v.findings[1:]} - {f.category})
        print(f"{where}: {v.category} (layer {f.layer}: {how}) -> {args.place}: {v.action}"
              + (f"; also {', '.join(others)}" if others else ""))


def cmd_eval(args: argparse.Namespace) -> None:
    from chatforge.io import read_jsonl
    from chatforge.safety.redteam import moderation_eval

    run = _run(args)
    data = Path(args.data) if args.data else run.supportworld / "safety" / "test.jsonl"
    if not data.is_file():
        raise ChatforgeError(f"{data}: no such file; give --data ({{\"text\", \"label\"}} JSONL) or run "
                             "`chatforge data generate` first")
    rows = []
    for lineno, row in read_jsonl(data):
        if not isinstance(row.get("text"), str) or not isinstance(row.get("label"), str):
            raise ChatforgeError(f"{data}:{lineno}: needs string fields 'text' and 'label'")
        rows.append(row)
    moderator = moderator_for(args, run)
    result = moderation_eval(moderator, rows)
    result["data"] = str(data)
    layers = result["layers"]
    clf = moderator.classifier
    path = keep_result(run.root, Path(clf.source) if clf is not None else None, "moderation", result,
                       f"Moderation on {result['n']} held-out texts", moderation_metrics(result), [],
                       moderation_tables(result))
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    print(f"moderation on {result['n']} texts of {data} (support: "
          f"{', '.join(f'{k} {v}' for k, v in result['support'].items())})")
    names = list(layers)
    print(f"{'category':<20}{'support':>8}" + "".join(f"{n + ' P':>12}{n + ' R':>12}" for n in names))
    cats = next(iter(layers.values()))["per_category"]
    for cat in cats:
        print(f"{cat:<20}{cats[cat]['support']:>8}" + "".join(
            f"{layers[n]['per_category'][cat]['precision']:>12.3f}{layers[n]['per_category'][cat]['recall']:>12.3f}"
            for n in names))
    print(f"{'unsafe vs safe':<20}{'':>8}" + "".join(
        f"{layers[n]['unsafe_vs_safe']['precision']:>12.3f}{layers[n]['unsafe_vs_safe']['recall']:>12.3f}"
        for n in names))
    print(f"written to {path}")


def cmd_redteam(args: argparse.Namespace) -> None:
    from chatforge.cli import _model_dir
    from chatforge.device import resolve_device, resolve_precision
    from chatforge.eval.checks import SupportChecks, support_rows
    from chatforge.safety.redteam import redteam_eval
    from chatforge.train.checkpoint import load_model

    run = _run(args)
    data = Path(args.data) if args.data else run.supportworld / "safety" / "redteam.jsonl"
    if not data.is_file():
        raise ChatforgeError(f"{data}: no such file; give --data or run `chatforge data generate` first")
    rows = support_rows(data, args.limit)
    device = resolve_device(args.device)
    model_dir = _model_dir(args)
    model, tok, _ = load_model(model_dir, device)
    moderator = moderator_for(args, run)
    with resolve_precision(args.dtype, device).autocast():
        result = redteam_eval(model, tok, rows, device, moderator, args.max_new_tokens, SupportChecks.for_data(data))
    result["model"] = str(model_dir)
    label = args.label or model_dir.parent.name
    path = keep_result(run.root, model_dir, f"redteam-{label}", result, f"Red team: {label} ({result['n']} prompts)",
                       redteam_metrics(result), [report_case(c) for c in result["cases"] if c["unsafe"]],
                       redteam_tables(result))
    if args.json:
        sys.stdout.write(json.dumps({k: v for k, v in result.items() if k != "cases"}) + "\n")
        return
    print(format_redteam(result, str(model_dir)))
    print(f"written to {path}")


def format_redteam(result: dict[str, Any], model: str) -> str:
    def cell(r: dict[str, Any]) -> str:
        lo, hi = r["ci95"]
        return f"{100 * r['rate']:.1f}% ({r['k']}/{r['n']}, 95% CI {100 * lo:.1f}-{100 * hi:.1f}%)"

    lines = [f"{model}: red team, {result['n']} held-out prompts that must be refused",
             f"  unsafe answers:              {cell(result['unsafe'])}",
             f"  unsafe with guarded serving: {cell(result['unsafe_guarded'])}",
             f"  refused:                     {cell(result['refused'])}"]
    for kind, r in result["by_kind"].items():
        lines.append(f"  {kind:<16} unsafe {cell(r['unsafe'])}; guarded {cell(r['unsafe_guarded'])}")
    return "\n".join(lines)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="default", help="policy TOML file, or 'default' (the shipped policy)")
    p.add_argument("--classifier", metavar="DIR", help="moderation model (default: the run's finetune/moderation "
                                                       "model when it exists, or the policy's 'classifier')")
    p.add_argument("--rules-only", action="store_true", help="no classifier layer")
    p.add_argument("--json", action="store_true")


def add_safety_parser(sub: Any, add_model_args: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("safety", help="moderation (rules + classifier) and red-teaming under a safety policy",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_subparsers(dest="safety_cmd", required=True)
    ck = s.add_parser("check", help="category and catching layer of a text or of each line of a file")
    ck.add_argument("text", metavar="TEXT|FILE")
    ck.add_argument("--place", choices=["prompt", "answer"], default="prompt")
    ck.add_argument("--context", help="the conversation an answer replies to (for foreign identifiers)")
    ck.add_argument("--name", help="run name (default: 'default')")
    ck.add_argument("--runs-dir", help="directory holding runs (default: runs)")
    _common(ck)
    ck.set_defaults(func=cmd_check)
    ev = s.add_parser("eval", help="per-category precision and recall of rules, classifier and both")
    ev.add_argument("--data", help="labelled JSONL (default: the run's supportworld/safety/test.jsonl)")
    ev.add_argument("--name", help="run name (default: 'default')")
    ev.add_argument("--runs-dir", help="directory holding runs (default: runs)")
    _common(ev)
    ev.set_defaults(func=cmd_eval)
    rt = s.add_parser("redteam", help="unsafe-answer rate on held-out red-team prompts, raw and guarded")
    add_model_args(rt, "sft")
    rt.add_argument("--data", help="red-team JSONL (default: the run's supportworld/safety/redteam.jsonl)")
    rt.add_argument("--limit", type=int, default=0)
    rt.add_argument("--label", help="name of the result file (default: the model's stage)")
    rt.add_argument("--max-new-tokens", type=int, default=96)
    rt.add_argument("--device", default="auto")
    rt.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    _common(rt)
    rt.set_defaults(func=cmd_redteam)
    return p
