"""An outside client: EleutherAI lm-evaluation-harness against ``chatforge serve``, vs ``chatforge eval suite``.

Starts ``chatforge serve MODEL`` as a real process (fp32 on the CPU, no database,
no rate limit), runs lm-eval's ``local-completions`` model against it
(``lm_eval.simple_evaluate``; tokenizer backend detected as "remote": the server's
``/tokenizer_info`` and ``/tokenize``) on a multiple-choice task defined from a local
JSONL file (a task YAML with ``dataset_path: json`` written to a temp dir and passed
to ``TaskManager(include_path=...)``), scores the same file with chatforge's own
task scorer (``chatforge.eval.tasks.evaluate_task``, what ``eval suite`` runs), and
compares accuracy, acc_norm and every per-choice log-likelihood and greedy flag.

The model is ``--model DIR``, or a tiny one trained here on SupportWorld's product pages with a
1024-token BPE (seconds).
Needs the bench extra (``pip install -e '.[bench]'``: lm-eval[api]).

    .venv/bin/python bench/lm_eval_vs_suite.py [--model DIR] [--task FILE] [--limit N]

Prints ``lm_eval acc``, ``chatforge acc``, ``max |loglik diff|`` and ends with
``ratio lm_eval_vs_suite_acc: VALUE`` (lm-eval's accuracy / chatforge's; 1.0 = the same).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

TOLERANCE = 1e-3  # per-choice log-likelihood agreement (nats): fp32, one forward vs a padded batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``chatforge serve MODEL`` in a child process, stopped on exit."""

    def __init__(self, model_dir: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [sys.executable, "-m", "chatforge", "serve", str(model_dir), "--port", str(self.port), "--no-db",
               "--device", "cpu", "--dtype", "fp32", "--rate-limit", "0", "--rate-limit-tokens", "0"]
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chatforge serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                r = httpx.get(self.url + "/v1/models", timeout=2)
                if r.status_code == 200:
                    return str(r.json()["data"][0]["id"])
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"chatforge serve did not answer within {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def task_yaml(name: str, data_file: Path) -> str:
    """lm-eval's task config for a chatforge multiple-choice file (fields context|query, choices, gold)."""
    with open(data_file, encoding="utf-8") as f:
        first = json.loads(next(line for line in f if line.strip()))
    text_field = "context" if "context" in first else "query"
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file.resolve()))}",
        "test_split: test",
        "output_type: multiple_choice",
        f"doc_to_text: {text_field}",
        "doc_to_choice: choices",
        "doc_to_target: gold",
        "target_delimiter: \" \"",
        "metric_list:",
        "  - metric: acc",
        "  - metric: acc_norm",
        "",
    ])


def run_lm_eval(base_url: str, model_id: str, data_file: Path, context: int, limit: int | None,
                batch_size: int = 16) -> dict[str, Any]:
    """lm-eval's local-completions on the file: ``{"acc", "acc_norm", "examples": [{"loglik", "greedy"}]}``."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    name = "chatforge_local_mc"
    with tempfile.TemporaryDirectory(prefix="lm-eval-task-") as tmp:
        Path(tmp, f"{name}.yaml").write_text(task_yaml(name, data_file), encoding="utf-8")
        out = simple_evaluate(
            model="local-completions",
            model_args={"base_url": base_url + "/v1/completions", "model": model_id, "tokenizer_backend": "remote",
                        "max_length": context, "batch_size": batch_size, "num_concurrent": 1, "max_retries": 1},
            tasks=[name], task_manager=TaskManager(include_path=tmp), limit=limit, log_samples=True,
            num_fewshot=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
        )
    res = out["results"][name]
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    examples = [{"loglik": [float(r[0]) for r in s["filtered_resps"]], "greedy": [bool(r[1]) for r in s["filtered_resps"]]}
                for s in samples]
    return {"acc": float(res["acc,none"]), "acc_norm": float(res["acc_norm,none"]), "examples": examples}


def run_chatforge(model_dir: Path, data_file: Path, limit: int | None) -> dict[str, Any]:
    """chatforge's own scorer (what ``eval suite`` runs for a task file)."""
    from chatforge.eval.tasks import evaluate_task
    from chatforge.train.checkpoint import load_model

    model, tok, _ = load_model(model_dir, "cpu")
    return evaluate_task(model, tok, data_file, "cpu", limit=limit or 0)


def agreement(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Accuracy of both, the largest per-choice log-likelihood difference, greedy-flag mismatches."""
    if len(ours["examples"]) != len(theirs["examples"]):
        raise RuntimeError(f"chatforge scored {len(ours['examples'])} examples, lm-eval {len(theirs['examples'])}")
    diffs, greedy_mismatch = [], 0
    for a, b in zip(ours["examples"], theirs["examples"]):
        if len(a["loglik"]) != len(b["loglik"]):
            raise RuntimeError(f"example {a['id']}: {len(a['loglik'])} choices vs lm-eval's {len(b['loglik'])}")
        diffs += [abs(x - y) for x, y in zip(a["loglik"], b["loglik"])]
        greedy_mismatch += sum(x != y for x, y in zip(a["greedy"], b["greedy"]))
    return {"chatforge_acc": ours["metrics"]["acc"], "lm_eval_acc": theirs["acc"],
            "chatforge_acc_norm": ours["metrics"]["acc_norm"], "lm_eval_acc_norm": theirs["acc_norm"],
            "max_abs_loglik_diff": max(diffs), "choices": len(diffs), "greedy_mismatches": greedy_mismatch}


def compare(model_dir: Path, data_file: Path, limit: int | None = None, log_dir: Path | None = None
            ) -> dict[str, Any]:
    """Serve the model, run both scorers on the file, and measure how well they agree."""
    from chatforge.train.checkpoint import read_model_config

    context = int(read_model_config(model_dir)["model"]["block_size"])
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="lm-eval-vs-suite-"))
    with Server(model_dir, log_dir / "serve.log") as server:
        model_id = server.wait()
        t0 = time.perf_counter()
        theirs = run_lm_eval(server.url, model_id, data_file, context, limit)
        lm_eval_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = run_chatforge(model_dir, data_file, limit)
    result = agreement(ours, theirs)
    result.update(lm_eval_s=round(lm_eval_s, 2), chatforge_s=round(time.perf_counter() - t0, 2))
    return result


def product_pages() -> list[dict[str, str]]:
    """SupportWorld's product pages (the facts ``supportworld_mc`` asks about) as documents."""
    from chatforge.config import SupportWorldConfig
    from chatforge.data.supportworld import world as w
    from chatforge.data.supportworld.products import product_page

    cfg = SupportWorldConfig()
    rng = random.Random(0)
    return [{"id": p.id, "text": product_page(p, rng), "source": "supportworld"}
            for p in w.make_products(cfg.n_products, cfg.seed)]


def bpe_tokenizer(vocab_size: int = 1024) -> Any:
    """A byte-level BPE trained on the product pages: tokens span word boundaries, so how a context and
    its continuation are split into tokens matters (with the byte tokenizer it never does)."""
    from chatforge.config import TokenizerConfig
    from chatforge.tokenizer import train_tokenizer

    return train_tokenizer((d["text"] for d in product_pages()), TokenizerConfig(kind="bpe", vocab_size=vocab_size))


def tiny_model(root: Path, steps: int = 60) -> Path:
    """A tiny BPE GPT pre-trained a few steps on SupportWorld product pages (seconds on a CPU)."""
    from chatforge.config import ShardConfig, load_config
    from chatforge.data.shard import shard_corpus
    from chatforge.io import write_jsonl
    from chatforge.train.pretrain import pretrain

    run = root / "runs" / "lm-eval"
    write_jsonl(run / "data" / "clean.jsonl", product_pages())
    tok = bpe_tokenizer()
    tok.save(run / "tokenizer")
    shard_corpus(run / "data" / "clean.jsonl", tok, run / "data", ShardConfig(val_fraction=0.1))
    overrides = ["model.depth=2", "model.n_embd=64", "model.n_head=2", "model.block_size=128",
                 "pretrain.batch_size=8", f"pretrain.max_steps={steps}", "pretrain.eval_every=0",
                 "pretrain.dtype=fp32", "pretrain.checkpoint_every=0", f"runs_dir={json.dumps(str(root / 'runs'))}",
                 "name=lm-eval"]
    pretrain(load_config(overrides=overrides), progress=False)
    return run / "pretrain" / "model"


def main() -> None:
    from chatforge.eval.tasks import packaged_task

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="a chatforge model directory (default: train a tiny one here)")
    ap.add_argument("--task", type=Path, help="a multiple-choice task file (default: the packaged supportworld_mc)")
    ap.add_argument("--limit", type=int, default=None, help="first N examples only")
    ap.add_argument("--steps", type=int, default=60, help="training steps of the tiny model")
    args = ap.parse_args()
    data_file = args.task or packaged_task("supportworld_mc")
    with tempfile.TemporaryDirectory(prefix="lm-eval-vs-suite-") as tmp:
        model_dir = args.model or tiny_model(Path(tmp), args.steps)
        r = compare(model_dir, data_file, args.limit, Path(tmp))
    import lm_eval

    print(f"lm_eval {getattr(lm_eval, '__version__', '?')} local-completions vs chatforge eval suite on {data_file} "
          f"({r['choices']} choices)")
    print(f"lm_eval acc {r['lm_eval_acc']:.4f} acc_norm {r['lm_eval_acc_norm']:.4f} ({r['lm_eval_s']} s)")
    print(f"chatforge acc {r['chatforge_acc']:.4f} acc_norm {r['chatforge_acc_norm']:.4f} ({r['chatforge_s']} s)")
    print(f"max |loglik diff| {r['max_abs_loglik_diff']:.2e} (tolerance {TOLERANCE:g}); "
          f"greedy flags differing: {r['greedy_mismatches']}")
    ratio = r["lm_eval_acc"] / r["chatforge_acc"] if r["chatforge_acc"] else float("nan")
    print(f"ratio lm_eval_vs_suite_acc: {ratio:.4f}")


if __name__ == "__main__":
    main()
