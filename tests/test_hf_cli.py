"""Hugging Face folders in and out: `chatforge export --hf` / `chatforge import --hf`.

Every model and tokenizer here is tiny, random and built locally (seeded); nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from chatforge.chat.template import render
from chatforge.cli import main
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.interop import import_hf
from chatforge.model import GPT, GPTConfig, generate
from chatforge.serve.engine import Engine, SamplingParams
from chatforge.tokenizer import ByteTokenizer, load_tokenizer
from chatforge.tokenizer.bpe import train_bpe
from chatforge.train.checkpoint import load_model, save_model

transformers = pytest.importorskip("transformers", reason="transformers not installed (optional: the bench extra)")


TEXTS = ["Hello world, this is a tiny corpus for a tiny tokenizer.", "Order 12345 shipped on Monday.",
         "¿Qué tal? naïve café, 42 items", "The customer asked about order 998."] * 10
MESSAGES = [
    {"role": "system", "content": "You are a support agent. Be brief."},
    {"role": "user", "content": "Hello! Where is order 12345?"},
    {"role": "assistant", "content": "It shipped on Monday, café included."},
    {"role": "user", "content": "¿Qué tal?\nThanks"},
]


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Random weights everywhere (real inits zero some matrices, which would hide mapping mistakes)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)


def chatforge_model(tmp_path: Path, tok, name: str = "m", **kw) -> Path:
    cfg = dict(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_embd=32, n_head=4)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg))
    randomize(model)
    return save_model(tmp_path / name, model, tok, {"stage": "sft", "task": "chat"})


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TEXTS, 400, 1, 0, 3)


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("shape", ["nanochat", "arcee-byte"])
def test_export_loads_with_auto_classes_and_matches(tmp_path, bpe, shape) -> None:
    tok = bpe if shape == "nanochat" else ByteTokenizer()
    kw = {} if shape == "nanochat" else dict(qk_norm=False, n_kv_head=2)
    src = chatforge_model(tmp_path, tok, **kw)
    out = tmp_path / "hf"
    assert main(["export", "--hf", str(src), str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # the temp dir was renamed

    model, _, _ = load_model(src)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(input_ids=idx).logits
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.end_id and gen["bos_token_id"] == tok.bos_id and gen["pad_token_id"] == tok.pad_id
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())

    ht = transformers.AutoTokenizer.from_pretrained(out)
    assert (ht.bos_token_id, ht.eos_token_id, ht.pad_token_id) == (tok.bos_id, tok.end_id, tok.pad_id)
    for msgs in (MESSAGES, MESSAGES[1:], MESSAGES[:3]):
        want = render(msgs, tok, add_generation_prompt=True).ids
        text = ht.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ht(text, add_special_tokens=False)["input_ids"] == want
        got = ht.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        got = got["input_ids"] if not isinstance(got, list) else got
        assert got == want
        plain = ht.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        assert ht(plain, add_special_tokens=False)["input_ids"] == render(msgs, tok).ids
    for text in TEXTS[:4]:
        assert ht(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_export_refuses_smeared_keys_with_the_fix(tmp_path, bpe, capsys) -> None:
    src = chatforge_model(tmp_path, bpe, key_smear=True)
    assert main(["export", "--hf", str(src), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "key_smear" in err and "model.key_smear=false" in err
    assert not (tmp_path / "hf").exists()


def test_export_refuses_a_non_empty_dir_unless_forced(tmp_path, bpe, capsys) -> None:
    src = chatforge_model(tmp_path, bpe)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", "--hf", str(src), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "notes.txt").is_file()
    assert main(["export", "--hf", str(src), str(out), "--force"]) == 0
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()


def test_variant_fields_are_validated() -> None:
    with pytest.raises(ConfigError, match="GPTConfig.norm"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_embd=8, n_head=2, norm="batch")
    with pytest.raises(ConfigError, match="GPTConfig.mlp_act"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_embd=8, n_head=2, mlp_act=1)


# --------------------------------------------------------------------------- import


def hf_tokenizer(family: str) -> Tokenizer:
    """A small byte-level BPE in the style of the family's own tokenizer."""
    tok = Tokenizer(models.BPE())
    if family == "qwen2":  # NFC + a split regex + ByteLevel without its own regex, as Qwen2 ships it
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens({"gpt2": ["<|endoftext|>"], "llama": ["<|begin_of_text|>", "<|end_of_text|>"],
                            "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}[family])
    return tok


def hf_folder(tmp_path: Path, family: str) -> tuple[Path, int]:
    tok = hf_tokenizer(family)
    V = tok.get_vocab_size()
    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=V, n_positions=48, n_embd=32, n_layer=2, n_head=4, bos_token_id=V - 1, eos_token_id=V - 1))
    elif family == "llama":  # untied, GQA, an intermediate size that is not a round ratio
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=48, rms_norm_eps=1e-6, tie_word_embeddings=False))
    else:  # tied, q/k/v biases, a padded vocabulary with room for chatforge's special tokens
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=V + 40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=48, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    randomize(model)
    src = tmp_path / f"hf-{family}"
    model.save_pretrained(src)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(src)
    return src, model.config.vocab_size


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_import_matches_logits_tokenizer_and_exports_back(tmp_path, family) -> None:
    src, hf_vocab = hf_folder(tmp_path, family)
    out = tmp_path / "cf"
    assert main(["import", "--hf", str(src), "--out", str(out)]) == 0
    model, tok, meta = load_model(out)
    assert meta["stage"] == "import" and meta["source"]["family"] == family
    assert tok.kind == "hf" and tok.vocab_size <= model.config.vocab_size
    hf = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    idx = torch.randint(0, hf_vocab, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(input_ids=idx).logits
        ours = model(idx)[0]
    assert theirs.abs().max() > 1.0
    torch.testing.assert_close(ours[..., :hf_vocab], theirs, atol=1e-4, rtol=0)

    # The tokenizer encodes as the original, decodes back, and gained chatforge's chat tokens.
    original = Tokenizer.from_file(str(src / "tokenizer.json"))
    for text in TEXTS[:4]:
        ids = tok.encode(text)
        assert ids == original.encode(text, add_special_tokens=False).ids and tok.decode(ids) == text
    assert tok.encode("<|user|>") != [tok.special_id("<|user|>")]  # look-alike text stays text
    chat = render(MESSAGES, tok, add_generation_prompt=True).ids
    assert chat[0] == tok.bos_id and chat[-1] == tok.special_id("<|assistant|>")

    # Export back: the original class again, same logits, loaded by the Auto classes.
    back = tmp_path / "back"
    assert main(["export", "--hf", str(out), str(back)]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(again).__name__ == type(hf).__name__
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=idx).logits[..., :hf_vocab], theirs, atol=1e-4, rtol=0)
    ht = transformers.AutoTokenizer.from_pretrained(back)
    got = ht.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    assert (got["input_ids"] if not isinstance(got, list) else got) == chat


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_imported_model_kv_cache_generation_and_serving_equal_full_forward(tmp_path, family) -> None:
    src, _ = hf_folder(tmp_path, family)
    out = tmp_path / "cf"
    import_hf(src, out)
    model, tok, _ = load_model(out)
    prompts = [tok.encode("Order 12345 shipped"), tok.encode("Hello"), [tok.bos_id, *tok.encode("café 42")]]
    n_new = 10
    cached = generate(model, prompts, n_new, temperature=0.0, dtype="fp32")  # left-padded batch, KV cache
    for prompt, got in zip(prompts, cached):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(n_new):  # no cache: the whole sequence each step
                ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
        assert got == ids[len(prompt):]
    # The server's continuous-batching engine (its own slotted cache: rows at different positions).
    with Engine(model, tok, max_batch=4, max_queue=8, dtype="fp32") as engine:
        handles = [engine.submit(p, SamplingParams(max_tokens=n_new, temperature=0)) for p in prompts]
        for h, ref in zip(handles, cached):
            h.wait(30)
            assert h.token_ids == ref


def test_import_refuses_sentencepiece_style_tokenizers(tmp_path) -> None:
    src, _ = hf_folder(tmp_path, "llama")
    sp = Tokenizer(models.BPE(vocab={"<unk>": 0, "▁a": 1, "<0x0A>": 2}, merges=[], byte_fallback=True,
                              unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    sp.save(str(src / "tokenizer.json"))
    with pytest.raises(ChatforgeError, match="cannot be represented"):
        import_hf(src, tmp_path / "cf")
    assert not (tmp_path / "cf").exists()


def test_import_cli_refuses_non_empty_output_and_writes_into_the_run(tmp_path, capsys) -> None:
    src, _ = hf_folder(tmp_path, "gpt2")
    runs = tmp_path / "runs"
    assert main(["import", "--hf", str(src), "--name", "r1", "--runs-dir", str(runs), "--block-size", "32"]) == 0
    target = runs / "r1" / "import" / "model"
    model, tok, _ = load_model(target)
    assert model.config.block_size == 32 and model.wpe.weight.shape[0] == 32
    assert load_tokenizer(target / "tokenizer").vocab_size == tok.vocab_size
    assert main(["import", "--hf", str(src), "--name", "r1", "--runs-dir", str(runs)]) == 2
    assert "not empty" in capsys.readouterr().err
