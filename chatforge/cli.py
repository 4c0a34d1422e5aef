"""The ``chatforge`` command. Thin: parses arguments and calls the modules.

    chatforge pipeline run [CONFIG] [--preset P] [--name N] [--set k=v ...] [--force STAGE]
    chatforge data generate|collect|clean|shard [-c CONFIG] [--set k=v ...]
    chatforge data balance FILE --by ATTR [--by ATTR ...] [--mode report|downsample|reweight] [--out F] [--json]
    chatforge tokenizer train [-c CONFIG] [--set k=v ...]
    chatforge tokenizer encode TOKENIZER_DIR TEXT
    chatforge pretrain [-c CONFIG] [--set k=v ...] [--init-from MODEL] [--resume]     (also under torchrun)
    chatforge finetune STAGE [--train F --val F --test F] [--init-from MODEL] [--set k=v ...] [--resume]
    chatforge align reward|dpo [--train F --val F --test F] [--init-from MODEL] [--set k=v ...] [--resume]
    chatforge align score [REWARD_MODEL] [--name RUN] --prompt TEXT --answer TEXT | --data F
    chatforge sample [MODEL] [--name RUN] [--prompt TEXT ...] [sampling flags]
    chatforge chat [MODEL] [--name RUN] [--system TEXT] [sampling flags]
    chatforge eval perplexity|prompt-classify|checks|probe [MODEL] [--name RUN] ...
    chatforge report [RUN_OR_MODEL] [--name RUN] [--compare A B] [--out DIR] [--db URL]
    chatforge export --hf MODEL DIR [--force]
    chatforge import --hf DIR [--out PATH | --name RUN] [--block-size N] [--force]

MODEL is a model directory or a stage of the run (sft, pretrain, ...); every command that
reads a run takes --name/--runs-dir.
    chatforge config show [CONFIG] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from chatforge import __version__
from chatforge.config import PRESETS, QUANTIZE_CHOICES, RunConfig, load_config, to_toml
from chatforge.errors import ChatforgeError
from chatforge.io import dumps_line
from chatforge.registry.cli import add_models_parser
from chatforge.report.cli import add_report_parser
from chatforge.safety.cli import add_safety_parser
from chatforge.serve.cli import add_serve_parser
from chatforge.stages import align_stages, finetune_stages
from chatforge.store.cli import add_feedback_parser

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def _add_config_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("config", nargs="?", help="TOML config file (tables mirror the config dataclasses)")
    else:
        p.add_argument("-c", "--config", help="TOML config file (tables mirror the config dataclasses)")
    p.add_argument("--preset", choices=list(PRESETS), help="preset to start from (default: tiny)")
    p.add_argument("--name", help="run name: outputs go to RUNS_DIR/NAME (default: 'default')")
    p.add_argument("--runs-dir", help="directory holding runs (default: runs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set clean.min_words=5 (repeatable)")


def _config(args: argparse.Namespace, extra: list[str] = ()) -> RunConfig:
    overrides = list(args.overrides) + list(extra)
    if args.name:
        overrides.append(f"name={json.dumps(args.name)}")
    if args.runs_dir:
        overrides.append(f"runs_dir={json.dumps(args.runs_dir)}")
    return load_config(args.config, overrides=overrides, preset=args.preset)


def _fmt_metrics(metrics: dict[str, Any], limit: int = 4) -> str:
    parts = []
    for k, v in metrics.items():
        if isinstance(v, dict | list):
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
        if len(parts) == limit:
            break
    return " ".join(parts)


def _run(cfg: RunConfig, only: list[str] | None, force: list[str]) -> None:
    from chatforge.pipeline import run_pipeline

    def on_start(stage, reason):
        console.print(f"[bold]▶ {stage.name}[/bold] ({reason}): {stage.describe}")

    def on_end(r):
        if r.status == "skipped":
            console.print(f"[dim]✓ {r.name}: up to date, skipped[/dim]")
        else:
            console.print(f"[green]✓ {r.name}[/green] in {r.wall_time_s:.1f}s  {_fmt_metrics(r.metrics)}")

    results = run_pipeline(cfg, only=only, force=force, on_start=on_start, on_end=on_end)
    table = Table(title=f"run {cfg.name!r} ({cfg.preset})")
    for col in ("stage", "status", "time (s)", "metrics"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, r.status, f"{r.wall_time_s:.1f}", _fmt_metrics(r.metrics, limit=6))
    console.print(table)
    _print_reports(cfg)
    _mirror_to_mlflow(cfg)
    _print_outputs(cfg)


def _mirror_to_mlflow(cfg: RunConfig) -> None:
    """``registry.mlflow_uri`` set: copy the run's registered versions and aliases into MLflow."""
    if not cfg.registry.mlflow_uri:
        return
    from chatforge.registry import Registry
    from chatforge.registry.mlflow_mirror import mirror

    out = mirror(Registry(cfg.runs_dir), cfg.registry.mlflow_uri, cfg.name)
    for model, c in out["models"].items():
        console.print(f"\nMLflow {out['uri']}: model {model!r}: {c['created']} versions added, "
                      f"{c['existing']} already there, {c['aliases_set']} aliases set", markup=False)


def _print_reports(cfg: RunConfig, names: list[str] | None = None) -> None:
    """Each training stage's summary, from its eval.json (what its declaration prints)."""
    from chatforge.paths import RunPaths
    from chatforge.run import relpath
    from chatforge.stages import TRAINING_STAGES

    run = RunPaths(cfg.run_dir)
    for decl in TRAINING_STAGES:
        path = run.stage(decl.subdir).eval
        if (names is not None and decl.name not in names) or not path.is_file():
            continue
        try:
            line = decl.summary(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError):
            console.print(f"\n{decl.name}: {relpath(path)} is from an older chatforge; re-run the stage "
                          f"(--force {decl.name}) for its report", markup=False)
            continue
        console.print(f"\n[bold]{decl.name}[/bold] " + escape(line))


def _print_outputs(cfg: RunConfig) -> None:
    from chatforge.paths import RunPaths
    from chatforge.run import relpath
    from chatforge.stages import TRAINING_STAGES

    p = RunPaths(cfg.run_dir)
    rows = [
        ("SupportWorld data", p.supportworld),
        ("clean corpus", p.clean),
        ("clean report", p.clean_report),
        ("tokenizer", p.tokenizer),
        ("tokenizer report", p.tokenizer_report),
        ("train/val shards", p.shards_index),
    ]
    for decl in TRAINING_STAGES:
        out = p.stage(decl.subdir)
        rows += [(decl.label, out.model), (f"{decl.name} report", out.eval)]
        rows += [(label, out.root / name) for label, name in decl.files]
    rows.append(("manifest", p.manifest))
    console.print("\n[bold]Outputs[/bold]")
    for label, path in rows:
        if path.exists():
            console.print(f"  {label:<18} {relpath(path)}", markup=False)
    if p.stage("finetune/sft").model.exists():
        dirs = "" if cfg.runs_dir == "runs" else f" --runs-dir {cfg.runs_dir}"
        serve = f"chatforge serve{'' if cfg.name == 'default' else f' --name {cfg.name}'}{dirs}"
        users = f"chatforge feedback users add NAME --role admin{'' if cfg.name == 'default' else f' --run {cfg.name}'}{dirs}"
        console.print(f"\n[bold]Next[/bold]: talk to it and collect feedback: [cyan]{serve}[/cyan], then open "
                      f"http://127.0.0.1:8000 (create a login with [cyan]{users}[/cyan])", soft_wrap=True)


# --------------------------------------------------------------------------- commands


def cmd_pipeline_run(args: argparse.Namespace) -> None:
    cfg = _config(args)
    _run(cfg, only=args.only or None, force=args.force)
    from chatforge.report.cli import write_run_report

    written = write_run_report(cfg.run_dir)  # None until a training stage has results
    if written:
        console.print(f"\n[bold]Report card[/bold]: {escape(str(written[0]))} (and report.md beside it)", soft_wrap=True)


def cmd_round(args: argparse.Namespace) -> None:
    from chatforge.registry import Registry
    from chatforge.report import build_report, write_report
    from chatforge.report.cli import human_from_store, registry_section, write_run_report
    from chatforge.rounds import run_round
    from chatforge.store.db import default_db_url

    cfg = _config(args)
    decision = run_round(cfg, args.config, list(args.overrides),
                         say=lambda text: console.print(text, markup=False, soft_wrap=True))
    reg = Registry(cfg.runs_dir)
    run_report = write_run_report(cfg.run_dir)
    human = human_from_store(default_db_url(cfg.run_dir))
    out = cfg.run_dir / "rounds" / str(decision["round"]) / "report"
    html, _ = write_report(build_report(None, compare=(str(reg.path_of(decision["champion"])),
                                                        str(reg.path_of(decision["challenger"]))),
                                        human=human, registry=registry_section(cfg.runs_dir, cfg.name),
                                        runs_dir=cfg.runs_dir), out)
    console.print(f"\n[bold]Round {decision['round']}[/bold]: {decision['decision']}; champion "
                  f"{reg.aliases(cfg.name).get('champion')}, challenger {decision['challenger']}", soft_wrap=True)
    console.print(f"  decision: {escape(str(cfg.run_dir / 'rounds' / str(decision['round']) / 'decision.json'))}",
                  soft_wrap=True)
    console.print(f"  champion vs challenger report: {escape(str(html))}", soft_wrap=True)
    if run_report:
        console.print(f"  run report: {escape(str(run_report[0]))}", soft_wrap=True)


def cmd_data_balance(args: argparse.Namespace) -> None:
    from chatforge.data.balance import balance_file, format_result, load_name_groups

    names = load_name_groups(args.names) if args.names else None
    result = balance_file(args.file, args.by, args.mode, args.out, args.seed, names)
    if args.json:
        sys.stdout.write(dumps_line(result) + "\n")
    else:
        console.print(format_result(result), markup=False, soft_wrap=True)


def cmd_stage(args: argparse.Namespace) -> None:
    extra = []
    if getattr(args, "sources", None):
        extra.append("collect.sources=" + json.dumps(args.sources))
    _run(_config(args, extra), only=[args.stage], force=[args.stage] if args.force_stage else [])


def _train_stage(args: argparse.Namespace, name: str, extra: list[str] = ()) -> None:
    """Run one training stage (also under torchrun), record it in the manifest, print its report."""
    import time

    from chatforge.pipeline import training_stage
    from chatforge.run import RunDir
    from chatforge.stages import get_stage
    from chatforge.train.dist import dist_from_env, shutdown_distributed
    from chatforge.train.stage import flat_metrics, run_stage

    extra = list(extra)
    if getattr(args, "init_from", None):
        extra.append(f"{name}.init_from={json.dumps(args.init_from)}")
    cfg = _config(args, extra)
    dist = dist_from_env()  # under torchrun: data-parallel; rank 0 evaluates, writes and reports
    t0 = time.perf_counter()
    try:
        ev = run_stage(cfg, name, resume=args.resume, dist=dist)
    finally:
        shutdown_distributed()
    if dist.is_main:
        RunDir(cfg.run_dir).record(cfg, training_stage(get_stage(name)), flat_metrics(ev), time.perf_counter() - t0)
        _print_reports(cfg, [name])
        parent = ev.get("parent")
        lineage = f" from {parent['stage']} model {parent['version']} ({parent['path']})" if parent else ""
        console.print(f"  model version {ev['version']}{lineage}", markup=False)
        _print_outputs(cfg)


def cmd_pretrain(args: argparse.Namespace) -> None:
    _train_stage(args, "pretrain")


def cmd_finetune(args: argparse.Namespace) -> None:
    extra = [f"{args.stage}.{split}_data={json.dumps(v)}" for split, v in
             (("train", args.train), ("val", args.val), ("test", args.test)) if v]
    _train_stage(args, args.stage, extra)


def cmd_align_score(args: argparse.Namespace) -> None:
    from chatforge.align.reward import load_reward_model, score_answers
    from chatforge.device import resolve_device
    from chatforge.io import read_jsonl

    items: list[tuple[list[dict[str, Any]], str]] = []
    if args.data:
        for line, row in read_jsonl(Path(args.data)):
            answer = row.get("answer", row.get("completion"))
            prompt = row.get("prompt")
            if not isinstance(answer, str) or not isinstance(prompt, str | list):
                raise ChatforgeError(f"{args.data}:{line}: needs 'prompt' (text or messages) and 'answer' (text)")
            items.append(([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt, answer))
    elif args.prompt is not None and args.answer is not None:
        system = [{"role": "system", "content": args.system}] if args.system else []
        items.append(([*system, {"role": "user", "content": args.prompt}], args.answer))
    else:
        raise ChatforgeError("align score: give --prompt and --answer, or --data FILE")
    model_dir = _model_dir(args)
    model, tok = load_reward_model(model_dir, resolve_device(args.device))
    for score in score_answers(model, tok, items):
        sys.stdout.write(json.dumps({"score": None if score is None else round(score, 6)}) + "\n")


def cmd_align_pairs(args: argparse.Namespace) -> None:
    from chatforge.align.rewards import CombinedReward
    from chatforge.align.sampled import sample_pairs_from_model
    from chatforge.device import resolve_device
    from chatforge.paths import RunPaths
    from chatforge.train.checkpoint import load_model

    model_dir = _model_dir(args)
    run = RunPaths.of(args.runs_dir or "runs", args.name or "default")
    data = args.data or str(run.supportworld / "conversations" / "train.jsonl")
    rewards = [r.strip() for r in args.rewards.split(",") if r.strip()]
    weights = [float(w) for w in args.reward_weights.split(",")] if args.reward_weights else []
    reward = CombinedReward(rewards, weights, data, run.root, model_dir)
    model, tok, _ = load_model(model_dir, resolve_device(args.device))
    out = Path(args.out) if args.out else run.root / "align" / "pairs" / "sampled.jsonl"
    stats = sample_pairs_from_model(model, tok, data, reward, out, args.samples, args.limit, args.temperature,
                                    args.top_k, args.max_new_tokens, seed=args.seed, dtype=args.dtype,
                                    min_gap=args.min_gap)
    print(f"{out}: {stats.summary()}")
    print(f"train on them: chatforge align dpo --train {out}")


def _feedback_db(args: argparse.Namespace) -> str:
    from chatforge.paths import RunPaths
    from chatforge.store.db import default_db_url

    return args.db or default_db_url(RunPaths.of(args.runs_dir or "runs", args.name or "default").root)


def cmd_align_compare_queue(args: argparse.Namespace) -> None:
    from chatforge.align.review import parent_of, queue_comparison
    from chatforge.store.db import Store

    aligned = _model_dir(args)
    parent = Path(args.against) if args.against else parent_of(aligned)
    reviewers = [r.strip() for r in args.reviewers.split(",") if r.strip()]
    store = Store(_feedback_db(args))
    try:
        out = queue_comparison(store, aligned, parent, reviewers, args.prompts, args.overlap, args.dataset,
                               args.owner)
    finally:
        store.close()
    print(f"queued a blind comparison of {out['aligned']} against {out['parent']}: {out['prompts']} prompts, "
          f"{out['assignments']} ranking assignments for {', '.join(reviewers)} in dataset {out['dataset']!r} "
          f"(reviewers see it under Rank in the web app); read it back with "
          f"`chatforge align compare result {json.dumps(out['dataset'])}`")


def cmd_align_compare_result(args: argparse.Namespace) -> None:
    from chatforge.align.review import comparison_result
    from chatforge.store.db import Store

    store = Store(_feedback_db(args))
    try:
        out = comparison_result(store, args.dataset)
    finally:
        store.close()
    if args.json:
        print(json.dumps(out, indent=2))
        return
    if not out["judgements"]:
        print(f"{out['dataset']}: no judgements yet ({out['aligned']} vs {out['parent']})")
        return
    low, high = out["interval_95"]
    line = (f"{out['aligned']} vs {out['parent']}: the aligned answer was preferred in {out['aligned_wins']} of "
            f"{out['judgements']} blind judgements, win rate {100 * out['win_rate']:.0f}% (95% interval "
            f"{100 * low:.0f}-{100 * high:.0f}%)")
    if out.get("pairwise_agreement") is not None:
        line += (f"; reviewers agree on {100 * out['pairwise_agreement']:.0f}% of the "
                 f"{out['agreement_prompts']} prompts ranked by two or more")
    print(line)


QUANTIZE_HELP = ("int8: the model's matrices in int8, as `chatforge serve --quantize int8` runs them (CPU), to "
                 "measure what quantisation costs")
FREQUENCY_PENALTY_HELP = ("OpenAI's, in [-2, 2]: a token's logit drops by this for each time it was already generated "
                          "(the prompt does not count); default: eval.generation.FREQUENCY_PENALTY (0.5), which "
                          "breaks a small model's greedy one-token loops")


def _frequency_penalty(args: argparse.Namespace) -> float:
    from chatforge.eval.generation import FREQUENCY_PENALTY

    return FREQUENCY_PENALTY if args.frequency_penalty is None else args.frequency_penalty


def _add_model_args(p: argparse.ArgumentParser, default_stage: str) -> None:
    """MODEL (a directory, or a stage of the run) and the run it is looked up in."""
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help=f"model directory, a stage of the run (e.g. sft, pretrain), NAME@ALIAS or a registered version; "
                        f"default: {default_stage}")
    p.add_argument("--name", help="run name (default: 'default')")
    p.add_argument("--runs-dir", help="directory holding runs (default: runs)")
    p.set_defaults(default_stage=default_stage)


def _model_dir(args: argparse.Namespace) -> Path:
    """The model directory MODEL names, looked up in the run of ``--name``/``--runs-dir``."""
    from chatforge.paths import RunPaths
    from chatforge.registry import registered_model_dir
    from chatforge.stages import TRAINING_STAGES, get_stage

    run = RunPaths.of(args.runs_dir or "runs", args.name or "default")
    value = args.model or args.default_stage
    registered = registered_model_dir(value, run.root.parent, run.name) if args.model else None
    if registered is not None:
        return registered
    if args.model and (Path(value).is_dir() or value not in {d.name for d in TRAINING_STAGES}):
        return Path(value)  # a directory (load_model says clearly when it is not a model)
    path = run.stage(get_stage(value).subdir).model
    if not path.is_dir():
        flags = "" if run.name == "default" and run.root.parent == Path("runs") else \
            f" --name {run.name} --runs-dir {run.root.parent}"
        raise ChatforgeError(f"no {value} model in run {run.name!r} (expected {path}); run "
                             f"`chatforge pipeline run{flags}` first, or give a model directory")
    return path


def cmd_eval_suite(args: argparse.Namespace) -> None:
    from chatforge.eval.suite import format_result, run_suite

    opts = {"tasks": args.tasks, "limit": args.limit, "n_prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
            "exclude": not args.keep_contaminated, "device": args.device, "dtype": args.dtype}
    result = run_suite(_model_dir(args), out=args.out, **opts)
    against = None
    if args.against:
        against = run_suite(_model_dir(argparse.Namespace(**{**vars(args), "model": args.against})), **opts)
    if args.json:
        sys.stdout.write(json.dumps({"result": result, "against": against}) + "\n")
    else:
        console.print(format_result(result, against), markup=False, soft_wrap=True)


def cmd_chat(args: argparse.Namespace) -> None:
    from chatforge.chat.repl import Sampling, chat_loop
    from chatforge.device import resolve_device
    from chatforge.train.checkpoint import load_model

    device = resolve_device(args.device)
    model_dir = _model_dir(args)
    model, tok, meta = load_model(model_dir, device)
    if meta.get("task") != "chat":
        err_console.print(f"note: {model_dir} was not fine-tuned for chat (stage {meta.get('stage')!r}); "
                          "its replies may not follow the chat format", markup=False)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, frequency_penalty=_frequency_penalty(args),
                        presence_penalty=args.presence_penalty, max_new_tokens=args.max_new_tokens, seed=args.seed)
    chat_loop(model, tok, sampling, system=args.system or "", device=device)


def cmd_sample(args: argparse.Namespace) -> None:
    from chatforge.device import resolve_device
    from chatforge.model.generate import generate, stream
    from chatforge.train.checkpoint import load_model

    device = resolve_device(args.device)
    model, tok, _ = load_model(_model_dir(args), device)
    prompts = args.prompt or [""]
    encoded = [[tok.bos_id, *tok.encode(p)] for p in prompts]
    kwargs = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                  repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                  presence_penalty=args.presence_penalty, stop_tokens=[tok.bos_id], seed=args.seed, device=device)
    if args.stream and len(encoded) == 1:
        sys.stdout.write(prompts[0])
        pending: list[int] = []
        for t in stream(model, encoded[0], args.max_new_tokens, **kwargs):
            pending.append(t)
            text = tok.decode(pending)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text)
                sys.stdout.flush()
                pending = []
        sys.stdout.write(tok.decode(pending) + "\n")
        return
    outs = generate(model, encoded, args.max_new_tokens, **kwargs)
    for p, o in zip(prompts, outs):
        console.print(f"[bold]{escape(p)}[/bold]{escape(tok.decode(o))}\n")


def cmd_eval_perplexity(args: argparse.Namespace) -> None:
    from chatforge.device import resolve_device
    from chatforge.eval.lm import perplexity
    from chatforge.model.quantize import quantize_model
    from chatforge.train.checkpoint import load_model

    device = resolve_device(args.device)
    model_dir = _model_dir(args)
    model, tok, _ = load_model(model_dir, device)
    model = quantize_model(model, args.quantize)
    shards = args.shards
    if shards:  # a run's shards.json stands for its validation shards
        from chatforge.data.shard import SUMMARY_NAME, split_files
        shards = [f for s in shards for f in (split_files(Path(s).parent, "val") if Path(s).name == SUMMARY_NAME
                                              else [s])]
    result = perplexity(model, tok, text=args.text, shards=shards, block_size=args.block_size,
                        batch_size=args.batch_size, max_batches=args.max_batches, device=device,
                        text_field=args.text_field)
    result = {"model": str(model_dir), "quantize": args.quantize, **result}
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    console.print(f"{model_dir}: perplexity {result['val_ppl']:.3f}  loss {result['val_loss']:.4f}  "
                  f"bits/byte {result['val_bpb']:.4f}  over {result['val_tokens']:,} tokens", markup=False)


def cmd_eval_checks(args: argparse.Namespace) -> None:
    from chatforge.eval.checks import (
        SupportChecks,
        evaluate_checks,
        format_report,
        score_candidates,
        support_rows,
    )
    from chatforge.io import read_jsonl, write_jsonl
    from chatforge.paths import RunPaths

    run = RunPaths.of(args.runs_dir or "runs", args.name or "default")
    data = Path(args.data) if args.data else run.supportworld / "conversations" / "test.jsonl"
    if not data.is_file():
        raise ChatforgeError(f"{data}: no such file; give --data (SupportWorld conversations) or run "
                             f"`chatforge data generate{'' if run.name == 'default' else f' --name {run.name}'}` first")
    checks = SupportChecks.for_data(data)
    rows = support_rows(data, args.limit)
    if args.candidates:  # the checks on the data's own ranked candidates: what they catch
        path = data.parent.parent / "candidates" / data.name
        if not path.is_file():
            raise ChatforgeError(f"{path}: no such file (the candidates beside {data})")
        ids = {str(r["id"]).replace("conv-", "") for r in rows}
        cands = [c for _, c in read_jsonl(path) if str(c.get("id", "")).replace("cand-", "") in ids]
        by_quality = score_candidates(rows, cands, checks)
        if args.json:
            sys.stdout.write(json.dumps({"data": str(data), "candidates": str(path), "by_quality": by_quality}) + "\n")
            return
        for quality, report in by_quality.items():
            console.print(f"\n[bold]{quality}[/bold] ({report['answers']} answers)")
            console.print(format_report(report).split("\n\n")[0], markup=False, soft_wrap=True)
        return

    from chatforge.device import resolve_device
    from chatforge.model.quantize import model_precision, quantize_model
    from chatforge.train.checkpoint import load_model

    device = resolve_device(args.device)
    model_dir = _model_dir(args)
    model, tok, _ = load_model(model_dir, device)
    model = quantize_model(model, args.quantize)
    with model_precision(model, args.dtype, device).autocast():
        report, results = evaluate_checks(model, tok, rows, checks, args.max_new_tokens, device,
                                          frequency_penalty=_frequency_penalty(args))
    report = {"model": str(model_dir), "data": str(data), "quantize": args.quantize, **report}
    if args.answers:
        write_jsonl(Path(args.answers), results)
    if args.json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    skipped = f"; {report['skipped']} skipped: the prompt leaves too little of the context for an answer" \
        if report["skipped"] else ""
    console.print(f"{model_dir}: SupportWorld checks on {report['answers']} greedy answers (frequency penalty "
                  f"{report['frequency_penalty']:g}) to {data}{skipped}",
                  markup=False, soft_wrap=True)
    console.print(format_report(report), markup=False, soft_wrap=True)


def cmd_eval_probe(args: argparse.Namespace) -> None:
    from chatforge.device import resolve_device
    from chatforge.eval.probe import copy_probe, lookup_probe
    from chatforge.train.checkpoint import load_model

    device = resolve_device(args.device)
    model_dir = _model_dir(args)
    model, tok, _ = load_model(model_dir, device)
    result = {"model": str(model_dir), "seed": args.seed, "n": args.n,
              **copy_probe(model, tok, n=args.n, length=args.length, seed=args.seed),
              **lookup_probe(model, tok, n=args.n, seed=args.seed)}
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    console.print(f"{model_dir}: copy probe ({args.n} random sequences of {result['length']:.0f} tokens, each "
                  f"repeated): nll {result['first_nll']:.3f} on the first copy, {result['repeat_nll']:.3f} on the "
                  f"repeat, ratio {result['repeat_ratio']:.3f} (about 1: no in-context copying)", markup=False, soft_wrap=True)
    if "lookup_nll" in result:
        console.print(f"record lookup ({args.n} records of 3 orders): nll {result['lookup_nll']:.3f} per token on "
                      f"the asked order's number, {result['lookup_control_nll']:.3f} on a number not in the record; "
                      f"top-1 {100 * result['lookup_top1']:.1f}% of its tokens", markup=False, soft_wrap=True)
    else:
        console.print("record lookup: the probe's records do not fit the model's context", markup=False, soft_wrap=True)


def cmd_eval_bias(args: argparse.Namespace) -> None:
    from chatforge.safety.bias import evaluate_bias, format_result

    classifier = None
    if args.classifier:  # a directory, a stage of the run (sentiment) or a registered version, as MODEL
        classifier = _model_dir(argparse.Namespace(**{**vars(args), "model": args.classifier}))
    result = evaluate_bias(_model_dir(args), classifier=classifier, chat=args.chat, device=args.device,
                           dtype=args.dtype, out=args.out, n=args.n, n_chat=args.n_chat, seed=args.seed,
                           axes=args.axes, max_new_tokens=args.max_new_tokens, stereotypes=not args.no_stereotypes,
                           crows_pairs=args.crows_pairs or (), bbq=args.bbq or ())
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        console.print(format_result(result), markup=False, soft_wrap=True)


def cmd_eval_prompt_classify(args: argparse.Namespace) -> None:
    from chatforge.device import resolve_device
    from chatforge.eval.metrics import format_confusion
    from chatforge.finetune.classify import read_labelled
    from chatforge.finetune.prompting import DEFAULT_INSTRUCTION, prompt_classify
    from chatforge.train.checkpoint import load_model

    device = resolve_device(args.device)
    model, tok, _ = load_model(_model_dir(args), device)
    rows = read_labelled(args.data, args.text_field, args.label_field)[: args.limit or None]
    labels = args.labels.split(",") if args.labels else sorted({label for _, _, label in rows})
    report = prompt_classify(model, tok, rows, labels, args.instruction or DEFAULT_INSTRUCTION, device)
    if args.json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    console.print(f"prompt-only accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f} on "
                  f"{report['n']} examples (majority-class baseline {report['majority_baseline']:.3f})", markup=False)
    console.print(format_confusion(report), markup=False)


def cmd_config_show(args: argparse.Namespace) -> None:
    sys.stdout.write(to_toml(_config(args)))


def cmd_tokenizer_encode(args: argparse.Namespace) -> None:
    from chatforge.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(args.tokenizer))
    ids = tok.encode(args.text)
    console.print(json.dumps(ids))
    console.print(" | ".join(tok.id_to_token(i) for i in ids), markup=False)
    console.print(f"{len(args.text.encode())} bytes -> {len(ids)} tokens", markup=False)


def cmd_export(args: argparse.Namespace) -> None:
    from chatforge.interop import export_hf

    _quiet_transformers()
    out = export_hf(_model_dir(args), Path(args.dir), force=args.force)
    console.print(f"exported {out['architecture']} (vocab {out['vocab_size']}, eos/end-of-turn id "
                  f"{out['eos_token_id']}) to {out['dir']}", markup=False)


def cmd_import(args: argparse.Namespace) -> None:
    from chatforge.interop import import_hf
    from chatforge.paths import RunPaths

    _quiet_transformers()
    if args.out and args.name:
        raise ChatforgeError("give --out PATH or --name RUN, not both")
    run = RunPaths.of(args.runs_dir or "runs", args.name or "default")
    out = Path(args.out) if args.out else run.root / "import" / "model"
    r = import_hf(Path(args.dir), out, force=args.force, block_size=args.block_size)
    console.print(f"imported {r['architecture']} ({r['params']:,} parameters, context {r['block_size']}, vocab "
                  f"{r['vocab_size']} with chatforge's {r['added_special_tokens']} special tokens; max logit "
                  f"difference {r['max_abs_logit_diff']:.2g}) to {r['dir']}\nfine-tune it with "
                  f"`chatforge finetune sft --init-from {r['dir']}`", markup=False)


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no per-shard bars in a one-line command's output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatforge", description="Build your own ChatGPT-style assistant.")
    parser.add_argument("--version", action="version", version=f"chatforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    pipe = sub.add_parser("pipeline", help="run every stage, skipping those that are up to date")
    pipe_sub = pipe.add_subparsers(dest="action", required=True)
    run = pipe_sub.add_parser("run", help="run the pipeline")
    _add_config_args(run, positional=True)
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="re-run STAGE even if up to date ('all' for every stage; repeatable)")
    run.add_argument("--only", action="append", default=[], metavar="STAGE", help="run only STAGE (repeatable)")
    run.set_defaults(func=cmd_pipeline_run)

    data = sub.add_parser("data", help="data stages")
    data_sub = data.add_subparsers(dest="action", required=True)
    for name, stage, helptext in (
        ("generate", "supportworld", "generate the built-in SupportWorld data"),
        ("collect", "collect", "gather documents into data/raw.jsonl"),
        ("clean", "clean", "clean data/raw.jsonl into data/clean.jsonl + clean_report.json"),
        ("shard", "shard", "tokenise data/clean.jsonl into train/val shards"),
    ):
        p = data_sub.add_parser(name, help=helptext)
        if name == "collect":
            p.add_argument("sources", nargs="*", help="files, directories, globs, hf:NAME or URLs "
                                                      "(default: collect.sources, else the SupportWorld corpus)")
        _add_config_args(p)
        p.add_argument("--force", dest="force_stage", action="store_true", help="run even if up to date")
        p.set_defaults(func=cmd_stage, stage=stage)
    bal = data_sub.add_parser("balance", help="how fine-tuning rows spread over attributes; a balanced subset or "
                                              "weights (chatforge/data/balance.py)")
    bal.add_argument("file", help="rows: {text,label} or {messages} (.jsonl/.parquet/hf:NAME)")
    bal.add_argument("--by", action="append", required=True, metavar="ATTR",
                     help="a top-level field (label, intent, source, ...) or gendered_terms / names (repeatable: "
                          "several are balanced jointly)")
    bal.add_argument("--mode", choices=("report", "downsample", "reweight"), default="report",
                     help="report (default); downsample: drop rows of larger groups to the smallest group's count; "
                          "reweight: add weight = N/(K*count(value)) to every row")
    bal.add_argument("--out", help="the .jsonl to write (downsample/reweight); the report goes to OUT.balance.json")
    bal.add_argument("--seed", type=int, default=0, help="downsample: which rows are kept (default 0)")
    bal.add_argument("--names", metavar="FILE", help="names for the 'names' attribute: name per line, or "
                                                     "name,group / name<TAB>group lines, or JSON {name: group} "
                                                     "(default: SupportWorld's first names, ungrouped)")
    bal.add_argument("--json", action="store_true", help="print the result as JSON")
    bal.set_defaults(func=cmd_data_balance)

    tok = sub.add_parser("tokenizer", help="tokenizer stages and tools")
    tok_sub = tok.add_subparsers(dest="action", required=True)
    train = tok_sub.add_parser("train", help="train the tokenizer on data/clean.jsonl")
    _add_config_args(train)
    train.add_argument("--force", dest="force_stage", action="store_true", help="run even if up to date")
    train.set_defaults(func=cmd_stage, stage="tokenizer")
    enc = tok_sub.add_parser("encode", help="show how a saved tokenizer splits a text")
    enc.add_argument("tokenizer", help="tokenizer directory, e.g. runs/default/tokenizer")
    enc.add_argument("text")
    enc.set_defaults(func=cmd_tokenizer_encode)

    pre = sub.add_parser("pretrain", help="pre-train the GPT on the run's shards (torchrun for several processes)")
    _add_config_args(pre)
    pre.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this run")
    pre.add_argument("--init-from", metavar="MODEL",
                     help="continue pre-training this model (a stage of the run or a model directory) instead of "
                          "a fresh one, e.g. for mid-training")
    pre.set_defaults(func=cmd_pretrain)

    ft = sub.add_parser("finetune", help="fine-tune the pre-trained model for chat or a task")
    ft.add_argument("stage", choices=[d.name for d in finetune_stages()],
                    help="; ".join(f"{d.name}: {d.describe}" for d in finetune_stages()))
    ft.add_argument("--init-from", metavar="MODEL",
                    help="start from this model: a stage of the run (e.g. sft to continue the chat model) or a "
                         "model directory (default: the pre-trained model)")
    ft.add_argument("--train", help="training data (.jsonl/.parquet/hf:NAME; default: the SupportWorld set)")
    ft.add_argument("--val", help="validation data")
    ft.add_argument("--test", help="test data")
    _add_config_args(ft)
    ft.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this stage")
    ft.set_defaults(func=cmd_finetune)

    al = sub.add_parser("align", help="align the chat model: reward model, DPO, PPO, GRPO; score answers")
    al_sub = al.add_subparsers(dest="stage", required=True)
    for decl in align_stages():
        st = al_sub.add_parser(decl.name, help=decl.describe)
        st.add_argument("--init-from", metavar="MODEL",
                        help="start from this model: a stage of the run or a model directory (default: the chat "
                             "model, sft)")
        st.add_argument("--train", help="training data: preference pairs, JSONL {prompt, chosen, rejected}, for "
                                        "reward and dpo (default: SupportWorld's ranked answers; `chatforge feedback "
                                        "export` writes the app's); {messages} conversations whose prompts ppo and grpo "
                                        "answers (default: SupportWorld's support conversations)")
        st.add_argument("--val", help="held-out pairs")
        st.add_argument("--test", help="test pairs")
        _add_config_args(st)
        st.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this stage")
        st.set_defaults(func=cmd_finetune)
    sc = al_sub.add_parser("score", help="score answers with a reward model (read at each answer's end-of-turn "
                                         "token)")
    _add_model_args(sc, "reward")
    sc.add_argument("--prompt", help="the user's message (one answer to score with --answer)")
    sc.add_argument("--system", default="", help="system message for --prompt")
    sc.add_argument("--answer", help="the assistant's answer to --prompt")
    sc.add_argument("--data", help="JSONL of {prompt, answer} (prompt: text or messages; 'completion' also read)")
    sc.add_argument("--device", default="auto")
    sc.set_defaults(func=cmd_align_score)
    pr = al_sub.add_parser("pairs", help="preference pairs from the model's own samples, best vs worst by reward "
                                         "functions (on-policy pairs for dpo)")
    _add_model_args(pr, "sft")
    pr.add_argument("--data", help="{messages} conversations whose prompts are answered (default: SupportWorld's "
                                   "training conversations)")
    pr.add_argument("--rewards", default="checks", help="comma-separated reward functions: checks, reward_model[:DIR],"
                                                        " package.module:function (default: checks)")
    pr.add_argument("--reward-weights", help="comma-separated weights, one per reward function")
    pr.add_argument("--samples", type=int, default=4, help="answers sampled per prompt (default 4)")
    pr.add_argument("--limit", type=int, default=0, help="use the first N prompts (0 = all)")
    pr.add_argument("--temperature", type=float, default=1.0)
    pr.add_argument("--top-k", type=int, default=0, help="0 = off")
    pr.add_argument("--max-new-tokens", type=int, default=192)
    pr.add_argument("--min-gap", type=float, default=0.0, help="keep only pairs whose best and worst scores differ "
                                                              "by at least this (e.g. 0.3: two of six checks)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--out", help="output JSONL (default: runs/RUN/align/pairs/sampled.jsonl)")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--dtype", default="auto")
    pr.set_defaults(func=cmd_align_pairs)
    cmp = al_sub.add_parser("compare", help="blind reviewer comparison of an aligned model against its parent in "
                                            "the feedback app: queue it, then read the win rate back")
    cmp_sub = cmp.add_subparsers(dest="compare", required=True)
    q = cmp_sub.add_parser("queue", help="import both models' held-out answers as a ranking dataset and assign it")
    _add_model_args(q, "dpo")
    q.add_argument("--against", metavar="MODEL_DIR", help="the model to compare with (default: MODEL's parent)")
    q.add_argument("--reviewers", required=True, help="comma-separated usernames (role reviewer or admin)")
    q.add_argument("--prompts", type=int, default=50, help="held-out prompts to compare (0 = all answered by both)")
    q.add_argument("--overlap", type=int, default=1, help="reviewers per prompt (2 or more measures agreement)")
    q.add_argument("--dataset", help="dataset name (default: 'blind STAGE@VERSION vs STAGE@VERSION')")
    q.add_argument("--owner", help="admin user owning the dataset (default: the first admin)")
    q.add_argument("--db", help="feedback database URL (default: the run's feedback.db, the one serve uses)")
    q.set_defaults(func=cmd_align_compare_queue)
    r = cmp_sub.add_parser("result", help="the aligned model's blind win rate, with the number of judgements")
    r.add_argument("dataset", help="the dataset `compare queue` printed")
    r.add_argument("--name", help="run name (default: 'default')")
    r.add_argument("--runs-dir", help="directory holding runs (default: runs)")
    r.add_argument("--db", help="feedback database URL (default: the run's feedback.db)")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.set_defaults(func=cmd_align_compare_result)

    ch = sub.add_parser("chat", help="chat with a model in the terminal (streaming, multi-turn)")
    _add_model_args(ch, "sft")
    ch.add_argument("--system", help="system message")
    ch.add_argument("--max-new-tokens", type=int, default=200)
    ch.add_argument("--temperature", type=float, default=0.7)
    ch.add_argument("--top-k", type=int, default=50, help="0 = off")
    ch.add_argument("--top-p", type=float, default=None)
    ch.add_argument("--repetition-penalty", type=float, default=1.0)
    ch.add_argument("--frequency-penalty", type=float, default=None, help=FREQUENCY_PENALTY_HELP)
    ch.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]: a generated token's "
                                                                          "logit drops by this once it has appeared")
    ch.add_argument("--seed", type=int, default=None)
    ch.add_argument("--device", default="auto")
    ch.set_defaults(func=cmd_chat)

    smp = sub.add_parser("sample", help="continue prompts with a trained model")
    _add_model_args(smp, "pretrain")
    smp.add_argument("--prompt", action="append", help="prompt text (repeatable: a batch)")
    smp.add_argument("--max-new-tokens", type=int, default=100)
    smp.add_argument("--temperature", type=float, default=0.8)
    smp.add_argument("--top-k", type=int, default=50, help="0 = off")
    smp.add_argument("--top-p", type=float, default=None)
    smp.add_argument("--repetition-penalty", type=float, default=1.0)
    smp.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2] (0 = off)")
    smp.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2] (0 = off)")
    smp.add_argument("--seed", type=int, default=None)
    smp.add_argument("--stream", action="store_true", help="print tokens as they are produced (one prompt)")
    smp.add_argument("--device", default="auto")
    smp.set_defaults(func=cmd_sample)

    ev = sub.add_parser("eval", help="evaluate a model")
    ev_sub = ev.add_subparsers(dest="action", required=True)
    ppl = ev_sub.add_parser("perplexity", help="held-out loss, perplexity and bits per byte")
    _add_model_args(ppl, "pretrain")
    src = ppl.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text source: file, directory or glob (.txt .md .jsonl .json .csv .parquet .html)")
    src.add_argument("--shards", nargs="+", help="token shard files (.bin) written with this model's tokenizer, "
                     "or a run's data/shards.json (its validation shards)")
    ppl.add_argument("--text-field", default="text", help="field holding the text in jsonl/json/csv/parquet")
    ppl.add_argument("--block-size", type=int, default=None, help="default: the model's context length")
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--max-batches", type=int, default=None)
    ppl.add_argument("--device", default="auto")
    ppl.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")
    ppl.set_defaults(func=cmd_eval_perplexity)

    chk = ev_sub.add_parser("checks", help="SupportWorld's checks on the model's answers to held-out support "
                                           "prompts (status, order number, name, intent, leaks, turn ended)")
    _add_model_args(chk, "sft")
    chk.add_argument("--data", help="SupportWorld conversations (default: the run's supportworld/conversations/"
                                    "test.jsonl)")
    chk.add_argument("--limit", type=int, default=0, help="check the first N conversations (0 = all)")
    chk.add_argument("--max-new-tokens", type=int, default=192,
                     help="generation limit (an answer cut there fails 'ended'; SupportWorld's answers are at most "
                          "150 tokens with the default tokenizer)")
    chk.add_argument("--frequency-penalty", type=float, default=None, help=FREQUENCY_PENALTY_HELP)
    chk.add_argument("--answers", metavar="FILE", help="also write each answer with its checks to FILE (JSONL)")
    chk.add_argument("--candidates", action="store_true",
                     help="no model: score the data's own ranked candidate answers per quality (what the checks "
                          "catch)")
    chk.add_argument("--device", default="auto")
    chk.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs and AMX CPUs, else fp32), bf16, fp32")
    chk.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    chk.add_argument("--json", action="store_true", help="print the report as JSON")
    chk.set_defaults(func=cmd_eval_checks)

    prb = ev_sub.add_parser("probe", help="in-context copying: loss on a repeated random sequence vs its first "
                                          "copy, and looking an order number up in a record")
    _add_model_args(prb, "pretrain")
    prb.add_argument("--n", type=int, default=32, help="sequences / records")
    prb.add_argument("--length", type=int, default=64, help="random tokens per copy (shrinks to fit the context)")
    prb.add_argument("--seed", type=int, default=0)
    prb.add_argument("--device", default="auto")
    prb.add_argument("--json", action="store_true")
    prb.set_defaults(func=cmd_eval_probe)

    from chatforge.safety.bias_sets import AXES as BIAS_AXES  # no torch: the parser stays quick to build

    bia = ev_sub.add_parser("bias", help="bias probes: log-likelihood gaps, classifier flips and chat answers on "
                                         "counterfactual pairs, stereotype pairs, CrowS-Pairs and BBQ files "
                                         "(runs/RUN/eval/bias/VERSION.json)")
    _add_model_args(bia, "sft")
    bia.add_argument("--classifier", metavar="MODEL", help="a classification model (directory or stage, e.g. "
                                                           "sentiment): label flips on the same pairs")
    bia.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="the chat-answer probe (default: when MODEL is a chat model)")
    bia.add_argument("--axes", nargs="+", choices=BIAS_AXES, default=list(BIAS_AXES))
    bia.add_argument("--n", type=int, default=200, help="counterfactual text pairs per axis")
    bia.add_argument("--n-chat", type=int, default=24, help="counterfactual support conversations per axis")
    bia.add_argument("--max-new-tokens", type=int, default=48, help="length limit of the chat answers")
    bia.add_argument("--seed", type=int, default=0)
    bia.add_argument("--no-stereotypes", action="store_true", help="skip chatforge's illustrative stereotype pairs")
    bia.add_argument("--crows-pairs", action="append", metavar="FILE.csv",
                     help="a CrowS-Pairs CSV as published (repeatable; pooled)")
    bia.add_argument("--bbq", action="append", metavar="FILE.jsonl", help="a BBQ data file as published "
                                                                         "(repeatable, e.g. one per category)")
    bia.add_argument("--out", help="result file (default: runs/RUN/eval/bias/VERSION.json)")
    bia.add_argument("--device", default="auto")
    bia.add_argument("--dtype", default="auto")
    bia.add_argument("--json", action="store_true", help="print the result as JSON")
    bia.set_defaults(func=cmd_eval_bias)

    su = ev_sub.add_parser("suite", help="contamination, held-out metrics, checks, task files and a fixed prompt "
                                         "set, stored per model version (runs/RUN/eval/suite/VERSION.json)")
    _add_model_args(su, "sft")
    su.add_argument("--against", metavar="MODEL", help="a second model (directory or stage): run it too, print deltas")
    su.add_argument("--tasks", nargs="*", help="task files (.jsonl, see eval.tasks) or packaged names "
                                               "(default: supportworld_mc; none: --tasks with no value)")
    su.add_argument("--limit", type=int, default=32, help="held-out prompts checked (0 = skip the checks)")
    su.add_argument("--prompts", type=int, default=8, help="size of the fixed prompt set")
    su.add_argument("--max-new-tokens", type=int, default=128)
    su.add_argument("--keep-contaminated", action="store_true", help="do not exclude held-out prompts found in "
                                                                     "the training data")
    su.add_argument("--out", help="result file (default: runs/RUN/eval/suite/VERSION.json)")
    su.add_argument("--device", default="auto")
    su.add_argument("--dtype", default="auto")
    su.add_argument("--json", action="store_true", help="print the result as JSON")
    su.set_defaults(func=cmd_eval_suite)

    pc = ev_sub.add_parser("prompt-classify", help="classify by asking the chat model (the prompt-only "
                                                     "alternative to a fine-tuned head)")
    _add_model_args(pc, "sft")
    pc.add_argument("--data", required=True, help="{text,label} data (.jsonl/.parquet/hf:NAME)")
    pc.add_argument("--labels", help="comma-separated labels (default: those in the data)")
    pc.add_argument("--instruction", help="prompt with {labels} and {text} placeholders")
    pc.add_argument("--text-field", default="text")
    pc.add_argument("--label-field", default="label")
    pc.add_argument("--limit", type=int, default=0, help="use the first N examples (0 = all)")
    pc.add_argument("--device", default="auto")
    pc.add_argument("--json", action="store_true")
    pc.set_defaults(func=cmd_eval_prompt_classify)

    exp = sub.add_parser("export", help="write a model as a Hugging Face folder (transformers, vLLM, llama.cpp's "
                                        "converter)")
    exp.add_argument("--hf", action="store_true", required=True, help="Hugging Face format (the only one)")
    exp.add_argument("model", metavar="MODEL", help="model directory, a stage of the run (e.g. sft), NAME@ALIAS or "
                                                    "a registered version")
    exp.add_argument("dir", metavar="DIR", help="folder to write (new or empty)")
    exp.add_argument("--force", action="store_true", help="replace DIR if it is not empty")
    exp.add_argument("--name", help="run name (default: 'default')")
    exp.add_argument("--runs-dir", help="directory holding runs (default: runs)")
    exp.set_defaults(func=cmd_export, default_stage="sft")
    imp = sub.add_parser("import", help="turn a local Hugging Face GPT-2 / Llama / Qwen2 folder into a chatforge model")
    imp.add_argument("--hf", action="store_true", required=True, help="Hugging Face format (the only one)")
    imp.add_argument("dir", metavar="DIR", help="the Hugging Face model folder (config.json, weights, tokenizer)")
    imp.add_argument("--out", help="model directory to write (default: RUNS_DIR/RUN/import/model)")
    imp.add_argument("--name", help="run to write into: RUNS_DIR/NAME/import/model (default: 'default')")
    imp.add_argument("--runs-dir", help="directory holding runs (default: runs)")
    imp.add_argument("--block-size", type=int, help="shorten the context to N tokens (default: the model's)")
    imp.add_argument("--force", action="store_true", help="replace the output directory if it is not empty")
    imp.set_defaults(func=cmd_import)

    add_serve_parser(sub)
    add_feedback_parser(sub)
    add_models_parser(sub)
    add_report_parser(sub)
    add_safety_parser(sub, _add_model_args)

    rnd = sub.add_parser("round", help="the next challenger from the feedback since the champion; promoted only if "
                                       "not worse on the guarded metrics (round.* settings)")
    _add_config_args(rnd)
    rnd.set_defaults(func=cmd_round)

    conf = sub.add_parser("config", help="inspect configs")
    conf_sub = conf.add_subparsers(dest="action", required=True)
    show = conf_sub.add_parser("show", help="print the resolved config as TOML")
    _add_config_args(show, positional=True)
    show.set_defaults(func=cmd_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ChatforgeError as e:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(e))}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    return 0
