"""Hugging Face model folders in and out: ``chatforge export --hf`` and ``chatforge import --hf``.

Export writes what ``transformers`` (and the tools that read its folders: vLLM,
llama.cpp's ``convert_hf_to_gguf.py``) expect: ``config.json`` +
``model.safetensors`` (``hf.to_hf``), the tokenizer as ``tokenizer.json`` with
``tokenizer_config.json`` (bos ``<|bos|>``, eos = the end-of-turn ``<|end|>``, pad
``<|pad|>``), chatforge's chat template as Jinja, and ``generation_config.json``
whose ``eos_token_id`` is the end-of-turn token, so ``generate()`` stops where
chatforge does.

The chat template renders exactly ``chat.template.render``: ``<|bos|>`` then per
message ``<|role|>`` content ``<|end|>``, and ``<|assistant|>`` for the generation
prompt. The ids agree because the tokenizer cuts the rendered string at special
tokens and encodes each piece alone, as ``render`` encodes each content alone. One
difference is inherent to string templates: content that contains a special
token's text (a user typing ``<|assistant|>``) becomes that special token in HF,
while chatforge keeps it as plain text.

Import reads a local GPT-2 / Llama / Qwen2 folder, maps its weights
(``hf_arch``), keeps its tokenizer (``tokenizer.hf.ImportedTokenizer``: chatforge's
special tokens appended after its ids; the embedding grows by those rows where
the checkpoint has no spare rows) and saves a chatforge model directory, which
every stage takes as its parent (``--init-from DIR``) and ``chat``/``serve`` load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from chatforge.errors import ChatforgeError
from chatforge.interop import hf_arch
from chatforge.interop.hf import _transformers, hf_config, to_hf
from chatforge.model.gpt import GPT
from chatforge.tokenizer.base import Tokenizer

# chatforge.chat.template.render as Jinja (the roles and rules of validate_messages).
CHAT_TEMPLATE = (
    "{{- '<|bos|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool_call', 'tool_result'] -%}"
    "{{- raise_exception('unknown role ' + message['role'] + '; chatforge roles are system, user, assistant, "
    "tool_call, tool_result') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' and not loop.first -%}"
    "{{- raise_exception('a system message may only be the first message') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ChatforgeError(f"{out} exists and is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ChatforgeError(f"{out} already exists and is not empty; give a new or empty directory, "
                             "or --force to replace it")


# --------------------------------------------------------------------------- export


def hf_tokenizer_of(tok: Tokenizer) -> Any:
    """A ``tokenizers.Tokenizer`` that encodes like ``tok`` and holds its special tokens as added tokens."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if tok.kind in ("bpe", "hf"):
        return HFTokenizer.from_str(tok.hf_tokenizer.to_str())  # a copy: the caller may change it
    if tok.kind == "byte":
        from chatforge.tokenizer.bpe import _bytes_to_unicode

        # One token per byte: a BPE with the 256 ByteLevel characters and no merges.
        table = _bytes_to_unicode()
        hf = HFTokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in tok.special_tokens])
        return hf
    raise ChatforgeError(f"a {tok.kind!r} tokenizer has no Hugging Face tokenizer.json equivalent; export needs a "
                         "bpe, byte or imported (hf) tokenizer (train with tokenizer.kind=bpe)")


def export_hf(model_dir: Path, out: Path, force: bool = False) -> dict[str, Any]:
    """Write ``model_dir``'s model as a Hugging Face folder at ``out`` (atomically: a temp dir, renamed)."""
    from chatforge.train.checkpoint import atomic_dir, load_model

    tf = _transformers()
    out = Path(out)
    _check_target(out, force)
    model, tok, meta = load_model(Path(model_dir), "cpu")
    hf_config(model.config)  # the reason a model cannot export (key_smear, ...) before anything is written
    backend = hf_tokenizer_of(tok)
    hf = to_hf(model, bos_token_id=tok.bos_id, eos_token_id=tok.end_id, pad_token_id=tok.pad_id)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|end|>",
                                      pad_token="<|pad|>", model_max_length=model.config.block_size)
    fast.chat_template = CHAT_TEMPLATE
    with atomic_dir(out) as tmp:
        hf.save_pretrained(tmp)
        tf.GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.end_id,
                            pad_token_id=tok.pad_id).save_pretrained(tmp)
        fast.save_pretrained(tmp)
        # Recent transformers write the template to chat_template.jinja; older readers (and vLLM,
        # llama.cpp's converter) look in tokenizer_config.json, so it is written there too.
        tc_path = tmp / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text(encoding="utf-8"))
        tc["chat_template"] = CHAT_TEMPLATE
        # transformers 5 names its own class (TokenizersBackend); the classic name loads in 4.x and 5.x.
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"dir": str(out), "architecture": type(hf).__name__, "vocab_size": model.config.vocab_size,
            "eos_token_id": tok.end_id, "version": meta.get("version")}


# --------------------------------------------------------------------------- import


def _backend_tokenizer(src: Path) -> Any:
    from tokenizers import Tokenizer as HFTokenizer

    if (src / "tokenizer.json").is_file():
        return HFTokenizer.from_file(str(src / "tokenizer.json"))
    try:  # e.g. GPT-2's vocab.json + merges.txt: transformers converts them to a fast tokenizer
        fast = _transformers().AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception as e:  # transformers raises many types for a folder without a usable tokenizer
        raise ChatforgeError(f"{src}: no tokenizer.json and no tokenizer transformers can load ({e}); "
                             "a model is only usable with the tokenizer it was trained with") from e
    backend = getattr(fast, "backend_tokenizer", None)
    if backend is None:
        raise ChatforgeError(f"{src}: the tokenizer is not a fast (tokenizers-library) tokenizer; "
                             "chatforge imports tokenizer.json tokenizers only")
    return backend


def _grow_rows(w: torch.Tensor, n: int) -> torch.Tensor:
    """``w`` with rows appended up to ``n``: each new row is the mean row, so a new special token
    starts as an average token (a moderate logit) rather than noise or a dominating zero-logit row."""
    extra = w.mean(dim=0, keepdim=True).expand(n - w.shape[0], -1)
    return torch.cat([w, extra], dim=0).contiguous()


def import_hf(src: Path, out: Path, force: bool = False, block_size: int | None = None) -> dict[str, Any]:
    """Turn a local Hugging Face GPT-2 / Llama / Qwen2 folder into a chatforge model directory at ``out``."""
    import dataclasses

    from chatforge.tokenizer.hf import ImportedTokenizer
    from chatforge.train.checkpoint import save_model

    tf = _transformers()
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise ChatforgeError(f"{src}: not a Hugging Face model folder (config.json is missing)")
    _check_target(out, force)
    hf_cfg = tf.AutoConfig.from_pretrained(str(src), local_files_only=True)
    cfg, fam = hf_arch.gpt_config_from_hf(hf_cfg, block_size)
    tok = ImportedTokenizer(_backend_tokenizer(src), source={"path": str(src.resolve()), "family": fam})
    n_base = tok.vocab_size - len(tok.special_tokens)
    if n_base > cfg.vocab_size:
        raise ChatforgeError(f"{src}: the tokenizer has {n_base} tokens but the model only {cfg.vocab_size} "
                             "embedding rows: they do not belong together")
    hf_model = tf.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, local_files_only=True).eval()
    if type(hf_model).__name__ != hf_arch.HF_CLASS[fam]:
        raise ChatforgeError(f"{src}: loaded as {type(hf_model).__name__}, expected {hf_arch.HF_CLASS[fam]}")
    sd = hf_arch.state_dict_from_hf(fam, cfg, hf_model.state_dict())
    vocab = max(cfg.vocab_size, tok.vocab_size)  # chatforge's special tokens need ids the model has
    if vocab > cfg.vocab_size:
        for key in ("wte.weight", "lm_head.weight"):
            if key in sd:
                sd[key] = _grow_rows(sd[key], vocab)
    hf_vocab = cfg.vocab_size
    cfg = dataclasses.replace(cfg, vocab_size=vocab)
    model = GPT(cfg)
    model.load_state_dict(sd, strict=True)
    model.eval()
    diff = _self_check(model, hf_model, hf_vocab, n_base)
    meta = {"stage": "import", "task": "lm", "parent": None,
            "source": {"path": str(src.resolve()), "architecture": type(hf_model).__name__, "family": fam,
                       "transformers_version": tf.__version__, "max_abs_logit_diff": diff}}
    save_model(out, model, tok, meta)
    return {"dir": str(out), "family": fam, "architecture": type(hf_model).__name__, "vocab_size": vocab,
            "added_special_tokens": len(tok.special_tokens), "block_size": cfg.block_size,
            "params": model.num_params(), "max_abs_logit_diff": diff}


@torch.no_grad()
def _self_check(model: GPT, hf_model: Any, hf_vocab: int, n_base: int) -> float:
    """Both models on one short sequence: the largest logit difference (an error when it is not rounding)."""
    T = min(16, model.config.block_size)
    idx = (torch.arange(T) * 7919 % max(1, min(n_base, hf_vocab)))[None]
    ours = model(idx)[0][..., :hf_vocab]
    theirs = hf_model(input_ids=idx).logits.float()
    diff = float((ours - theirs).abs().max())
    scale = float(theirs.abs().max())
    if not diff <= 1e-3 * max(1.0, scale):
        raise ChatforgeError(f"imported model's logits differ from the original's by up to {diff:.3g} "
                             f"(logits up to {scale:.3g}): the conversion is wrong for this checkpoint; please report")
    return diff
