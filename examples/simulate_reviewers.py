"""Simulated feedback for a round: start `chatforge serve` on a run, play reviewers through its API.

    python examples/simulate_reviewers.py --name default --prompts 64
    chatforge round --name default

The reviewers are played from SupportWorld's ground truth (``chatforge.eval.simulate``) on the
run's validation conversations (never the held-out test split the round evaluates on), and are
labelled as simulated in the store (dataset ``simulated-...``, users ``simulated-reviewer-N``,
every rating's comment). The server serves the run's ``@champion`` (else its newest aligned model)
and writes into the run's ``feedback.db``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from chatforge.eval.checks import SupportChecks, is_support_row
from chatforge.eval.simulate import simulate_feedback
from chatforge.io import read_jsonl


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="default")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--prompts", type=int, default=64, help="validation conversations to ask (default 64)")
    p.add_argument("--samples", type=int, default=4, help="answers per prompt, ranked together (default 4)")
    p.add_argument("--reviewers", type=int, default=3)
    p.add_argument("--overlap", type=int, default=2, help="reviewers per ranking (agreement needs 2)")
    p.add_argument("--noise", type=float, default=0.05, help="each reviewer's noise on the checks' share")
    p.add_argument("--round-name", default="round", help="the prompt set is simulated-ROUND_NAME")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    run = Path(args.runs_dir) / args.name
    source = run / "supportworld" / "conversations" / "val.jsonl"
    rows = [r for _, r in read_jsonl(source) if is_support_row(r)][:args.prompts]
    if not rows:
        sys.exit(f"{source}: no support conversations; run `chatforge pipeline run --name {args.name}` first")
    port, password = free_port(), secrets.token_hex(12)
    env = {**os.environ, "CHATFORGE_ADMIN_PASSWORD": password}
    server = subprocess.Popen([sys.executable, "-m", "chatforge", "serve", "--name", args.name, "--runs-dir",
                               args.runs_dir, "--port", str(port), "--rate-limit", "0", "--rate-limit-tokens", "0"],
                              env=env)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        for _ in range(240):
            try:
                if client.get("/v1/models").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                sys.exit("the server stopped; see its output above")
            time.sleep(0.5)
        t0 = time.perf_counter()
        out = simulate_feedback(client, rows, password, name=args.round_name, reviewers=args.reviewers,
                                overlap=args.overlap, samples=args.samples, noise=args.noise, seed=args.seed,
                                checks=SupportChecks.for_data(source))
        out["wall_time_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(out, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
