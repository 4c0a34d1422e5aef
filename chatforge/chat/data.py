"""Reading chat datasets and turning them into rendered, length-capped examples.

Sources, all read the same way (``iter_conversations``):
- a JSONL file, one conversation per line, either ``{"messages": [...]}`` or TRL's
  conversational prompt-completion form ``{"prompt": [...], "completion": [...]}``
  (the two lists are joined; the completion is what is learned). The plain form
  ``{"prompt": "text", "completion": "text"}`` becomes one user and one assistant turn.
- a Parquet file with the same columns (``messages`` as a list of structs, ...).
- ``hf:NAME`` or ``hf:NAME:CONFIG``: a Hugging Face dataset (needs the optional
  ``datasets`` package, imported only here).

Each conversation comes with its location (``file:line``, ``file: row N``, or
``hf:NAME row N``), which every error message names.

``tokenize_conversations`` renders them with the loss mask. A conversation longer
than ``max_tokens`` keeps its start (ids and loss mask cut at the same place, so
they stay aligned) and is counted in ``ChatDataStats``; one left with no learned
token after the cut contributes nothing to the loss and is dropped, also counted.
Nothing about length ever raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.chat.template import RenderedChat, render
from chatforge.errors import ChatforgeError, DataError
from chatforge.io import read_jsonl
from chatforge.tokenizer.base import Tokenizer

MAX_WARNINGS = 10  # warnings kept verbatim in the stats; the counts cover all of them
_PARQUET_BATCH_ROWS = 1024


@dataclass
class ChatDataStats:
    """What loading a chat dataset did: counts, plus the first few warnings verbatim."""

    conversations: int = 0  # read from the source
    examples: int = 0  # kept
    tokens: int = 0  # in the kept examples, after truncation
    learned_tokens: int = 0  # loss_mask == 1 in the kept examples
    truncated: int = 0  # conversations cut to max_tokens (kept, or dropped_no_learned)
    truncated_tokens: int = 0  # tokens cut off
    dropped_no_learned: int = 0  # dropped: no learned token left after the cut
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(message)

    def summary(self) -> str:
        text = (f"{self.examples} of {self.conversations} conversations, {self.tokens} tokens "
                f"({self.learned_tokens} learned)")
        if self.truncated:  # the dropped ones were truncated first: they are counted in both
            text += f"; {self.truncated} truncated ({self.truncated_tokens} tokens cut)"
        if self.dropped_no_learned:
            text += f", {self.dropped_no_learned} of them dropped (no assistant token left after truncation)"
        return text


# --------------------------------------------------------------------------- reading


def messages_from_record(obj: Any, where: str) -> list[dict[str, Any]]:
    """The messages of one dataset record (``messages`` or ``prompt`` + ``completion``)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list):
            raise DataError(f"{where}: field 'messages' must be a list of {{\"role\", \"content\"}} objects, "
                            f"got {_type_name(messages)}")
        return messages
    if "prompt" in obj and "completion" in obj:
        prompt, completion = obj["prompt"], obj["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        if isinstance(prompt, list) and isinstance(completion, list):
            return [*prompt, *completion]
        if isinstance(prompt, str):
            raise DataError(f"{where}: field 'completion' must be a string (like 'prompt'), "
                            f"got {_type_name(completion)}")
        if isinstance(prompt, list):
            raise DataError(f"{where}: field 'completion' must be a list of messages (like 'prompt'), "
                            f"got {_type_name(completion)}")
        raise DataError(f"{where}: field 'prompt' must be a string or a list of messages, got {_type_name(prompt)}")
    keys = ", ".join(map(str, obj)) or "none"
    raise DataError(f"{where}: no field 'messages' (or 'prompt' + 'completion'); the record has: {keys}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _iter_jsonl(path: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        yield where, messages_from_record(obj, where)


def _iter_parquet(path: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    names = pf.schema_arrow.names
    columns = ["messages"] if "messages" in names else ["prompt", "completion"]
    if not set(columns) <= set(names):
        raise DataError(f"{path}: no column 'messages' (or 'prompt' + 'completion'); columns: {', '.join(names)}")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            for record in batch.to_pylist():
                row += 1
                where = f"{path}: row {row}"
                yield where, messages_from_record(record, where)
    except (pa.ArrowException, UnicodeDecodeError) as e:
        raise DataError(f"{path}: rows after {row}: cannot decode: {e}") from e


def _iter_hf(source: str, split: str) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    name, _, config = source[len("hf:"):].partition(":")
    try:
        import datasets
    except ImportError as e:
        raise ChatforgeError(f"{source}: the Hugging Face `datasets` package is not installed; install it with "
                             "`pip install 'chatforge[hf]'` or use a local JSONL/Parquet file") from e
    try:
        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
        for i, record in enumerate(ds):
            where = f"{source} (split {split}) row {i}"
            yield where, messages_from_record(record, where)
    except ChatforgeError:
        raise
    except Exception as e:  # network, auth, unknown dataset/split: all surface here
        raise ChatforgeError(f"{source}: cannot load split {split!r}: {e} "
                             "(hf: sources need network access or a local Hugging Face cache)") from e


def iter_conversations(source: str | Path, split: str = "train") -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Yield ``(location, messages)`` for each conversation of ``source``: a ``.jsonl`` or
    ``.parquet`` path, or ``hf:NAME[:CONFIG]`` (``split`` picks the split). Messages
    are not validated here; ``render`` does that, naming the location."""
    if isinstance(source, str) and source.startswith("hf:"):
        return _iter_hf(source, split)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: no such file (chat data is a .jsonl or .parquet file, or hf:NAME)")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _iter_jsonl(path)
    if suffix == ".parquet":
        return _iter_parquet(path)
    raise DataError(f"{path}: unsupported chat data format {suffix or '(no extension)'!r}; "
                    "supported: .jsonl, .parquet, hf:NAME")


# --------------------------------------------------------------------------- tokenizing


def truncate(chat: RenderedChat, max_tokens: int) -> RenderedChat:
    """Keep the first ``max_tokens`` tokens of ``chat`` (ids and loss mask alike)."""
    if len(chat) <= max_tokens:
        return chat
    return RenderedChat(chat.ids[:max_tokens], chat.loss_mask[:max_tokens])


def tokenize_conversations(
    conversations: Iterable[tuple[str, list[dict[str, Any]]]],
    tok: Tokenizer,
    max_tokens: int,
) -> tuple[list[RenderedChat], ChatDataStats]:
    """Render every ``(location, messages)`` for training (an assistant turn is required)
    and cap each at ``max_tokens`` (for a model of context ``block_size``, use
    ``block_size + 1``: inputs and shifted targets). Invalid conversations raise
    ``DataError`` naming their location; long ones are truncated and counted."""
    if max_tokens < 2:
        raise ChatforgeError(f"max_tokens must be >= 2 (one input and one target), got {max_tokens}")
    stats = ChatDataStats()
    examples: list[RenderedChat] = []
    for where, messages in conversations:
        stats.conversations += 1
        chat = render(messages, tok, require_assistant=True, where=where)
        if len(chat) > max_tokens:
            cut = len(chat) - max_tokens
            chat = truncate(chat, max_tokens)
            stats.truncated += 1
            stats.truncated_tokens += cut
            if chat.n_learned == 0:
                stats.dropped_no_learned += 1
                stats.warn(f"{where}: dropped: {max_tokens + cut} tokens, and no assistant token is within "
                           f"the first {max_tokens}")
                continue
            stats.warn(f"{where}: truncated from {max_tokens + cut} to {max_tokens} tokens")
        stats.examples += 1
        stats.tokens += len(chat)
        stats.learned_tokens += chat.n_learned
        examples.append(chat)
    return examples, stats


def load_chat_examples(
    source: str | Path, tok: Tokenizer, max_tokens: int, split: str = "train"
) -> tuple[list[RenderedChat], ChatDataStats]:
    """``tokenize_conversations(iter_conversations(source, split), tok, max_tokens)``."""
    return tokenize_conversations(iter_conversations(source, split), tok, max_tokens)
