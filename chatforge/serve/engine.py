"""A continuous-batching generation engine: many requests share each decode step.

``model.generate`` decodes a fixed batch from start to end: a request that
arrives while it runs waits for the whole batch, and a short answer's row keeps
being fed until the longest one is done. A server sees requests arrive and
finish at any time, so the engine keeps a pool of ``max_batch`` slots instead:

- a new request is prefilled alone (batch 1, positions 0..T-1, exactly as
  ``generate`` would) straight into a free slot of a ``SlotKVCache``; at most
  about one context of prompt tokens is prefilled between two decode steps, so a
  burst of arrivals does not freeze the replies already streaming;
- every decode step is ONE forward over all running slots: each row feeds its
  last token at its own RoPE position, and an attention mask limits each row to
  the columns its own request has written;
- a request leaves its slot as soon as it stops (stop token, stop string,
  ``max_tokens``, full context, ``cancel()``); the last running slot moves into
  the hole so the running rows stay ``0..n-1`` and every step works on views of
  the cache, not on gathered copies.

A background thread runs this loop. Tokens go to the consumer as ``TokenEvent``s
through a queue: an ``asyncio.Queue`` fed with ``loop.call_soon_threadsafe`` when
the request was submitted from a running event loop (FastAPI), else a
``queue.Queue`` (tests, scripts). Text is detokenised incrementally: all bytes so
far are decoded and only the new, settled suffix is emitted; text is held back
while it ends in an incomplete UTF-8 character (U+FFFD) or could be the start of
a stop string, so a stop string is never streamed and then taken back.

Sampling is one vectorised call per step over all running rows, each with its
own temperature/top-k/top-p/penalty (``SamplingRows``, the rules of
``model.generate``). The draw is inverse-CDF sampling from one uniform number per
row: a request with a ``seed`` takes its number from its own CPU
``torch.Generator``, so its tokens do not depend on what else runs, and equal
``generate(model, [prompt], seed=seed)`` alone. Greedy rows are the argmax.
``TokenEvent.logprob`` is the model's own log-probability of the token (raw
logits, as OpenAI's ``logprobs`` report), not the adjusted sampling distribution.

``compile=True`` (``chatforge serve --compile``) runs each prefill through a compiled forward
padded to a few length buckets (``chatforge.model.compiled_prefill``), compiled for every
bucket when the engine starts: a 185-token prefill of the tiny preset's model takes 3.1 ms
instead of 7.2 (bf16, 1 thread, 2-core Xeon with AMX), so a busy server spends less of its
time in prefill (16% instead of 23% with 16 requests). Fused kernels round a
little differently, so a seeded request then no longer equals ``generate`` bit for bit.
The decode step stays eager: its shapes change with every admitted or finished request.

The forward runs under bf16 autocast on GPUs and AMX CPUs
(``dtype="auto"``; "fp32" forces fp32); logits and log-probabilities are fp32.
The decode thread holds one ``no_grad`` + autocast region while it has work, so
autocast casts each weight to bf16 once per busy period, not at every step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import numbers
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from chatforge.chat.template import render_prompt, stop_token_ids
from chatforge.errors import ChatforgeError
from chatforge.model.compiled_decode import can_compile
from chatforge.model.compiled_prefill import compiled_prefill
from chatforge.model.compiled_prefill import warm_up as warm_up_prefill
from chatforge.model.generate import (
    SamplingRows,
    adjust_logits_rows,
    forward_autocast,
    lm_logits,
    sample_rows,
)
from chatforge.model.gpt import GPT
from chatforge.model.quantize import model_precision

__all__ = [
    "Engine",
    "GenerationHandle",
    "PromptTooLong",
    "QueueFull",
    "SamplingParams",
    "SlotKVCache",
    "TokenEvent",
]

log = logging.getLogger("chatforge.serve")

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows
_END = object()  # queue sentinel: the request is finished


class QueueFull(ChatforgeError):
    """Every slot is busy and the waiting queue is full (the API answers 503)."""


class PromptTooLong(ChatforgeError):
    """The prompt plus ``max_tokens`` does not fit the model's context (the API answers 400)."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context: int):
        self.prompt_tokens, self.max_tokens, self.context = prompt_tokens, max_tokens, context
        super().__init__(
            f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: {prompt_tokens + max_tokens} "
            f"tokens do not fit the model's context of {context} tokens; shorten the prompt or lower max_tokens"
        )


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0  # OpenAI's: logit -= f * times generated so far (the prompt does not count)
    presence_penalty: float = 0.0  # OpenAI's: logit -= p once a token has been generated
    stop: tuple[str, ...] = ()  # stop strings, not included in the output
    seed: int | None = None
    logprobs: int | None = None  # None: off; N >= 0: chosen token's logprob + top-N alternatives

    def check(self) -> None:
        """Raise ``ChatforgeError`` naming the first bad field."""
        def bad(field: str, msg: str) -> ChatforgeError:
            return ChatforgeError(f"sampling parameter {field}: {msg}")

        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise bad("max_tokens", f"must be an integer >= 0, got {self.max_tokens!r}")
        if not _is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", f"must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_p is not None and (not _is_num(self.top_p) or not 0 < self.top_p <= 1):
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise bad("top_k", f"must be an integer >= 1, got {self.top_k!r}")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", f"must be > 0 (1 = off), got {self.repetition_penalty!r}")
        for field in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, field)
            if not _is_num(value) or not -2 <= value <= 2:
                raise bad(field, f"must be a number in [-2, 2] (0 = off), got {value!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", f"must be non-empty strings, got {list(self.stop)!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", f"must be an integer, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass
class TokenEvent:
    """One generated token and the text it settled.

    ``token_id`` is -1 for a text-only event: text held back (a possible stop
    string, an incomplete character) that is released when the request ends.
    """

    token_id: int
    text: str  # decoded text delta (may be "" while a UTF-8 char is incomplete)
    logprob: float | None = None
    top_logprobs: list[tuple[str, float]] | None = None
    top_token_ids: list[int] | None = None  # ids of top_logprobs, same order (exact bytes for the API)


# --------------------------------------------------------------------------- the slotted cache


class SlotKVCache:
    """Key/value cache with ``n_slots`` rows, each holding one request at its own length.

    Speaks the ``prepare``/``update``/``commit`` protocol ``GPT.forward_hidden`` uses
    with ``KVCache``, in one of two modes set before each forward:

    - ``begin_prefill(row)``: a (1, T) prompt is written into columns 0..T-1 of
      ``row``; plain causal attention, positions 0..T-1.
    - ``begin_decode(n)``: rows 0..n-1 each write one token at column
      ``lengths[row]``, with RoPE position ``lengths[row]``, attending to columns
      ``0..lengths[row]`` of their own row only. Columns past a row's length may
      hold an old request's keys: the mask hides them.
    """

    def __init__(self, n_layer: int, n_slots: int, n_kv_head: int, head_dim: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        self.n_layer, self.n_slots, self.n_kv_head, self.head_dim = n_layer, n_slots, n_kv_head, head_dim
        self.max_len = max_len
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.k: torch.Tensor | None = None  # allocated on the first write, in the dtype of the keys
        self.v: torch.Tensor | None = None
        if dtype is not None:
            self._allocate(dtype)
        self.lengths = [0] * n_slots  # tokens cached per row (python ints: no device sync to read)
        self._arange = torch.arange(max(n_slots, max_len), device=self.device)
        self._mode: tuple[str, int] | None = None
        self._lens: torch.Tensor | None = None  # (n,) lengths of the decoding rows, on device
        self._end = 0
        self._pending = False
        self.last: dict[str, torch.Tensor] = {}  # (n_slots, ...) per-row tensors of the last token (smeared keys)

    @classmethod
    def for_model(cls, model: GPT, n_slots: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> SlotKVCache:
        cfg = model.config
        device = next(model.parameters()).device
        return cls(cfg.n_layer, n_slots, cfg.n_kv_head, cfg.head_dim, max_len or cfg.block_size, device, dtype)

    def _allocate(self, dtype: torch.dtype) -> None:
        shape = (self.n_layer, self.n_slots, self.n_kv_head, self.max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.dtype = dtype

    def begin_prefill(self, row: int) -> None:
        if not 0 <= row < self.n_slots:
            raise ChatforgeError(f"SlotKVCache: row {row} out of range (n_slots {self.n_slots})")
        self._mode = ("prefill", row)

    def begin_decode(self, n: int) -> None:
        if not 1 <= n <= self.n_slots:
            raise ChatforgeError(f"SlotKVCache: cannot decode {n} rows (n_slots {self.n_slots})")
        self._mode = ("decode", n)
        self._end = max(self.lengths[:n]) + 1
        self._lens = torch.tensor(self.lengths[:n], dtype=torch.long, device=self.device)

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src``'s cached tokens into row ``dst`` (to keep running rows contiguous)."""
        n = self.lengths[src]
        if self.k is not None and self.v is not None and n:
            self.k[:, dst, :, :n] = self.k[:, src, :, :n]
            self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        for buf in self.last.values():
            buf[dst] = buf[src]
        self.lengths[dst] = n

    # ------------------------------------------------------------------ called by GPT

    @property
    def pos(self) -> int:
        """The start column ``forward_hidden`` checks against the context: the longest decoding row."""
        if self._mode is not None and self._mode[0] == "decode":
            return self._end - 1
        return 0

    def previous_ok(self) -> torch.Tensor | None:
        """The first new token's predecessor: none for a prefill (it starts the row), a real token for
        each decoding row."""
        if self._mode is None or self._mode[0] == "prefill":
            return None
        return torch.ones(self._mode[1], dtype=torch.bool, device=self.device)

    def previous(self, name: str) -> torch.Tensor | None:
        if self._mode is None or self._mode[0] == "prefill" or name not in self.last:
            return None
        return self.last[name][:self._mode[1]]

    def remember(self, name: str, keys: torch.Tensor) -> None:
        if self._mode is None:
            raise ChatforgeError("SlotKVCache: call begin_prefill or begin_decode before the forward")
        kind, arg = self._mode
        self._keep_last(name, keys[:, :, -1:], arg if kind == "prefill" else None)

    def _keep_last(self, name: str, last: torch.Tensor, row: int | None) -> None:
        """Store a layer's last raw key: (1, H, 1, D) into ``row``, or (n, H, 1, D) into rows 0..n-1."""
        buf = self.last.get(name)
        if buf is None or buf.dtype != last.dtype:
            buf = self.last[name] = torch.zeros(self.n_slots, *last.shape[1:], dtype=last.dtype, device=self.device)
        if row is not None:
            buf[row] = last[0].detach()
        else:
            buf[:last.shape[0]] = last.detach()

    def write_prompt(self, row: int, k: list[torch.Tensor], v: list[torch.Tensor], last: dict[str, torch.Tensor]
                     ) -> None:
        """Store a prefill computed outside this cache (``compiled_prefill``): per layer (1, H, T, D) keys and
        values into columns 0..T-1 of ``row``, and the smeared-key layers' last raw keys."""
        if not 0 <= row < self.n_slots:
            raise ChatforgeError(f"SlotKVCache: row {row} out of range (n_slots {self.n_slots})")
        n = k[0].shape[2]
        if n > self.max_len:
            raise ChatforgeError(f"SlotKVCache: prompt of {n} tokens > max_len={self.max_len}")
        if self.k is None:
            self._allocate(k[0].dtype)
        assert self.k is not None and self.v is not None
        for layer, (kl, vl) in enumerate(zip(k, v)):
            self.k[layer, row, :, :n] = kl[0]
            self.v[layer, row, :, :n] = vl[0]
        for name, keys in last.items():
            self._keep_last(name, keys, row)
        self.lengths[row] = n

    def prepare(self, n_new: int, padding_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        if self._mode is None:
            raise ChatforgeError("SlotKVCache: call begin_prefill or begin_decode before the forward")
        if padding_mask is not None:
            raise ChatforgeError("SlotKVCache: padding_mask is not supported (prefill one request at a time)")
        kind, arg = self._mode
        self._pending = True
        if kind == "prefill":
            if n_new > self.max_len:
                raise ChatforgeError(f"SlotKVCache: prompt of {n_new} tokens > max_len={self.max_len}")
            return None, None, n_new > 1
        if n_new != 1:
            raise ChatforgeError(f"SlotKVCache: decode feeds one token per row, got {n_new}")
        assert self._lens is not None
        if self._end > self.max_len:
            raise ChatforgeError(f"SlotKVCache: a row is full ({self._end - 1} tokens, max_len={self.max_len})")
        positions = self._lens[:, None]  # (n, 1): each row at its own position
        mask = self._arange[None, :self._end] <= self._lens[:, None]  # (n, end): own columns and the new one
        return positions, mask[:, None, None, :], False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self._allocate(k.dtype)
        assert self.k is not None and self.v is not None and self._mode is not None
        kind, arg = self._mode
        if kind == "prefill":
            T = k.shape[2]
            self.k[layer, arg:arg + 1, :, :T] = k
            self.v[layer, arg:arg + 1, :, :T] = v
            return self.k[layer, arg:arg + 1, :, :T], self.v[layer, arg:arg + 1, :, :T]
        assert self._lens is not None
        rows = self._arange[:arg]
        kl, vl = self.k[layer], self.v[layer]
        kl[rows, :, self._lens] = k[:, :, 0]  # advanced indices around a slice: (n, H, D)
        vl[rows, :, self._lens] = v[:, :, 0]
        return kl[:arg, :, :self._end], vl[:arg, :, :self._end]

    def commit(self) -> None:
        if not self._pending or self._mode is None:
            raise ChatforgeError("SlotKVCache.commit called without a matching prepare")
        kind, arg = self._mode
        if kind == "prefill":
            pass  # the caller knows the prompt length: see Engine._prefill
        else:
            for r in range(arg):
                self.lengths[r] += 1
        self._pending = False
        self._mode = None


# --------------------------------------------------------------------------- detokenisation


class Detokenizer:
    """Bytes in, settled text deltas out; cuts at the first stop string.

    Emits text only once it can no longer change: not while it ends in U+FFFD (a
    UTF-8 character cut between tokens) and not while its end could be the start
    of a stop string. Because of that hold-back, a stop string can only begin at
    or after the text already emitted, so nothing emitted is ever taken back.
    """

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.maxlen = max((len(s) for s in self.stops), default=0)
        self.buf = bytearray()
        self.text = ""  # text emitted so far
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Add one token's bytes; return the newly settled text ("" if none). Sets ``stopped``."""
        if self.stopped:
            return ""
        self.buf += data
        stable = self.buf.decode("utf-8", errors="replace").rstrip("\ufffd")
        done = len(self.text)
        if self.stops:
            cut = min((p for s in self.stops if (p := stable.find(s, done)) != -1), default=-1)
            if cut != -1:
                self.stopped = True
                return self._emit(stable[:cut])
            for k in range(min(self.maxlen - 1, len(stable) - done), 0, -1):
                tail = stable[-k:]
                if any(s.startswith(tail) for s in self.stops):
                    stable = stable[:-k]
                    break
        return self._emit(stable)

    def flush(self) -> str:
        """Everything not yet emitted (at the end of generation); nothing after a stop string."""
        if self.stopped:
            return ""
        return self._emit(self.buf.decode("utf-8", errors="replace"))

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text):]
        self.text = upto
        return delta


# --------------------------------------------------------------------------- handles


def _deliver(items: list[tuple[GenerationHandle, Any]]) -> None:
    """Runs in the consumer's event loop: one step's events, in the order the engine made them."""
    for handle, item in items:
        assert handle._aq is not None
        handle._aq.put_nowait(item)


class GenerationHandle:
    """One request's results: iterate it (sync or async) for ``TokenEvent``s.

    After the iteration ends, ``finish_reason`` is "stop", "length", "cancelled" or
    "error" (then ``error`` holds the message) and ``text`` the whole reply.
    """

    def __init__(self, engine: Engine, prompt_tokens: int, loop: asyncio.AbstractEventLoop | None) -> None:
        self.engine = engine
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.text = ""
        self.token_ids: list[int] = []  # generated ids, stop token excluded
        # the stop token that ended the reply, with its logprob event when logprobs were asked for (the
        # legacy completions API lists it, as vLLM does: scorers slice the echoed logprobs by position)
        self.stop_event: TokenEvent | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._ended = False  # the consumer has seen the end
        self._loop = loop
        self._aq: asyncio.Queue[Any] | None = asyncio.Queue() if loop is not None else None
        self._q: queue.Queue[Any] | None = queue.Queue() if loop is None else None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the engine's next step."""
        if not self._done.is_set():
            self._cancel.set()
            self.engine._wake()

    def _put(self, item: Any) -> None:
        """Called by the engine thread."""
        if self._aq is not None:
            assert self._loop is not None
            if threading.get_ident() == self.engine._thread_id:  # delivered at the step's end (Engine._flush)
                self.engine._outbox.setdefault(self._loop, []).append((self, item))
                return
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, item)
            except RuntimeError:  # the consumer's event loop is closed: nobody will read this
                self._cancel.set()
        else:
            assert self._q is not None
            self._q.put(item)

    def __iter__(self) -> Iterator[TokenEvent]:
        while not self._ended:
            item = self._get_blocking()
            if item is _END:
                self._ended = True
                return
            yield item

    def _get_blocking(self) -> Any:
        if self._q is not None:
            return self._q.get()
        assert self._loop is not None and self._aq is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise ChatforgeError("this handle was submitted from an event loop: iterate it with `async for`")
        return asyncio.run_coroutine_threadsafe(self._aq.get(), self._loop).result()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while not self._ended:
            item = await self._get_async()
            if item is _END:
                self._ended = True
                return
            yield item

    async def _get_async(self) -> Any:
        if self._aq is not None and asyncio.get_running_loop() is self._loop:
            return await self._aq.get()
        if self._aq is not None:
            raise ChatforgeError("this handle belongs to another event loop")
        assert self._q is not None
        q = self._q
        while True:  # submitted outside a loop: poll the thread queue without blocking this loop
            try:
                return await asyncio.get_running_loop().run_in_executor(None, q.get, True, 0.5)
            except queue.Empty:
                continue

    async def result(self) -> str:
        """Wait for the end (consuming any events not read yet) and return the full text."""
        async for _ in self:
            pass
        return self.text

    def wait(self, timeout: float | None = None) -> str:
        """Blocking ``result`` for threads and scripts."""
        for _ in self:
            pass
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        return self.text


# --------------------------------------------------------------------------- the engine


_serials = itertools.count()


class _Request:
    """Engine-side state of one request."""

    def __init__(self, handle: GenerationHandle, prompt: list[int], params: SamplingParams,
                 stops: set[int]) -> None:
        self.handle = handle
        self.prompt = prompt
        self.params = params
        self.stops = stops
        self.detok = Detokenizer(params.stop)
        self.generator: torch.Generator | None = None  # CPU, for seeded requests
        self.serial = next(_serials)  # unlike id(), never reused: keys the cached sampling settings
        self.last_token = -1

    @property
    def sampling(self) -> tuple[float, int | None, float | None, float, float, float]:
        p = self.params
        return p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.frequency_penalty, p.presence_penalty


class Engine:
    """Continuous-batching generation for one model; see the module docstring."""

    def __init__(self, model: GPT, tokenizer: Any, max_batch: int = 16, max_queue: int = 64,
                 device: torch.device | str | None = None, dtype: str = "auto", compile: bool = False) -> None:
        if not _is_int(max_batch) or max_batch < 1:
            raise ChatforgeError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not _is_int(max_queue) or max_queue < 0:
            raise ChatforgeError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = model.config.block_size
        self.vocab_size = model.config.vocab_size
        self.precision = model_precision(model, dtype, self.device)
        self.dtype = self.precision.name  # the forward's precision: "bf16" or "fp32" (or "fp16" on old GPUs)
        if compile and (why := can_compile(model)) is not None:
            raise ChatforgeError(f"cannot compile the prefill: {why}")
        self.compile = bool(compile)
        self._warm = False  # compile=True: every prefill bucket compiled (warm_up)
        self.cache = SlotKVCache.for_model(model, max_batch)
        # Tokens each cache row has seen (prompt + generated), for the repetition penalty; moves with its row.
        self._seen = torch.zeros(max_batch, self.vocab_size, dtype=torch.bool, device=self.device)
        # How often each cache row generated each token, for the frequency and presence penalties.
        self._counts = torch.zeros(max_batch, self.vocab_size, device=self.device)
        self._sampling: tuple[tuple[int, ...], SamplingRows] | None = None  # rows' settings, rebuilt on change
        self._cv = threading.Condition()  # guards _waiting, _active, _stopping
        self._waiting: deque[_Request] = deque()
        self._active = 0  # admitted and not finished
        self._rows: list[_Request] = []  # running requests; index = cache row (engine thread only)
        self._model_lock = threading.Lock()  # one forward at a time (engine steps, prompt scoring)
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None
        # events the engine thread produced in this step, per consumer event loop (see _flush)
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[GenerationHandle, Any]]] = {}
        self._stopping = False
        self._steps = self._tokens = self._prefill_tokens = self._finished = self._cancelled = 0

    # ------------------------------------------------------------------ lifecycle

    def warm_up(self, log_fn: Callable[[str], None] | None = None) -> float:
        """With ``compile=True``: compile the prefill for every length bucket now (``start`` does it too);
        ``log_fn`` gets one line per bucket. Returns the seconds it took (0 when there is nothing to do)."""
        if not self.compile or self._warm:
            return 0.0
        with self._model_lock, torch.no_grad(), forward_autocast(self.precision):
            seconds = warm_up_prefill(self.model, log_fn)
        self._warm = True
        return seconds

    def start(self) -> None:
        """Start the background decode thread (no-op when running); compiles first when ``compile=True``."""
        if self._thread is not None and self._thread.is_alive():
            return
        self.warm_up(log.info)
        with self._cv:
            self._stopping = False
        self._thread = threading.Thread(target=self._run, name="chatforge-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; unfinished requests end with finish_reason "cancelled"."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for req in [*self._rows, *waiting]:
            self._finish(req, "cancelled", admitted=req in self._rows)
        self._rows = []

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # ------------------------------------------------------------------ requests

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               stop_token_ids: Iterable[int] = ()) -> GenerationHandle:
        """Queue a request; tokens arrive through the returned handle."""
        if not self.running:
            raise ChatforgeError("the engine is not running: call start() first")
        params.check()
        if hasattr(prompt_ids, "tolist"):
            prompt_ids = prompt_ids.tolist()
        prompt = list(prompt_ids)
        if not prompt:
            raise ChatforgeError("the prompt is empty: give at least one token (e.g. BOS)")
        bad = [t for t in prompt if not _is_int(t) or not 0 <= t < self.vocab_size]
        if bad:
            raise ChatforgeError(f"the prompt has invalid token ids (not integers in [0, {self.vocab_size})): "
                                 f"{bad[:5]}")
        if len(prompt) + params.max_tokens > self.context:
            raise PromptTooLong(len(prompt), params.max_tokens, self.context)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = GenerationHandle(self, len(prompt), loop)
        params = replace(params, stop=tuple(params.stop))  # the caller may reuse its object
        req = _Request(handle, prompt, params, {int(t) for t in stop_token_ids})
        with self._cv:
            if self._stopping:
                raise ChatforgeError("the engine is stopping: no new requests")
            if len(self._waiting) + self._active >= self.max_batch + self.max_queue:
                raise QueueFull(f"the engine is busy: {self._active} requests running and {len(self._waiting)} "
                                f"waiting (max_batch {self.max_batch}, max_queue {self.max_queue}); retry later")
            self._waiting.append(req)
            self._cv.notify_all()
        return handle

    def chat(self, messages: list[dict], params: SamplingParams) -> GenerationHandle:
        """Reply to a conversation: the chat template's prompt, stopping at the end of the turn."""
        ids = render_prompt(messages, self.tokenizer)
        return self.submit(ids, params, stop_token_ids(self.tokenizer))

    def prompt_logprobs(self, prompt_ids: list[int]) -> list[float | None]:
        """log P(ids[i] | ids[:i]) for every position (None for the first): one forward."""
        return self.score_prompt(prompt_ids)[0]

    def score_prompt(self, prompt_ids: list[int], top: int = 0
                     ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        """Per position: the token's logprob, and the ``top`` most likely (id, logprob) there."""
        ids = list(prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids)
        if not ids:
            raise ChatforgeError("the prompt is empty: nothing to score")
        if len(ids) > self.context:
            raise PromptTooLong(len(ids), 0, self.context)
        bad = [t for t in ids if not _is_int(t) or not 0 <= t < self.vocab_size]
        if bad:
            raise ChatforgeError(f"the prompt has invalid token ids (not integers in [0, {self.vocab_size})): "
                                 f"{bad[:5]}")
        if not _is_int(top) or not 0 <= top <= MAX_LOGPROBS:
            raise ChatforgeError(f"top must be an integer in [0, {MAX_LOGPROBS}], got {top!r}")
        with self._model_lock, torch.no_grad(), forward_autocast(self.precision):
            idx = torch.tensor([ids], dtype=torch.long, device=self.device)
            logits = lm_logits(self.model, self.model.forward_hidden(idx))
            lp = torch.log_softmax(logits[0, :-1], dim=-1)  # position i predicts token i+1
            chosen = lp.gather(1, idx[0, 1:, None])[:, 0].tolist()
            tops: list[list[tuple[int, float]] | None] = [None]
            if top > 0 and len(ids) > 1:
                vals, inds = lp.topk(min(top, lp.size(-1)), dim=-1)
                tops += [list(zip(i, v)) for i, v in zip(inds.tolist(), vals.tolist())]
            else:
                tops += [None] * (len(ids) - 1)
        return [None, *chosen], tops

    def stats(self) -> dict[str, Any]:
        with self._cv:
            waiting = len(self._waiting)
            active = self._active
        return {
            "running": active,
            "waiting": waiting,
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "steps": self._steps,
            "tokens_generated": self._tokens,
            "prefill_tokens": self._prefill_tokens,
            "requests_finished": self._finished,
            "requests_cancelled": self._cancelled,
        }

    # ------------------------------------------------------------------ the loop

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one wake-up per loop per step, not one per token
        (with 16 streams, per-token wake-ups cost the loop more than sending the tokens)."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody will read these
                for handle, _ in items:
                    handle._cancel.set()

    def _run(self) -> None:
        self._thread_id = threading.get_ident()
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._rows:
                    self._cv.wait()
                if self._stopping:
                    return
            # Busy: one region until idle again, so autocast makes its bf16 weight copies once
            # (it caches them only outside inference_mode, and drops them when the region ends).
            with torch.no_grad(), forward_autocast(self.precision):
                try:
                    while self._step():
                        self._flush()
                finally:
                    self._flush()

    def _step(self) -> bool:
        """Admit and prefill new requests, then one decode step; False when idle or stopping."""
        with self._cv:
            if self._stopping or (not self._waiting and not self._rows):
                return False
            admit: list[_Request] = []
            dropped = [req for req in self._waiting if req.handle.cancelled]
            if dropped:
                self._waiting = deque(req for req in self._waiting if not req.handle.cancelled)
            # Prefill at most ~one context of prompt tokens per step (always one request), so a burst
            # of new requests does not stall the rows already streaming.
            budget = self.context
            while self._waiting and len(self._rows) + len(admit) < self.max_batch and (
                    not admit or len(self._waiting[0].prompt) <= budget):
                req = self._waiting.popleft()
                budget -= len(req.prompt)
                admit.append(req)
            self._active += len(admit)
        for req in dropped:
            self._finish(req, "cancelled", admitted=False)
        try:
            with self._model_lock:
                for req in admit:
                    self._prefill(req)
                admit = []
                self._drop_cancelled()
                if self._rows:
                    self._decode_step()
        except Exception as e:  # a failed forward (e.g. out of memory) ends its requests, not the server
            log.exception("generation step failed")
            for req in [*self._rows, *admit]:
                self._finish(req, "error", error=f"{type(e).__name__}: {e}")
            self._rows = []
        return True

    def _prefill(self, req: _Request) -> None:
        if req.handle.cancelled:
            self._finish(req, "cancelled")
            return
        if req.params.max_tokens == 0:
            self._finish(req, "length")
            return
        if req.params.seed is not None:
            req.generator = torch.Generator()  # CPU: the same draws on any device, and as generate's
            req.generator.manual_seed(req.params.seed)
        row = len(self._rows)
        self._seen[row] = False
        self._seen[row, torch.tensor(req.prompt, device=self.device)] = True
        self._counts[row] = 0
        if self.compile:
            out = compiled_prefill(self.model, req.prompt)
            self.cache.write_prompt(row, out.k, out.v, out.last)
            hidden = out.hidden
        else:
            self.cache.begin_prefill(row)
            idx = torch.tensor([req.prompt], dtype=torch.long, device=self.device)
            hidden = self.model.forward_hidden(idx, kv_cache=self.cache)[:, -1]
            self.cache.lengths[row] = len(req.prompt)
        self._rows.append(req)
        self._prefill_tokens += len(req.prompt)
        self._advance([req], lm_logits(self.model, hidden), first_row=row)

    def _drop_cancelled(self) -> None:
        gone = [r for r, req in enumerate(self._rows) if req.handle.cancelled]
        for r in gone:
            self._finish(self._rows[r], "cancelled")
        self._remove(gone)

    def _decode_step(self) -> None:
        n = len(self._rows)
        idx = torch.tensor([[req.last_token] for req in self._rows], dtype=torch.long, device=self.device)
        self.cache.begin_decode(n)
        hidden = self.model.forward_hidden(idx, kv_cache=self.cache)
        logits = lm_logits(self.model, hidden[:, -1])
        self._steps += 1
        self._advance(list(self._rows), logits, first_row=0)

    def _sample(self, reqs: list[_Request], logits: torch.Tensor, first_row: int) -> torch.Tensor:
        """(n,) next tokens for cache rows first_row..: one vectorised call, each row with its own settings."""
        key = (first_row, *(req.serial for req in reqs))
        if self._sampling is None or self._sampling[0] != key:
            self._sampling = (key, SamplingRows.build([req.sampling for req in reqs], self.device))
        rows = self._sampling[1]
        seen = self._seen[first_row:first_row + len(reqs)] if rows.any_penalty else None
        counts = self._counts[first_row:first_row + len(reqs)] if rows.any_counted else None
        adjusted = adjust_logits_rows(logits, rows, seen, counts)
        return sample_rows(adjusted, rows, None if rows.all_greedy else self._uniforms(reqs))

    @staticmethod
    def _uniforms(reqs: list[_Request]) -> torch.Tensor:
        """One uniform number per row: from the request's own generator when seeded (so its draws do not
        depend on the batch), else from torch's global generator; greedy rows draw nothing."""
        u = [0.0] * len(reqs)
        free = [i for i, req in enumerate(reqs) if req.generator is None and req.params.temperature > 0]
        for i, v in zip(free, torch.rand(len(free)).tolist()):
            u[i] = v
        for i, req in enumerate(reqs):
            if req.generator is not None and req.params.temperature > 0:
                u[i] = torch.rand(1, generator=req.generator).item()
        return torch.tensor(u)

    def _advance(self, reqs: list[_Request], logits: torch.Tensor, first_row: int) -> None:
        """Sample a token for each of ``reqs`` (rows first_row..), stream it, retire finished rows."""
        chosen = self._sample(reqs, logits, first_row)
        self._seen[torch.arange(first_row, first_row + len(reqs), device=self.device), chosen] = True
        self._counts[torch.arange(first_row, first_row + len(reqs), device=self.device), chosen] += 1
        want = [i for i, req in enumerate(reqs) if req.params.logprobs is not None]
        lps: dict[int, tuple[float, list[tuple[int, float]]]] = {}
        if want:
            w = torch.tensor(want, device=logits.device)
            lp = torch.log_softmax(logits[w], dim=-1)  # raw logits: the model's own probabilities
            picked = lp.gather(1, chosen[w][:, None])[:, 0].tolist()
            n_top = max(reqs[i].params.logprobs or 0 for i in want)
            tops: list[list[tuple[int, float]]] = [[] for _ in want]
            if n_top > 0:
                vals, inds = lp.topk(min(n_top, lp.size(-1)), dim=-1)
                tops = [list(zip(i, v)) for i, v in zip(inds.tolist(), vals.tolist())]
            for k, i in enumerate(want):
                lps[i] = (picked[k], tops[k][:reqs[i].params.logprobs or 0])
        tokens = chosen.tolist()
        done = []
        for i, (req, tok) in enumerate(zip(reqs, tokens)):
            if self._emit(req, tok, lps.get(i)):
                done.append(first_row + i)
        self._remove(done)

    def _emit(self, req: _Request, tok: int, lp: tuple[float, list[tuple[int, float]]] | None) -> bool:
        """Deliver one sampled token; True when the request is finished."""
        h = req.handle
        if tok in req.stops:
            if lp is not None:
                h.stop_event = TokenEvent(tok, "", lp[0], [(self.tokenizer.id_to_token(i), v) for i, v in lp[1]],
                                          [i for i, _ in lp[1]])
            self._finish(req, "stop")
            return True
        h.token_ids.append(tok)
        h.completion_tokens += 1
        self._tokens += 1
        text = req.detok.push(self.tokenizer.decode_bytes([tok]))
        reason = None
        if req.detok.stopped:
            reason = "stop"
        elif h.completion_tokens >= req.params.max_tokens or len(req.prompt) + h.completion_tokens >= self.context:
            reason = "length"
            text += req.detok.flush()
        event = TokenEvent(tok, text)
        if lp is not None:
            event.logprob = lp[0]
            event.top_logprobs = [(self.tokenizer.id_to_token(i), v) for i, v in lp[1]]
            event.top_token_ids = [i for i, _ in lp[1]]
        h.text = req.detok.text
        h._put(event)
        if reason is not None:
            self._finish(req, reason)
            return True
        req.last_token = tok
        return False

    def _finish(self, req: _Request, reason: str, error: str | None = None, admitted: bool = True) -> None:
        h = req.handle
        if h.done:
            return
        if reason == "stop":
            rest = req.detok.flush()  # text held back for a stop string that never came
            if rest:
                h._put(TokenEvent(-1, rest))
        h.text = req.detok.text
        h.finish_reason = reason
        h.error = error
        with self._cv:
            if admitted:
                self._active -= 1
            self._finished += 1
            self._cancelled += reason == "cancelled"
        h._done.set()
        h._put(_END)

    def _remove(self, rows: list[int]) -> None:
        """Free these cache rows, moving the last running rows into the holes."""
        for r in sorted(rows, reverse=True):
            last = len(self._rows) - 1
            if r != last:
                self.cache.move(last, r)
                self._seen[r] = self._seen[last]
                self._counts[r] = self._counts[last]
                self._rows[r] = self._rows[last]
            self._rows.pop()
