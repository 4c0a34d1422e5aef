"""Guarded serving: the safety policy applied to what users send and to what the model answers.

``Guard`` wraps a ``chatforge.safety.Moderator`` for the server. It lives on
``ServeState.guard`` (None: serving is unguarded); ``chatforge serve --guard POLICY`` (a
TOML file, or ``default`` for the shipped policy) turns it on, ``--no-guard`` keeps it off.
Both serving paths use it the same way: ``/v1/chat/completions`` and ``/v1/completions``
(``openai_api``) and the web chat (``web``).

Prompts (``Guard.guard_prompt``): the latest user message is checked, with the whole
conversation (that message included) as context, so the answer-only "foreign identifier"
rule never fires on a customer's own order number. The policy's action for the place
``prompt`` decides:

- ``allow``: generate as usual; ``flag``: the same, and the exchange is recorded;
- ``redact``: the model sees the message with the matched spans replaced by ``[REDACTED]``
  (the web app also stores it that way);
- ``refuse``: nothing is generated; the answer is the policy's ``refusal`` in the assistant's
  voice, a normal 200 answer with ``finish_reason`` ``"content_filter"`` (as OpenAI does).

Answers (``AnswerFilter``) are checked while they stream, with the conversation as context
(so an order number or e-mail the conversation never mentioned is another customer's).
The filter receives the engine's text deltas and holds back a window: it releases only text
that is at least ``policy.stream_window`` characters behind the generated end, and only
after a check of the answer so far has passed it. A rule that sees an unsafe span within
that many characters of its start therefore catches it before any of it is released.
Re-checks run as deltas arrive, at most one per ``CHECK_EVERY`` new characters (fewer
when the window is smaller), each on the answer's last ``LOOKBACK`` released characters
plus everything held back (cut where a whitespace character ends, so word boundaries read
as in the whole text); the final check, when generation ends, reads the whole answer. With
a moderation classifier in the policy it runs at most once per window of new text, and
only text it has passed is released. What each action does in a stream:

- ``flag``: released as is, recorded;
- ``redact``: released with the span replaced by ``[REDACTED]`` (a span once found stays
  redacted, even if later text changes what the rule sees); the release point never falls
  inside a span;
- ``refuse``: the cut. Nothing more of the answer is released: the held-back window (which
  holds the start of the unsafe span) is dropped, generation is cancelled, and the client
  gets ``"\\n\\n" + refusal`` after the safe prefix it already has (just the refusal when
  nothing was released yet), with ``finish_reason`` ``"content_filter"``. The unsafe span
  never reaches the client.

At the end of generation the held-back text is flushed after the final check (or replaced
by the refusal when that check refuses). A non-streamed answer goes through the same filter,
so it is what the streamed one would have been.

Flags: every exchange with any finding (any action, prompt or answer) becomes a row of the
feedback store's ``safety_flags`` (``record_flags``; through a worker thread, never on the
event loop) with the findings, the prompt as sent, the answer as generated (the unsafe
original, for reviewers only) and as delivered; without a store it is only logged. Reviewers
confirm or clear them on the web app's Flags page, and ``chatforge feedback export --kind
moderation`` turns the decisions into the moderation classifier's training data.

Token logprobs would show the text the guard holds back, so a guarded server refuses
``logprobs`` (400); serve with ``--no-guard`` to score with it (lm-evaluation-harness).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from chatforge.errors import ConfigError
from chatforge.safety.moderation import REDACTED, Finding, Moderator, Verdict, redact
from chatforge.safety.policy import Policy, load_policy
from chatforge.serve.engine import TokenEvent

__all__ = ["CHECK_EVERY", "LOOKBACK", "AnswerFilter", "Guard", "PromptDecision", "RefusalHandle",
           "conversation_text", "flag_rows", "record_flags", "record_flags_later"]

log = logging.getLogger(__name__)
CHECK_EVERY = 16  # characters: a streamed answer is re-checked at most once per this many new characters
LOOKBACK = 256  # characters of already released text each streaming re-check reads again
CONTENT_FILTER = "content_filter"  # OpenAI's finish_reason for an answer its filter stopped


def conversation_text(messages: list[dict[str, Any]]) -> str:
    """The conversation as one text (``role: content`` lines): the context checks compare identifiers with."""
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)


@dataclass
class PromptDecision:
    """The verdict on a prompt and the messages the model is to see (redacted when the action says so)."""

    verdict: Verdict
    messages: list[dict[str, Any]]
    text: str = ""  # the text that was checked (the latest user message)

    @property
    def refused(self) -> bool:
        return self.verdict.action == "refuse"


class Guard:
    """The safety policy for the server: prompt checks and streaming answer filters."""

    def __init__(self, policy: Policy, moderator: Moderator | None = None) -> None:
        self.policy = policy
        self.moderator = moderator if moderator is not None else Moderator(policy)

    @classmethod
    def load(cls, policy: str | Path, base_dir: Path | None = None, device: str = "cpu") -> Guard:
        """The guard for a policy file (``"default"``: the shipped policy). A ``classifier`` directory in
        the policy is resolved against ``base_dir`` (the served run) when relative, and must exist; it
        loads when first used. Errors name the policy file and field (``ConfigError``)."""
        pol = load_policy(policy)
        classifier: Path | None = None
        if pol.classifier:
            classifier = Path(pol.classifier).expanduser()
            if not classifier.is_absolute() and base_dir is not None:
                classifier = Path(base_dir) / classifier
            if not classifier.is_dir():
                raise ConfigError(f"{pol.source}: classifier: {classifier} is not a directory (a moderation model "
                                  "trained by `chatforge safety train`; relative paths are under the served run); "
                                  'set classifier = "" for rules only')
        return cls(pol, Moderator(pol, classifier=classifier, device=device))

    @property
    def refusal(self) -> str:
        return self.policy.refusal

    @property
    def has_classifier(self) -> bool:
        return self.moderator._classifier is not None

    def describe(self) -> str:
        """``name v<version> (file)``: what the server prints and the flags record."""
        return f"{self.policy.name} v{self.policy.version} ({self.policy.source})"

    @property
    def policy_id(self) -> str:
        return f"{self.policy.name} v{self.policy.version}"

    # ------------------------------------------------------------------ prompts

    def check_prompt(self, messages: list[dict[str, Any]]) -> Verdict:
        """The verdict on the latest user message, with the conversation as context."""
        return self.guard_prompt(messages).verdict

    def guard_prompt(self, messages: list[dict[str, Any]]) -> PromptDecision:
        """``check_prompt`` and what the model sees: a copy of ``messages`` with the latest user message
        redacted when the action is ``redact``, else ``messages`` themselves."""
        at = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), None)
        if at is None:
            return PromptDecision(self.moderator.verdict("prompt", []), messages)
        text = str(messages[at].get("content", ""))
        verdict = self.moderator.check(text, "prompt", conversation_text(messages))
        if verdict.action != "redact":
            return PromptDecision(verdict, messages, text)
        shown = [dict(m) for m in messages]
        shown[at]["content"] = redact(text, verdict, self.policy)
        return PromptDecision(verdict, shown, text)

    def guard_text(self, text: str) -> tuple[Verdict, str]:
        """A plain-text prompt (``/v1/completions``): its verdict and the text the model sees."""
        verdict = self.moderator.check(text, "prompt", text)
        return verdict, redact(text, verdict, self.policy) if verdict.action == "redact" else text

    # ------------------------------------------------------------------ answers

    def answer_filter(self, messages: list[dict[str, Any]] | None = None, context: str | None = None) -> AnswerFilter:
        """A streaming filter for the answer to ``messages`` (or to a plain ``context`` text)."""
        return AnswerFilter(self, context if context is not None else conversation_text(messages or []))

    def check_answer(self, messages: list[dict[str, Any]], text: str) -> AnswerFilter:
        """A whole answer through the filter at once; ``.delivered`` is what the client gets."""
        f = self.answer_filter(messages)
        f.push(text)
        f.finish()
        return f


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


class AnswerFilter:
    """Holds back the last ``policy.stream_window`` characters of a streamed answer (module docstring).

    ``push(delta)`` returns the text to send now ("" while holding); ``finish()`` the rest after
    the final check. After a refusal ``refused`` is True and both return "" (the refusal was
    already returned once): the caller cancels generation. ``raw`` is the answer as generated,
    ``delivered`` everything returned, ``verdict`` the strictest verdict over every finding."""

    def __init__(self, guard: Guard, context: str) -> None:
        self.guard, self.context = guard, context
        self.policy = guard.policy
        self.window = self.policy.stream_window
        self.step = max(1, min(CHECK_EVERY, self.window))
        self.raw = ""
        self.delivered = ""
        self.released = 0  # raw[:released] was released (or dropped, after a refusal)
        self.checked = 0  # raw[:checked] passed the rules
        self.classified = 0  # raw[:classified] passed the classifier (follows `checked` without one)
        self.refused = False
        self.finished = False
        self._findings: dict[tuple[str, str, int, int], Finding] = {}
        self._redact: list[tuple[int, int]] = []

    @property
    def verdict(self) -> Verdict:
        return self.guard.moderator.verdict("answer", list(self._findings.values()))

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """``content_filter`` when the guard cut the answer, else the engine's reason."""
        return CONTENT_FILTER if self.refused else engine_reason

    def push(self, delta: str) -> str:
        if self.refused or self.finished or not delta:
            return ""
        self.raw += delta
        if len(self.raw) - self.checked < self.step:
            return ""
        return self._check(final=False)

    def finish(self) -> str:
        """The final check of the whole answer; returns the rest to send (or the refusal)."""
        if self.finished:
            return ""
        self.finished = True
        if self.refused:
            return ""
        return self._check(final=True)

    def _tail_start(self) -> int:
        """Where a streaming re-check starts: ``LOOKBACK`` before the released end, moved back to just
        after a whitespace character (so ``\\b`` at the cut reads as in the whole text); 0 if none."""
        cut = self.released - LOOKBACK
        if cut <= 0:
            return 0
        while cut > 0 and not self.raw[cut - 1].isspace():
            cut -= 1
        return cut

    def _check(self, final: bool) -> str:
        end = len(self.raw)
        start = 0 if final else self._tail_start()
        use_classifier = self.guard.has_classifier and (final or end - self.classified >= max(self.window, 1))
        verdict = self.guard.moderator.check(self.raw[start:end], "answer", self.context,
                                             use_classifier=use_classifier)
        for f in verdict.findings:
            if start and f.start >= 0:
                f = Finding(f.category, f.layer, f.rule, f.start + start, f.end + start, f.evidence, f.score)
            self._findings.setdefault((f.category, f.rule, f.start, f.end), f)
            if f.start >= 0 and self.policy.category(f.category).action("answer") == "redact":
                self._redact.append((f.start, f.end))
        self.checked = end
        if use_classifier or not self.guard.has_classifier:
            self.classified = end
        if verdict.action == "refuse":
            return self._refuse()
        upto = end if final else min(self.checked, self.classified) - self.window
        self._redact = _merge(self._redact)
        for s, e in self._redact:  # never release part of a span: hold back to its start
            if s < upto < e:
                upto = s
        if upto <= self.released:
            return ""
        out = self._render(self.released, upto)
        self.released = upto
        self.delivered += out
        return out

    def _render(self, a: int, b: int) -> str:
        out, pos = [], a
        for s, e in self._redact:
            s, e = max(s, pos), min(e, b)
            if e <= s:
                continue
            out += [self.raw[pos:s], REDACTED]
            pos = e
        out.append(self.raw[pos:b])
        return "".join(out)

    def _refuse(self) -> str:
        self.refused = True
        self.released = len(self.raw)  # the held-back text, with the unsafe span's start, is dropped
        tail = ("\n\n" if self.delivered else "") + self.policy.refusal
        self.delivered += tail
        return tail


# --------------------------------------------------------------------------- a refused prompt's answer


class RefusalHandle:
    """Stands in for an engine's ``GenerationHandle`` when a refused prompt is answered with the refusal
    and nothing is generated: one text event, then the end (``finish_reason`` ``content_filter``)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.finish_reason: str | None = CONTENT_FILTER
        self.error: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._sent = False

    @property
    def done(self) -> bool:
        return True

    def cancel(self) -> None:
        pass

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if not self._sent:
            self._sent = True
            yield TokenEvent(-1, self.text)

    async def result(self) -> str:
        self._sent = True
        return self.text


# --------------------------------------------------------------------------- flags


def flag_rows(guard: Guard, messages: list[dict[str, Any]], prompt: Verdict | None, answer: AnswerFilter | None,
              *, source: str, delivered: str | None = None, model_id: str | None = None,
              model_version: str | None = None, ident: str | None = None, conversation_id: int | None = None,
              message_id: int | None = None) -> list[dict[str, Any]]:
    """The ``service.record_flag`` arguments for one exchange: a row for the prompt when its verdict found
    something, one for the answer when the filter did. ``messages`` are the prompt as the client sent it;
    ``delivered`` is the answer the client got when no filter ran (a refused prompt's refusal)."""
    generated = answer.raw if answer is not None else None
    shown = answer.delivered if answer is not None else delivered
    common = dict(prompt=messages, answer_generated=generated, answer_delivered=shown, source=source,
                  policy=guard.policy_id, model_id=model_id, model_version=model_version, ident=ident,
                  conversation_id=conversation_id, message_id=message_id)
    rows = []
    for place, verdict in (("prompt", prompt), ("answer", answer.verdict if answer is not None else None)):
        if verdict is not None and verdict.flagged:
            rows.append({**common, "place": place, "category": verdict.category, "layer": verdict.layer,
                         "action": verdict.action, "findings": [f.to_dict() for f in verdict.findings]})
    return rows


async def record_flags(store: Any, rows: list[dict[str, Any]]) -> list[int]:
    """Log each flag and store it (in a worker thread); returns the new ids. Never raises: a flag that
    cannot be stored is logged and the answer goes on."""
    ids = []
    for row in rows:
        log.info("safety flag: %s %s %s (%s) model %s from %s", row["place"], row["category"], row["action"],
                 row["source"], row.get("model_id"), row.get("ident"))
        if store is None:
            continue
        from chatforge.store import service

        try:
            ids.append(await run_in_threadpool(lambda r=row: service.record_flag(store, **r)))
        except Exception as e:  # noqa: BLE001 - storing a flag must not break the answer
            cause = getattr(e, "orig", None) or e
            log.error("storing a safety flag failed (%s: %s)", type(cause).__name__,
                      next(iter(str(cause).splitlines()), ""))
    return ids


_background: set[asyncio.Task] = set()


def record_flags_later(store: Any, rows: list[dict[str, Any]]) -> None:
    """``record_flags`` in a background task (for a response that already ended: the client left)."""
    if not rows:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no event loop (a generator closed by the garbage collector): log them at least
        for row in rows:
            log.warning("safety flag not stored: %s %s %s (%s)", row["place"], row["category"], row["action"],
                        row["source"])
        return
    task = loop.create_task(record_flags(store, rows))
    _background.add(task)
    task.add_done_callback(_background.discard)
