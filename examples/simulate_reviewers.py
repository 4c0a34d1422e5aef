"""Simulated feedback for a round: start `chatforge serve` on a run, play reviewers through its API.

    python examples/simulate_reviewers.py --name default --prompts 64
    chatforge round --name default

The reviewers are played from SupportWorld's ground truth (``chatforge.eval.simulate``) on the
run's validation conversations (never the held-out test split the round evaluates on), and are
labelled as simulated in the store (dataset ``simulated-...``, users ``simulated-reviewer-N``,
every rating's comment). The server serves the run's ``@champion`` (else its newest aligned model)
and writes into the run's ``feedback.db``. With ``--model`` (repeatable: ``@champion``, ``@challenger``,
a version or a directory) it serves those instead, every one answers each prompt and the rankings
compare them, so `chatforge feedback stats` has win rates and Bradley-Terry ratings across versions:

    python examples/simulate_reviewers.py --name default --model @champion --model @challenger --samples 2
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


def admin_password(run: Path, given: str | None) -> str:
    """The admin password: the one given, else the one kept in ``RUN/.simulate-admin`` (owner-only), made
    the first time; `serve` creates the admin with it when the database has none. A later simulation on
    the same database logs in with the same password."""
    if given:
        return given
    kept = run / ".simulate-admin"
    if kept.is_file():
        return kept.read_text().strip()
    password = secrets.token_hex(12)
    fd = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="default")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--prompts", type=int, default=64, help="validation conversations to ask (default 64)")
    p.add_argument("--samples", type=int, default=4, help="answers per prompt, ranked together (default 4)")
    p.add_argument("--reviewers", type=int, default=3)
    p.add_argument("--overlap", type=int, default=2, help="reviewers per ranking (agreement needs 2)")
    p.add_argument("--noise", type=float, default=0.05, help="each reviewer's noise on the checks' share")
    p.add_argument("--round-name", help="the prompt set is simulated-ROUND_NAME (default: round-K-TIME, K the "
                                        "round this feedback is for)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--admin-user", default="admin", help="an admin of the run's feedback database (default: admin)")
    p.add_argument("--admin-password", default=os.environ.get("CHATFORGE_ADMIN_PASSWORD"),
                   help="its password (default: $CHATFORGE_ADMIN_PASSWORD, else the one this script made and kept "
                        "in RUN/.simulate-admin when it first created the admin)")
    p.add_argument("--model", action="append", default=[], metavar="MODEL",
                   help="a model to serve and answer with (repeatable; default: what `chatforge serve` serves)")
    args = p.parse_args()

    run = Path(args.runs_dir) / args.name
    if args.round_name is None:  # prompt-set names are unique: one per simulation
        done = [int(d.name) for d in (run / "rounds").glob("*") if d.name.isdigit()]
        args.round_name = f"round-{max(done, default=1) + 1}-{time.strftime('%Y%m%d%H%M%S', time.gmtime())}"
    source = run / "supportworld" / "conversations" / "val.jsonl"
    rows = [r for _, r in read_jsonl(source) if is_support_row(r)][:args.prompts]
    if not rows:
        sys.exit(f"{source}: no support conversations; run `chatforge pipeline run --name {args.name}` first")
    port, password = free_port(), admin_password(run, args.admin_password)
    env = {**os.environ, "CHATFORGE_ADMIN_PASSWORD": password}  # used by serve only if the database has no admin
    server = subprocess.Popen([sys.executable, "-m", "chatforge", "serve", *args.model, "--name", args.name,
                               "--runs-dir", args.runs_dir, "--port", str(port), "--rate-limit", "0",
                               "--rate-limit-tokens", "0"], env=env)
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
        served = [m["id"] for m in client.get("/v1/models").json()["data"]] if args.model else []
        out = simulate_feedback(client, rows, password, name=args.round_name, reviewers=args.reviewers,
                                overlap=args.overlap, samples=args.samples, noise=args.noise, seed=args.seed,
                                checks=SupportChecks.for_data(source), models=served, admin_user=args.admin_user)
        out["wall_time_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(out, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
