"""Simulated reviewers: people played from SupportWorld's ground truth, through the web app's own API.

For trying a feedback round (``chatforge round``) without people. Everything they write is
labelled as simulated: the prompt set is ``simulated-<name>``, the users are
``simulated-reviewer-<k>``, and every rating's comment says so, so exports, statistics
and reports show where the judgements came from.

What a simulated reviewer does, through the same HTTP calls as the web pages:

- **rank** a prompt's answers by the share of SupportWorld checks each passes (status, order
  number, name, intent handled, no other customer's data, turn ended), plus the reviewer's
  own Gaussian noise (``noise``), so reviewers mostly agree where the checks differ and
  disagree where they tie;
- **rate** an answer's four aspects 1-5 from the same share (1 + 4 x share, each aspect with
  the reviewer's noise).

The admin's part (importing the prompts, generating answers from the served model, assigning
the work) also goes through the API.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

from chatforge.errors import ChatforgeError
from chatforge.eval.checks import SupportChecks, support_prompt

SIMULATED_COMMENT = "simulated reviewer (chatforge.eval.simulate): scored from SupportWorld's ground truth"


def _ok(r: Any, what: str) -> dict[str, Any]:
    if r.status_code != 200:
        raise ChatforgeError(f"simulate: {what}: HTTP {r.status_code}: {r.text[:300]}")
    return r.json()


def quality(checks: SupportChecks, row: dict[str, Any], answer: str) -> float:
    """The share of the applicable checks the answer passes (the store keeps no finish reason, so
    "turn ended" is not among them)."""
    result = {k: v for k, v in checks.check(row, answer, None).items() if v is not None}
    return sum(result.values()) / len(result) if result else 0.0


def _login(client: Any, username: str, password: str) -> None:
    client.cookies.clear()
    _ok(client.post("/api/login", json={"username": username, "password": password}), f"login {username}")


def simulate_feedback(client: Any, rows: Sequence[dict[str, Any]], admin_password: str, name: str = "round",
                      reviewers: int = 3, overlap: int = 2, samples: int = 4, rate: bool = True,
                      noise: float = 0.05, temperature: float = 1.0, max_tokens: int = 192, seed: int = 0,
                      checks: SupportChecks | None = None, models: Sequence[str] = (),
                      admin_user: str = "admin") -> dict[str, Any]:
    """Play an admin and ``reviewers`` reviewers on a running app (``client``: an httpx.Client or
    FastAPI TestClient on the server). ``rows``: SupportWorld support conversations (not the held-out
    test split); their main questions become the prompts. ``models``: served model ids to answer
    (``samples`` answers each, ranked together, so the rankings compare versions); none = the server's
    default model. Returns counts."""
    checks = checks or SupportChecks()
    prompts = [support_prompt(r)[0] for r in rows]
    by_messages = {json.dumps(p, sort_keys=True): r for p, r in zip(prompts, rows)}
    client.cookies.clear()
    if client.post("/api/login", json={"username": admin_user, "password": admin_password}).status_code != 200:
        raise ChatforgeError(f"simulate: cannot log in as {admin_user!r}: the feedback database has an admin whose "
                             "password this simulation was not given (give --admin-user/--admin-password, or add "
                             "one: chatforge feedback users add NAME --role admin --run RUN)")
    users = [f"simulated-reviewer-{k + 1}" for k in range(reviewers)]
    password = f"sim-{random.Random(seed).getrandbits(64):x}"
    existing = {u["username"] for u in _ok(client.get("/api/admin/users"), "list users")["users"]}
    # An earlier simulation's reviewer (the password derives from the seed) is the same person again, so
    # agreement and outlier figures follow one simulated reviewer across rounds. Checked before anything
    # is written: a name this simulation cannot log in as stops it.
    for u in (u for u in users if u in existing):
        client.cookies.clear()
        if client.post("/api/login", json={"username": u, "password": password}).status_code != 200:
            raise ChatforgeError(f"simulate: user {u} exists but its password is not this simulation's "
                                 f"(another --seed, or a real account); use the seed it was made with")
    _login(client, admin_user, admin_password)
    for u in (u for u in users if u not in existing):
        _ok(client.post("/api/admin/users", json={"username": u, "password": password, "role": "reviewer"}),
            f"create {u}")
    dataset = f"simulated-{name}"
    made = _ok(client.post("/api/admin/datasets", json={
        "name": dataset, "kind": "prompts", "jsonl": "\n".join(json.dumps({"messages": p}) for p in prompts)}),
        "import the prompts")
    dataset_id = made["id"]
    body: dict[str, Any] = {"dataset_id": dataset_id, "per_model": samples, "temperature": temperature,
                            "max_tokens": max_tokens}
    if models:
        body["models"] = list(models)
    gen = _ok(client.post("/api/admin/responses", json=body), "generate answers")
    assigned = {"rank": _ok(client.post("/api/admin/assign", json={
        "dataset_id": dataset_id, "kind": "rank", "usernames": users, "overlap": min(overlap, reviewers)}),
        "assign rankings")["assigned"]}
    if rate:
        assigned["rate"] = _ok(client.post("/api/admin/assign", json={
            "dataset_id": dataset_id, "kind": "rate", "usernames": users, "overlap": 1}), "assign ratings")["assigned"]

    done = {"rank": 0, "rate": 0}
    for k, u in enumerate(users):
        rng = random.Random(seed * 1000 + k)
        _login(client, u, password)
        for kind in ("rank", "rate") if rate else ("rank",):
            while True:
                unit = _ok(client.get(f"/api/review/next?kind={kind}"), f"{u}: next {kind}")
                if unit.get("done"):
                    break
                row = by_messages.get(json.dumps(unit["prompt"]["messages"], sort_keys=True))
                if row is None:
                    raise ChatforgeError(f"simulate: prompt {unit['prompt']['id']} is not one of the given rows")
                if kind == "rank":
                    scored = [(quality(checks, row, r["text"]) + rng.gauss(0, noise), r["id"])
                              for r in unit["responses"]]
                    order = [i for _, i in sorted(scored, key=lambda t: -t[0])]
                    _ok(client.post("/api/review/rank", json={"assignment_id": unit["assignment_id"],
                                                              "order": order}), f"{u}: rank")
                else:
                    q = quality(checks, row, unit["response"]["text"])
                    scores = {a: max(1, min(5, round(1 + 4 * q + rng.gauss(0, 4 * noise))))
                              for a in ("fluency", "coherence", "relevance", "appropriateness")}
                    _ok(client.post("/api/review/rate", json={"assignment_id": unit["assignment_id"], **scores,
                                                              "comment": SIMULATED_COMMENT}), f"{u}: rate")
                done[kind] += 1
    return {"dataset": dataset, "dataset_id": dataset_id, "prompts": len(prompts), "generated": gen["generated"],
            "skipped": len(gen["skipped"]), "reviewers": users, "assigned": assigned, "done": done}
