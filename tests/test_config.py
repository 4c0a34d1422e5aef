"""Config system: presets, TOML files, --set overrides and validation errors."""

import pytest

from chatforge.config import PRESETS, load_config, to_toml
from chatforge.errors import ConfigError


def test_defaults_are_the_tiny_preset():
    cfg = load_config()
    assert cfg.preset == "tiny"
    assert cfg.tokenizer.vocab_size == PRESETS["tiny"]["tokenizer.vocab_size"]


def test_preset_then_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "small"\nname = "exp1"\n[clean]\nmin_words = 3\nnear_dedup = false\n')
    cfg = load_config(path, overrides=["clean.min_words=4", "collect.sources=a.txt,b/"])
    assert cfg.preset == "small" and cfg.name == "exp1"
    assert cfg.supportworld.corpus_mb == PRESETS["small"]["supportworld.corpus_mb"]
    assert cfg.clean.min_words == 4  # --set wins over the file
    assert cfg.clean.near_dedup is False
    assert cfg.collect.sources == ["a.txt", "b/"]


def test_toml_round_trip(tmp_path):
    cfg = load_config(overrides=["clean.minhash_threshold=0.7", "collect.sources=['x.jsonl']"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("clean.min_wrds=3", "unknown config key 'clean.min_wrds' (did you mean 'clean.min_words'?)"),
        ("nonsense=1", "keys allowed at top level: name, runs_dir, preset"),
        ("tokenizer.kind=wordpiece", "tokenizer.kind: 'wordpiece' is not allowed; allowed: bpe, byte, char"),
        ("clean.min_words=abc", "clean.min_words must be an integer, got 'abc'"),
        ("clean.exact_dedup=maybe", "clean.exact_dedup must be true or false"),
        ("clean.minhash_threshold=1.5", "clean.minhash_threshold: must be in (0, 1)"),
        ("shard.val_fraction=0", "shard.val_fraction: 0.0 must be in (0, 0.5)"),
        ("preset=huge", "preset: unknown preset 'huge'; allowed: tiny, small, gpt2-124m, d20"),
        ("clean=3", "'clean' is a section"),
        ("clean.min_words", "expected KEY=VALUE"),
        ("tokenizer.vocab_size=100", "tokenizer.vocab_size: 100 must be at least 300"),
        ("collect.max_doc_chars=-1", "collect.max_doc_chars: must be >= 0 (0 = one document per file)"),
    ],
)
def test_validation_errors_name_the_field(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert expected in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[clean]\nmin_wordz = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown config key 'clean\.min_wordz'"):
        load_config(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[clean\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: invalid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
