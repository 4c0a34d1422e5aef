"""Model directories and training checkpoints.

A *model directory* is everything needed to use a model, and nothing more:

    model.safetensors   the weights (safetensors: no pickle, memory-mappable)
    config.json         {"format": "chatforge-model", "architecture", "model": GPTConfig, "version",
                         "step", "stage", "parent", ...}
    tokenizer/          the tokenizer the model was trained with

A *checkpoint* (``ckpt/step_0000100/``) is a model directory plus ``trainer.pt``:
optimizer and loss-scaler state, RNG states, the data loader's position and the
step, which is what ``--resume`` needs to continue exactly where the run stopped.

Both are written into a hidden temporary directory beside the target and renamed
into place when complete, so a crash (even SIGKILL) mid-write leaves the previous
checkpoint intact and never a half-written one under a real name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chatforge import __version__
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.io import sha256_file, write_json
from chatforge.model.gpt import GPT, GPTConfig

MODEL_FORMAT = "chatforge-model"
MODEL_FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER_DIR = "tokenizer"
TRAINER_STATE = "trainer.pt"
VERSION_CHARS = 12
_STEP_DIR = re.compile(r"^step_(\d+)$")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp directory that replaces ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".old-{target.name}-{os.getpid()}"
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _backbone(model: nn.Module) -> GPT:
    if isinstance(model, GPT):
        return model
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, GPT):
        return backbone
    raise ChatforgeError(f"cannot save {type(model).__name__}: expected a GPT or a module with a GPT .backbone")


def _plain_class(model: nn.Module) -> type:
    """The model's own class (FSDP2 swaps in a generated ``FSDP<Class>`` subclass while it trains)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def save_model(directory: Path, model: nn.Module, tokenizer: Any, meta: dict[str, Any] | None = None,
               extra_files: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a model directory atomically; ``extra_files`` maps names to torch-saved objects.
    ``state``: the weights to write instead of ``model.state_dict()`` (the full state dict of a
    model sharded over ranks, which no rank holds as ``model.state_dict()``)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in (model.state_dict() if state is None else state).items()}
        save_file(state, str(tmp / WEIGHTS))
        version = sha256_file(tmp / WEIGHTS)[:VERSION_CHARS]
        tokenizer.save(tmp / TOKENIZER_DIR)
        for name, obj in (extra_files or {}).items():
            torch.save(obj, tmp / name)
        config = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "architecture": "gpt" if isinstance(model, GPT) else _plain_class(model).__name__,
            "model": _backbone(model).config.to_dict(),
            "chatforge_version": __version__,
            **(meta or {}),
            "version": version,
        }
        write_json(tmp / CONFIG, config)  # written last: a directory with config.json is complete
    return directory


def model_version(directory: Path) -> str:
    """A model's version: the first 12 hex digits of its weights' sha256 (recorded in its config.json
    when it was saved; computed for models saved before versions were recorded)."""
    config = read_model_config(directory)
    version = config.get("version")
    if isinstance(version, str) and version:
        return version
    weights = Path(directory) / WEIGHTS
    if not weights.is_file():
        raise ChatforgeError(f"{directory}: {WEIGHTS} is missing: not a chatforge model directory")
    return sha256_file(weights)[:VERSION_CHARS]


def read_model_config(directory: Path) -> dict[str, Any]:
    """The checked ``config.json`` of a model directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ChatforgeError(f"no model at {directory}: directory not found")
    path = directory / CONFIG
    if not path.is_file():
        raise ChatforgeError(f"{directory} is not a chatforge model directory: {CONFIG} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatforgeError(f"{path}: unreadable model config: {e}") from e
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT:
        raise ChatforgeError(f"{path}: not a chatforge model config (missing \"format\": \"{MODEL_FORMAT}\")")
    if config.get("format_version") != MODEL_FORMAT_VERSION:
        raise ChatforgeError(f"{path}: format_version {config.get('format_version')!r} is not supported "
                             f"(this chatforge reads version {MODEL_FORMAT_VERSION})")
    if "model" not in config:
        raise ChatforgeError(f"{path}: the \"model\" field (the GPT's shape) is missing")
    return config


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, with a clear error for a missing or corrupt one."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ChatforgeError(f"{path}: weights file is missing")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers and truncation
        raise ChatforgeError(f"{path}: cannot read weights (corrupt or truncated safetensors file): {e}") from e


def load_model_weights(model: nn.Module, directory: Path) -> None:
    """Load ``directory``'s weights into ``model``, naming missing/unexpected/mis-shaped tensors."""
    path = Path(directory) / WEIGHTS
    state = load_weights_file(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {'; '.join(shapes[:5])}")
        raise ChatforgeError(f"{path}: weights do not fit this model ({'; '.join(parts)}); "
                             "was it saved from a different model config?")
    model.load_state_dict(state, strict=True)


def load_tokenizer_of(directory: Path) -> Any:
    from chatforge.tokenizer import load_tokenizer

    tok_dir = Path(directory) / TOKENIZER_DIR
    if not tok_dir.is_dir():
        raise ChatforgeError(f"{directory}: the tokenizer is missing (expected {tok_dir}); a model can only be "
                             "used with the tokenizer it was trained with")
    return load_tokenizer(tok_dir)


def load_model(directory: Path, device: torch.device | str = "cpu") -> tuple[GPT, Any, dict[str, Any]]:
    """Load a GPT model directory (or checkpoint): ``(model in eval mode, tokenizer, config.json)``."""
    directory = Path(directory)
    config = read_model_config(directory)
    if config.get("architecture", "gpt") != "gpt":
        raise ChatforgeError(f"{directory}: architecture {config.get('architecture')!r} is not a plain GPT "
                             "language model; load it with the stage that wrote it")
    gpt_config = GPTConfig.from_dict(config["model"], source=str(directory / CONFIG))
    tokenizer = load_tokenizer_of(directory)
    if tokenizer.vocab_size > gpt_config.vocab_size:  # a model may pad its vocabulary, never lack ids
        raise ChatforgeError(f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocab_size is {gpt_config.vocab_size}: they do not belong together")
    model = GPT(gpt_config)
    load_model_weights(model, directory)
    return model.to(device).eval(), tokenizer, config


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / CONFIG).is_file() and (p / TRAINER_STATE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1][1] if dirs else None


def checkpoint_path(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, and leftovers of interrupted writes."""
    for _, path in checkpoint_dirs(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for p in Path(root).glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def check_same_model(saved: dict[str, Any], current: GPTConfig, where: Path) -> None:
    """Resuming needs the very model the checkpoint holds: name every field that differs."""
    now = current.to_dict()
    # a field newer than the checkpoint (e.g. the interop shape options) had its default when it was saved
    defaults = {f: GPTConfig.__dataclass_fields__[f].default for f in now}
    diffs = [f"model.{k}: checkpoint {saved.get(k, defaults[k])!r}, config {now[k]!r}"
             for k in now if saved.get(k, defaults[k]) != now[k]]
    if diffs:
        raise ConfigError(f"{where} was trained with a different model config ({'; '.join(diffs)}); "
                          "resume with the config it was trained with, or start a new run without --resume")
