"""Reading task datasets record by record: JSONL, Parquet or a Hugging Face dataset name.

Every record comes with its location (``file:line``, ``file: row N`` or ``hf:NAME
row N``) so that an error about a field can say exactly where it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chatforge.errors import ChatforgeError, DataError
from chatforge.io import read_jsonl

_PARQUET_BATCH_ROWS = 1024


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}: row {row}", record
    except (pa.ArrowException, UnicodeDecodeError) as e:
        raise DataError(f"{path}: rows after {row}: cannot decode: {e}") from e


def _iter_hf(source: str, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    name, _, config = source[len("hf:"):].partition(":")
    try:
        import datasets
    except ImportError as e:
        raise ChatforgeError(f"{source}: the Hugging Face `datasets` package is not installed; install it with "
                             "`pip install 'chatforge[hf]'` or use a local JSONL/Parquet file") from e
    try:
        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
        for i, record in enumerate(ds):
            yield f"{source} (split {split}) row {i}", dict(record)
    except ChatforgeError:
        raise
    except Exception as e:  # network, auth, unknown dataset/split: all surface here
        raise ChatforgeError(f"{source}: cannot load split {split!r}: {e} "
                             "(hf: sources need network access or a local Hugging Face cache)") from e


def iter_records(source: str | Path, split: str = "train") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(location, record)`` for each record of a ``.jsonl``/``.parquet`` file or ``hf:NAME[:CONFIG]``."""
    if isinstance(source, str) and source.startswith("hf:"):
        return _iter_hf(source, split)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: no such file (task data is a .jsonl or .parquet file, or hf:NAME)")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return ((f"{path}:{lineno}", obj) for lineno, obj in read_jsonl(path))
    if suffix == ".parquet":
        return _iter_parquet(path)
    raise DataError(f"{path}: unsupported data format {suffix or '(no extension)'!r}; supported: .jsonl, .parquet, "
                    "hf:NAME")


def field_of(record: Any, name: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """``record[name]``, checked: a clear error naming the location, the field and the fields present."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if name not in record:
        present = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(f"{where}: missing field {name!r} (fields present: {present})")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple)
                                                                                 else (kind,)):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {name!r} must be {want}, got {type(value).__name__}")
    return value
