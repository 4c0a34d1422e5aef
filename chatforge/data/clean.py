"""Clean: normalise, strip markup, filter, scrub PII, de-duplicate; report what was dropped.

For each document of ``raw.jsonl``, in order:

1. Unicode normalisation (``unicode_form``) and control-character removal (``\\r\\n``
   and ``\\r`` become ``\\n``; other C0/C1 controls, lone surrogates, BOMs and
   zero-width spaces go; ``\\n`` and ``\\t`` stay).
2. HTML to text for ``"format": "html"`` documents (``chatforge.data.html``).
3. Quality heuristics (``chatforge.data.quality``): the first failing rule drops it.
4. PII scrubbing (``chatforge.data.pii``), when ``scrub_pii``.
5. Safety: ``safety_policy`` (``"default"`` or a policy TOML, ``chatforge.safety.policy``)
   applies each category's ``data`` action to the scrubbed text: ``drop`` drops the
   document under rule ``safety`` (reason ``"<category>: <rule> '<evidence>'"``),
   ``flag`` keeps and counts it, ``keep`` does nothing. Only the policy's rules run
   here (patterns, PII detectors, word lists), never its moderation classifier: the
   clean stage must stay fast on a whole corpus. Then ``safety_filter``, a
   ``package.module:function`` taking the text and returning ``None`` (keep) or a
   reason string (drop).
6. Exact, then near-duplicate removal (``chatforge.data.dedup``); first occurrence wins.

Steps 1-5 and the MinHash signature are per-document work and run in a
``multiprocessing`` pool (``workers``; 0 = one per core), in chunks of raw lines
submitted through a bounded window so memory stays constant. Results come back in
input order and the main process alone does the de-duplication, so the output is
byte-identical for any number of workers.

Outputs, both written atomically (a failure leaves earlier outputs untouched):
``clean.jsonl`` (``{"id", "text", "source"}`` per line) and ``clean_report.json``;
its ``safety`` section (null without a policy) names the policy and, per category
the policy drops or flags in data, the documents dropped and flagged (kept in the
output) with examples.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import json
import multiprocessing
import os
import pickle
import re
import time
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from chatforge.config import CleanConfig
from chatforge.data.dedup import NearDuplicateIndex, Signer, exact_key
from chatforge.data.html import html_to_text
from chatforge.data.pii import KINDS, scrub_pii
from chatforge.data.quality import RULES, first_failure
from chatforge.errors import ChatforgeError, ConfigError, DataError
from chatforge.io import atomic_write, dumps_line, write_json
from chatforge.safety.moderation import Finding, Moderator
from chatforge.safety.policy import Policy, load_policy

SafetyFilter = Callable[[str], "str | None"]

SNIPPET_CHARS = 200
_CHUNK_LINES = 256  # raw lines per task sent to a worker
_CHUNK_BYTES = 1 << 20  # ... or fewer, when they add up to this many bytes
_WINDOW_PER_WORKER = 4  # tasks in flight per worker: keeps workers busy, memory bounded
_EVIDENCE_CHARS = 80  # a pattern can match a long span; reasons and reports keep its start

# Every rule that can drop a document, in the order they apply, with its config fields.
RULE_FIELDS: dict[str, tuple[str, ...]] = {
    **{r.name: r.fields for r in RULES},
    "safety": ("safety_policy", "safety_filter"),
    "exact_duplicate": ("exact_dedup",),
    "near_duplicate": ("near_dedup", "minhash_threshold", "minhash_num_perm", "shingle_words"),
}

# C0 and C1 control characters except \t and \n, lone surrogates, BOM, zero-width space.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufeff\u200b]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _printable(s: str) -> str:
    """An id or source that can be written as UTF-8: lone surrogates become U+FFFD."""
    return _SURROGATE.sub("\ufffd", s)


def normalise_text(text: str, form: str) -> str:
    """Newlines to ``\\n``, Unicode normalisation (``NFC``/``NFKC``/``none``), controls removed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    if form != "none":
        text = unicodedata.normalize(form, text)
    return text


def load_safety_filter(spec: str) -> SafetyFilter:
    """Import ``"package.module:function"`` (the ``clean.safety_filter`` setting)."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ConfigError(f"clean.safety_filter: {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"clean.safety_filter: cannot import module {module_name!r} ({e})") from e
    func = getattr(module, func_name, None)
    if func is None:
        raise ConfigError(f"clean.safety_filter: module {module_name!r} has no attribute {func_name!r}")
    if not callable(func):
        raise ConfigError(f"clean.safety_filter: {spec!r} is not callable")
    return func


def load_clean_policy(spec: str) -> Policy:
    """The ``clean.safety_policy`` policy: ``"default"`` or a TOML file; errors name the setting."""
    try:
        return load_policy(spec)
    except ConfigError as e:
        raise ConfigError(f"clean.safety_policy: {e}") from e


# --------------------------------------------------------------------------- per-document work


class SafetyHit(NamedTuple):
    """A document the policy drops or flags in data: what decided it."""

    action: str  # drop | flag
    category: str
    rule: str  # pattern | blocklist | pii:card | ...
    evidence: str  # the matched text (a PII match is shown as its kind, e.g. [CARD])
    snippet: str  # text around the match

    @property
    def reason(self) -> str:
        return f"{self.category}: {self.rule} {self.evidence!r}"


class DocResult(NamedTuple):
    """What a worker sends back for one document."""

    id: str
    source: str
    in_chars: int
    out_chars: int
    html: bool
    rule: str | None  # the rule that dropped it, None if kept so far
    reason: str | None
    snippet: str | None  # for dropped documents (PII already scrubbed)
    pii: tuple[int, ...]  # counts per kind, in KINDS order
    exact_key: bytes | None
    signature: np.ndarray | None
    line: str | None  # the output JSON line, for kept documents
    safety: SafetyHit | None = None  # the policy dropped or flagged it


class DocCleaner:
    """Steps 1-5 plus the dedup keys, for one raw line. Runs inside worker processes."""

    def __init__(self, cfg: CleanConfig, label: str, safety_filter: SafetyFilter | None,
                 policy: Policy | None = None):
        self.cfg = cfg
        self.label = label
        self.safety_filter = safety_filter
        self.moderator = _data_moderator(policy) if policy is not None else None
        self.signer = Signer(cfg.minhash_num_perm, cfg.shingle_words) if cfg.near_dedup else None

    def _parse(self, lineno: int, raw: bytes) -> tuple[str, str, str, bool]:
        where = f"{self.label}:{lineno}"
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: invalid UTF-8 at byte {e.start} of the line") from e
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if "text" not in obj:
            raise DataError(f"{where}: missing field 'text'; fields present: {', '.join(obj) or '(none)'}")
        text = obj["text"]
        if not isinstance(text, str):
            raise DataError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
        doc_id = _printable(str(obj.get("id", where)))
        source = _printable(str(obj.get("source", self.label)))
        return doc_id, source, text, obj.get("format") == "html"

    def _snippet(self, text: str) -> str:
        head = text[: 2 * SNIPPET_CHARS]
        if self.cfg.scrub_pii:  # reports must not leak the PII the output is scrubbed of
            head = scrub_pii(head)[0]
        return head[:SNIPPET_CHARS]

    def __call__(self, lineno: int, raw: bytes) -> DocResult:
        doc_id, source, text, is_html = self._parse(lineno, raw)
        in_chars = len(text)
        text = normalise_text(text, self.cfg.unicode_form)
        if is_html:
            text = html_to_text(text)

        def dropped(rule: str, reason: str, pii: tuple[int, ...] = (0,) * len(KINDS),
                    hit: SafetyHit | None = None) -> DocResult:
            snippet = hit.snippet if hit is not None else self._snippet(text)
            return DocResult(doc_id, source, in_chars, 0, is_html, rule, reason, snippet, pii,
                             None, None, None, hit)

        failure = first_failure(text, self.cfg)
        if failure is not None:
            return dropped(*failure)
        pii = (0,) * len(KINDS)
        if self.cfg.scrub_pii:
            text, counts = scrub_pii(text)
            pii = tuple(counts[k] for k in KINDS)
        hit = self._moderate(text) if self.moderator is not None else None
        if hit is not None and hit.action == "drop":
            return dropped("safety", hit.reason, pii, hit)
        if self.safety_filter is not None:
            reason = self._safety(doc_id, text)
            if reason is not None:
                return dropped("safety", reason, pii)
        key = exact_key(text) if self.cfg.exact_dedup else None
        signature = self.signer.signature(text) if self.signer is not None else None
        line = dumps_line({"id": doc_id, "text": text, "source": source})
        return DocResult(doc_id, source, in_chars, len(text), is_html, None, None, None, pii, key, signature, line,
                         hit)

    def _moderate(self, text: str) -> SafetyHit | None:
        """The policy's data verdict on the (already PII-scrubbed) text; None when it keeps it."""
        assert self.moderator is not None
        verdict = self.moderator.check(text, "data", use_classifier=False)
        if verdict.action == "keep":
            return None
        f = verdict.findings[0]  # the finding that decided the action
        evidence = _shown(f, f.evidence)
        # The snippet is the text around the match (the document's start may be far from it),
        # with a PII match masked as in the evidence: reports must not repeat it.
        start = max(0, f.start - SNIPPET_CHARS // 3)
        snippet = text[start:f.start] + evidence + text[f.end:f.end + SNIPPET_CHARS]
        return SafetyHit(verdict.action, verdict.category, f.rule, evidence[:_EVIDENCE_CHARS],
                         snippet[:SNIPPET_CHARS])

    def _safety(self, doc_id: str, text: str) -> str | None:
        try:
            reason = self.safety_filter(text)
        except Exception as e:
            raise ChatforgeError(f"clean.safety_filter raised on document {doc_id!r}: {type(e).__name__}: {e}") from e
        if reason is not None and not isinstance(reason, str):
            raise ChatforgeError(
                f"clean.safety_filter must return None or a reason string, got {type(reason).__name__} "
                f"for document {doc_id!r}"
            )
        if reason is None:
            return None
        return reason or "unsafe (the filter gave no reason)"


def _data_moderator(policy: Policy) -> Moderator | None:
    """A rules-only moderator for the data place, over the categories that drop or flag in data.

    A category whose data action is ``keep`` can never change a data verdict (the verdict is
    the strictest action found, and its first finding is one of that action), so its rules
    are skipped: the same verdicts, a quarter less time with the default policy.
    """
    acting = {code: c for code, c in policy.categories.items() if c.data != "keep"}
    return Moderator(dataclasses.replace(policy, categories=acting)) if acting else None


def _shown(f: Finding, text: str) -> str:
    """How a finding's matched text appears in reasons and reports: a PII match as its kind."""
    return f"[{f.rule.partition(':')[2].upper()}]" if f.rule.startswith("pii:") else text


# The cleaner of this process: set once per worker by the pool initializer. The policy
# (compiled patterns, frozen dataclasses) pickles, so a spawned worker gets its own copy.
_cleaner: DocCleaner | None = None


def _init_worker(cfg: CleanConfig, label: str, safety_filter: SafetyFilter | None,
                 policy: Policy | None = None) -> None:
    global _cleaner
    _cleaner = DocCleaner(cfg, label, safety_filter, policy)


def _clean_chunk(chunk: list[tuple[int, bytes]]) -> list[DocResult]:
    assert _cleaner is not None
    return [_cleaner(lineno, raw) for lineno, raw in chunk]


def _read_chunks(path: Path) -> Iterator[list[tuple[int, bytes]]]:
    """Non-blank raw lines of a JSONL file with their line numbers, in chunks."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by `with` below
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from e
    with f:
        chunk: list[tuple[int, bytes]] = []
        size = 0
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            chunk.append((lineno, raw))
            size += len(raw)
            if len(chunk) >= _CHUNK_LINES or size >= _CHUNK_BYTES:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk


def _cleaned(path: Path, cfg: CleanConfig, workers: int, safety_filter: SafetyFilter | None,
             policy: Policy | None = None) -> Iterator[DocResult]:
    """Per-document results in input order, computed by ``workers`` processes."""
    args = (cfg, str(path), safety_filter, policy)
    if workers == 1:
        _init_worker(*args)
        for chunk in _read_chunks(path):
            yield from _clean_chunk(chunk)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=args) as pool:
        window: collections.deque = collections.deque()
        for chunk in _read_chunks(path):
            window.append(pool.apply_async(_clean_chunk, (chunk,)))
            if len(window) >= _WINDOW_PER_WORKER * workers:
                yield from window.popleft().get()
        while window:
            yield from window.popleft().get()


# --------------------------------------------------------------------------- report


class _Report:
    """Counts and examples, accumulated as results stream past."""

    def __init__(self, cfg: CleanConfig, policy: Policy | None = None):
        self.cfg = cfg
        self.policy = policy
        # Per category whose data action is not "keep": documents dropped, and flagged ones the output kept.
        self.safety = {} if policy is None else {
            c.name: {"action": c.data, "dropped": 0, "flagged": 0, "examples": []}
            for c in policy.categories.values() if c.data != "keep"
        }
        self.in_docs = self.in_chars = self.out_docs = self.out_chars = self.html_docs = 0
        self.transform_chars = 0  # chars removed from kept docs by normalisation, HTML and PII steps
        self.rules = {
            name: {"fields": list(fields), "docs": 0, "chars": 0, "examples": []}
            for name, fields in RULE_FIELDS.items()
        }
        self.safety_reasons: collections.Counter[str] = collections.Counter()
        self.pii = dict.fromkeys(KINDS, 0)

    def seen(self, r: DocResult) -> None:
        self.in_docs += 1
        self.in_chars += r.in_chars
        self.html_docs += r.html
        for kind, n in zip(KINDS, r.pii):
            self.pii[kind] += n

    def drop(self, rule: str, r: DocResult, reason: str, snippet: Callable[[], str]) -> None:
        entry = self.rules[rule]
        entry["docs"] += 1
        entry["chars"] += r.in_chars
        if rule == "safety":
            self.safety_reasons[reason] += 1
            if r.safety is not None:
                self._safety_hit(r, "dropped")
        if len(entry["examples"]) < self.cfg.examples_per_rule:
            entry["examples"].append({"id": r.id, "source": r.source, "reason": reason, "snippet": snippet()})

    def keep(self, r: DocResult) -> None:
        self.out_docs += 1
        self.out_chars += r.out_chars
        self.transform_chars += r.in_chars - r.out_chars
        if r.safety is not None:  # counted here, not in the worker: a flagged duplicate is not in the output
            self._safety_hit(r, "flagged")

    def _safety_hit(self, r: DocResult, what: str) -> None:
        hit = r.safety
        assert hit is not None
        entry = self.safety[hit.category]
        entry[what] += 1
        if len(entry["examples"]) < self.cfg.examples_per_rule:
            entry["examples"].append({"id": r.id, "source": r.source, "rule": hit.rule, "evidence": hit.evidence,
                                      "snippet": hit.snippet})

    def safety_section(self) -> dict[str, Any] | None:
        if self.policy is None:
            return None
        return {"policy": self.policy.name, "source": self.policy.source,
                "dropped": sum(e["dropped"] for e in self.safety.values()),
                "flagged": sum(e["flagged"] for e in self.safety.values()),
                "categories": self.safety}

    def to_dict(self, workers: int, wall: float, in_bytes: int) -> dict[str, Any]:
        dropped_docs = sum(e["docs"] for e in self.rules.values())
        dropped_chars = sum(e["chars"] for e in self.rules.values())
        rules = dict(self.rules)
        if self.safety_reasons:
            rules["safety"] = {**rules["safety"], "reasons": dict(self.safety_reasons.most_common())}
        return {
            "input": {"docs": self.in_docs, "chars": self.in_chars, "bytes": in_bytes},
            "output": {"docs": self.out_docs, "chars": self.out_chars},
            "dropped": {"docs": dropped_docs, "chars": dropped_chars},
            # input.chars = output.chars + dropped.chars + transformed.chars_removed
            "transformed": {"html_docs": self.html_docs, "chars_removed": self.transform_chars},
            "rules": rules,
            "pii": self.pii,
            "safety": self.safety_section(),
            "workers": workers,
            "wall_time_s": round(wall, 3),
            "mb_per_s": round(in_bytes / 1e6 / max(wall, 1e-9), 2),
            "config": dataclasses.asdict(self.cfg),
        }


# --------------------------------------------------------------------------- the stage


def _resolve_workers(cfg: CleanConfig) -> int:
    if cfg.workers > 0:
        return cfg.workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _check_picklable(safety_filter: SafetyFilter, workers: int) -> None:
    if workers > 1 and multiprocessing.get_start_method() != "fork":
        try:
            pickle.dumps(safety_filter)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise ConfigError(
                f"clean.safety_filter: the filter must be a module-level function to run in "
                f"{workers} worker processes ({e}); or set clean.workers=1"
            ) from e


def clean(
    in_path: Path,
    out_path: Path,
    report_path: Path,
    cfg: CleanConfig,
    *,
    safety_filter: SafetyFilter | None = None,
) -> dict[str, Any]:
    """Clean ``in_path`` (raw JSONL) into ``out_path`` and write ``report_path``; return the report.

    ``safety_filter``, when given, is used instead of ``cfg.safety_filter``: a
    callable taking a document's text and returning ``None`` (keep) or a reason
    string (drop). ``cfg.safety_policy`` is loaded here, before any worker starts, so
    a bad policy file fails at once. Raises ``DataError`` naming file and line on bad input, and when
    no document survives (with the rules that dropped them); outputs are then left
    as they were.
    """
    t0 = time.perf_counter()
    in_path, out_path, report_path = Path(in_path), Path(out_path), Path(report_path)
    if safety_filter is None and cfg.safety_filter:
        safety_filter = load_safety_filter(cfg.safety_filter)
    workers = _resolve_workers(cfg)
    if safety_filter is not None:
        _check_picklable(safety_filter, workers)
    policy = load_clean_policy(cfg.safety_policy) if cfg.safety_policy else None

    report = _Report(cfg, policy)
    seen_exact: dict[bytes, str] = {}
    near = None
    if cfg.near_dedup:
        scheme = Signer(cfg.minhash_num_perm, cfg.shingle_words).scheme
        near = NearDuplicateIndex(cfg.minhash_threshold, cfg.minhash_num_perm, scheme)

    # closing(): an error here stops the worker pool at once, not when garbage-collected.
    with atomic_write(out_path) as out, contextlib.closing(_cleaned(in_path, cfg, workers, safety_filter, policy)) as results:
        for r in results:
            report.seen(r)
            if r.rule is not None:
                report.drop(r.rule, r, r.reason or "", lambda r=r: r.snippet or "")
                continue
            snippet = lambda r=r: json.loads(r.line)["text"][:SNIPPET_CHARS]  # noqa: E731 - only built when needed
            if r.exact_key is not None:
                first = seen_exact.get(r.exact_key)
                if first is not None:
                    report.drop("exact_duplicate", r, f"same text as {first!r}", snippet)
                    continue
                seen_exact[r.exact_key] = r.id
            if near is not None and r.signature is not None:
                match = near.match_or_add(r.id, r.signature)
                if match is not None:
                    report.drop("near_duplicate", r, f"near-duplicate of {match[0]!r} (Jaccard ~{match[1]:.2f})",
                                snippet)
                    continue
            report.keep(r)
            out.write(r.line)
            out.write("\n")
        if report.in_docs == 0:
            raise DataError(f"{in_path}: no documents to clean (the file is empty)")
        if report.out_docs == 0:
            top = sorted(((e["docs"], name) for name, e in report.rules.items() if e["docs"]), reverse=True)
            why = ", ".join(f"{name}: {n}" for n, name in top)
            raise DataError(
                f"{in_path}: every one of {report.in_docs} documents was dropped ({why}); "
                "loosen the clean.* settings of those rules"
            )
        out.flush()
        result = report.to_dict(workers, time.perf_counter() - t0, in_path.stat().st_size)
    write_json(report_path, result)
    return result
