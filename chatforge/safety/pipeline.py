"""The safety stage of the pipeline and the results files both it and ``chatforge safety`` write.

``runs/<run>/safety/moderation.json`` and ``redteam-<stage>.json`` are in the shape the
report's safety section reads (``{"title", "metrics", "cases", "result"}``); for a
registered model the result is also kept with its version in the registry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chatforge.errors import ChatforgeError


def moderation_tables(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per category: support, then precision and recall of each layer (the report's table)."""
    layers = list(result["layers"])
    cats = list(next(iter(result["layers"].values()))["per_category"])
    rows = [[c, result["layers"][layers[0]]["per_category"][c]["support"],
             *(round(result["layers"][n]["per_category"][c][k], 3) for n in layers for k in ("precision", "recall"))]
            for c in cats]
    rows.append(["unsafe vs safe", sum(result["support"].get(c, 0) for c in cats),
                 *(round(result["layers"][n]["unsafe_vs_safe"][k], 3) for n in layers for k in ("precision", "recall"))])
    return [{"title": "precision and recall per category", "columns": ["category", "support", *(
        f"{n} {k}" for n in layers for k in ("P", "R"))], "rows": rows,
        "note": f"{result['n']} held-out texts; 'both' is rules first, then the classifier, as serving runs them"}]


def redteam_tables(result: dict[str, Any]) -> list[dict[str, Any]]:
    def pct(r: dict[str, Any]) -> str:
        lo, hi = r["ci95"]
        return f"{100 * r['rate']:.1f}% ({r['k']}/{r['n']}; {100 * lo:.0f}-{100 * hi:.0f}%)"

    rows = [["all", result["n"], pct(result["unsafe"]), pct(result["unsafe_guarded"]), pct(result["refused"])]]
    rows += [[kind, r["n"], pct(r["unsafe"]), pct(r["unsafe_guarded"]), ""] for kind, r in result["by_kind"].items()]
    return [{"title": "unsafe-answer rate", "columns": ["prompts", "n", "unsafe", "unsafe, guarded", "refused"],
             "rows": rows, "note": "unsafe: leaks another customer's data, swears, or complies with a request it "
                                   "must refuse (chatforge.safety.redteam); 95% Wilson intervals"}]


def keep_result(root: Path, model_dir: Path | None, kind: str, result: dict[str, Any], title: str,
                metrics: dict[str, Any], cases: list[dict[str, Any]],
                tables: list[dict[str, Any]] | None = None) -> Path:
    """Write ``root/safety/<kind>.json`` and keep the result with the model's registered version."""
    from chatforge.io import write_json

    path = root / "safety" / f"{kind}.json"
    write_json(path, {"title": title, "metrics": {k: v for k, v in metrics.items() if v is not None},
                      "cases": cases[:20], "tables": tables or [], "result": result})
    if model_dir is not None:
        from chatforge.registry import Registry, RegistryError

        try:
            version = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("version")
            if version:
                Registry(root.parent).add_eval(version, f"safety-{kind}", {"metrics": metrics, **result})
        except (RegistryError, OSError, json.JSONDecodeError):
            pass  # an unregistered model: the file is its record
    return path


def report_case(c: dict[str, Any]) -> dict[str, Any]:
    """A red-team case as the report shows it."""
    return {"kind": c["kind"], "prompt": c["prompt"], "answer": c["answer"], "why": ", ".join(c["why"]),
            "delivered (guarded)": c["delivered"]}


def moderation_metrics(result: dict[str, Any]) -> dict[str, float]:
    layers = result["layers"]
    out = {f"moderation/{layer}/{cat}/{k}": v[k] for layer, lr in layers.items()
           for cat, v in lr["per_category"].items() for k in ("precision", "recall")}
    out.update({f"moderation/{layer}/unsafe_{k}": lr["unsafe_vs_safe"][k] for layer, lr in layers.items()
                for k in ("precision", "recall")})
    return out


def redteam_metrics(result: dict[str, Any]) -> dict[str, Any]:
    return {"safety/redteam_unsafe_rate": result["unsafe"]["rate"],
            "safety/redteam_unsafe_rate_guarded": result["unsafe_guarded"]["rate"],
            "safety/redteam_refusal_rate": result["refused"]["rate"], "safety/redteam_prompts": result["n"]}


def evaluate_safety(cfg: Any, run: Any, models: list[tuple[str, Path]],
                    bias_models: list[tuple[str, Path]] = ()) -> dict[str, Any]:
    """The pipeline's safety stage (``chatforge.pipeline.safety_stage``): returns the headline numbers."""
    from chatforge.device import resolve_device, resolve_precision
    from chatforge.eval.checks import SupportChecks, support_rows
    from chatforge.io import read_jsonl
    from chatforge.safety.moderation import Moderator
    from chatforge.safety.policy import load_policy
    from chatforge.safety.redteam import moderation_eval, redteam_eval
    from chatforge.train.checkpoint import load_model

    policy = load_policy(cfg.safety.policy)
    classifier = run.stage("finetune/moderation").model
    if not (classifier / "config.json").is_file():
        raise ChatforgeError(f"{classifier}: no moderation model; run `chatforge finetune moderation` first")
    device = resolve_device("auto")
    moderator = Moderator(policy, classifier, str(device))
    sw = run.supportworld / "safety"
    rows = [row for _, row in read_jsonl(sw / "test.jsonl")]
    mod = moderation_eval(moderator, rows)
    mod["data"] = str(sw / "test.jsonl")
    keep_result(run.root, classifier, "moderation", mod, f"Moderation on {mod['n']} held-out texts",
                moderation_metrics(mod), [], moderation_tables(mod))
    out: dict[str, Any] = {f"moderation_{k}": v for k, v in mod["layers"]["both"]["unsafe_vs_safe"].items()}
    red_rows = support_rows(sw / "redteam.jsonl", cfg.safety.redteam_prompts)
    checks = SupportChecks.for_data(sw / "redteam.jsonl")
    for name, model_dir in models:
        model, tok, _ = load_model(model_dir, device)
        with resolve_precision("auto", device).autocast():
            res = redteam_eval(model, tok, red_rows, device, moderator, cfg.safety.max_new_tokens, checks)
        res["model"] = str(model_dir)
        keep_result(run.root, model_dir, f"redteam-{name}", res, f"Red team: {name} ({res['n']} prompts)",
                    redteam_metrics(res), [report_case(c) for c in res["cases"] if c["unsafe"]], redteam_tables(res))
        out[f"{name}_unsafe"] = res["unsafe"]["rate"]
        out[f"{name}_unsafe_guarded"] = res["unsafe_guarded"]["rate"]
    out["redteam_prompts"] = len(red_rows)
    if bias_models:
        from chatforge.io import write_json
        from chatforge.safety.bias import bias_metrics, bias_table, evaluate_bias

        sentiment = run.stage("finetune/sentiment").model
        results = {}
        for name, model_dir in bias_models:
            result = evaluate_bias(model_dir, classifier=sentiment if (sentiment / "config.json").is_file() else None)
            results[name] = result
            m = bias_metrics(result)
            for k in ("bias/likelihood/gender/mean_abs_diff_per_token", "bias/classifier/gender/flip_rate",
                      "bias/stereotype/pct_stereotype", "bias/chat/gender/answers_differ"):
                if m.get(k) is not None:
                    out[f"{name}_{k.removeprefix('bias/').replace('/', '_')}"] = m[k]
        # The models side by side; the per-model files (bias-<stage>-<version>.json) hold each one's detail.
        write_json(run.root / "safety" / "bias.json",
                   {"title": f"Bias probes: {', '.join(results)}", "metrics": {}, "cases": [],
                    "tables": [bias_table(results)]})
    return out
