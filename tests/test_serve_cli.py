"""``chatforge serve`` arguments: which run's model and database (``--name``/``--runs-dir``), model
ids for a stage's newest and older versions, secrets from files and the environment (with a
warning for the command-line forms), host names and trusted proxies."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import pytest
from serve_fixtures import save_tiny_model

from chatforge.errors import ChatforgeError
from chatforge.serve.app import model_id_for, uvicorn_options
from chatforge.serve.cli import add_serve_parser, default_model, run_dir_of, settings_from_args


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def make_model(path: Path, task: str | None, mtime: float) -> Path:
    """A tiny saved model at ``path`` whose config.json says ``task``, last written at ``mtime``."""
    save_tiny_model(path)
    if task is not None:
        import json

        config = path / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "task": task}))
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/default (an SFT chat model), runs/other (pretrain, an older and a newer chat stage, a newer
    classifier, an older SFT version), runs/base (only a pre-trained model), runs/empty (nothing)."""
    runs = tmp_path_factory.mktemp("cli") / "runs"
    for name in ("default", "other", "base", "empty"):
        (runs / name).mkdir(parents=True)
        (runs / name / "manifest.json").write_text("{}")
    make_model(runs / "default" / "finetune" / "sft" / "model", "chat", 1000)
    make_model(runs / "other" / "pretrain" / "model", None, 1000)
    make_model(runs / "other" / "finetune" / "translate" / "model", "generate", 4000)
    make_model(runs / "other" / "finetune" / "sft" / "model", "chat", 3000)
    make_model(runs / "other" / "finetune" / "dpo" / "model", "chat", 2000)
    make_model(runs / "other" / "finetune" / "sentiment" / "model", "classify", 5000)
    make_model(runs / "other" / "finetune" / "sft" / "versions" / "0123456789ab", "chat", 6000)
    make_model(runs / "base" / "pretrain" / "model", None, 1000)
    return runs


def test_name_picks_the_runs_newest_chat_model_and_its_database(runs, monkeypatch):
    monkeypatch.delenv("CHATFORGE_API_KEY", raising=False)
    s = settings_from_args(parse("--name", "other", "--runs-dir", str(runs)))
    # the newest *chat* model among the stages' model/ dirs: not the newer classifier or translator,
    # and not an older version kept under versions/ (even one written later)
    assert s.models == [(None, runs / "other" / "finetune" / "sft" / "model")]
    assert s.db_url == f"sqlite:///{runs / 'other' / 'feedback.db'}"
    s = settings_from_args(parse("--name", "base", "--runs-dir", str(runs), "--no-db"))
    assert s.models == [(None, runs / "base" / "pretrain" / "model")] and s.db_url is None  # no chat model
    monkeypatch.chdir(runs.parent)  # the defaults: runs/default
    s = settings_from_args(parse())
    assert s.models == [(None, Path("runs") / "default" / "finetune" / "sft" / "model")]
    assert s.db_url == f"sqlite:///{Path('runs') / 'default' / 'feedback.db'}"


def test_name_with_a_model_still_uses_the_named_runs_database(runs):
    model = runs / "default" / "finetune" / "sft" / "model"
    s = settings_from_args(parse(str(model), "--name", "other", "--runs-dir", str(runs)))
    assert s.models == [(None, model)] and s.db_url == f"sqlite:///{runs / 'other' / 'feedback.db'}"
    s = settings_from_args(parse(str(runs / "other" / "pretrain" / "model")))  # no --name: the model's run
    assert s.db_url == f"sqlite:///{(runs / 'other').resolve() / 'feedback.db'}"


def test_a_run_without_a_model_is_named_in_the_error(runs):
    with pytest.raises(ChatforgeError, match=r"run 'empty' \(.*empty\) has no chat model.*--name empty"):
        settings_from_args(parse("--name", "empty", "--runs-dir", str(runs)))
    with pytest.raises(ChatforgeError, match=r"run 'nope' \(.*nope\) does not exist"):
        settings_from_args(parse("--name", "nope", "--runs-dir", str(runs)))
    with pytest.raises(ChatforgeError, match="run 'nope'.*does not exist.*--db URL or --no-db"):
        settings_from_args(parse(str(runs / "base" / "pretrain" / "model"), "--name", "nope", "--runs-dir", str(runs)))
    with pytest.raises(ChatforgeError, match="no model to serve"):
        default_model(runs / "empty")


def test_model_ids_for_newest_and_older_versions(runs, tmp_path):
    other = runs / "other"
    assert model_id_for(other / "finetune" / "sft" / "model") == "other-sft"
    assert model_id_for(other / "pretrain" / "model") == "other-pretrain"
    assert model_id_for(other / "finetune" / "sft" / "versions" / "0123456789ab") == "other-sft@0123456789ab"
    assert run_dir_of(other / "finetune" / "sft" / "versions" / "0123456789ab") == other.resolve()
    loose = make_model(tmp_path / "my-model", "chat", 1000)  # outside any run: its directory name
    assert model_id_for(loose) == "my-model" and run_dir_of(loose) is None


def test_secrets_from_a_file_and_the_environment_and_warnings_for_the_command_line(runs, tmp_path, monkeypatch,
                                                                                 capsys):
    model = str(runs / "default" / "finetune" / "sft" / "model")
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nsk-one\n\n  sk-two  \n")
    keys.chmod(0o600)
    monkeypatch.setenv("CHATFORGE_API_KEY", "sk-env")
    monkeypatch.setenv("CHATFORGE_ADMIN_PASSWORD", "from-env")
    s = settings_from_args(parse(model, "--no-db", "--api-key-file", str(keys)))
    assert s.api_keys == ("sk-one", "sk-two", "sk-env") and s.admin_password == "from-env"
    assert capsys.readouterr().err == ""  # nothing on the command line: no warning
    s = settings_from_args(parse(model, "--no-db", "--api-key", "sk-cli", "--admin-password", "pw-cli"))
    assert s.api_keys == ("sk-cli", "sk-env") and s.admin_password == "pw-cli"
    err = capsys.readouterr().err
    assert "--api-key puts the key on the command line" in err and "`ps`" in err and "--api-key-file" in err
    assert "--admin-password puts the password on the command line" in err and "CHATFORGE_ADMIN_PASSWORD" in err
    keys.chmod(0o644)
    settings_from_args(parse(model, "--no-db", "--api-key-file", str(keys)))
    assert "readable by other users" in capsys.readouterr().err
    assert stat.S_IMODE(keys.stat().st_mode) == 0o644  # told, not changed
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ChatforgeError, match="holds no key"):
        settings_from_args(parse(model, "--no-db", "--api-key-file", str(empty)))
    with pytest.raises(ChatforgeError, match="cannot read it"):
        settings_from_args(parse(model, "--no-db", "--api-key-file", str(tmp_path / "missing.txt")))


def test_hosts_proxies_and_limits_flags(runs):
    model = str(runs / "default" / "finetune" / "sft" / "model")
    s = settings_from_args(parse(model, "--no-db"))
    assert s.allowed_hosts == () and s.forwarded_allow_ips == () and s.docs is False
    assert uvicorn_options(s)["proxy_headers"] is False  # no X-Forwarded-For is believed by default
    s = settings_from_args(parse(model, "--no-db", "--host", "chat.lan", "--allowed-hosts", "a.example,b.example",
                                 "--allowed-hosts", "*.team.example", "--forwarded-allow-ips", "10.0.0.1",
                                 "--docs", "--rate-limit-tokens", "5000", "--max-prompts", "4"))
    assert s.allowed_hosts == ("a.example", "b.example", "*.team.example", "chat.lan")
    assert uvicorn_options(s) == {"proxy_headers": True, "forwarded_allow_ips": ["10.0.0.1"], "server_header": False}
    assert s.docs and s.rate_limit_tokens_per_minute == 5000 and s.max_prompts_per_request == 4
    with pytest.raises(ChatforgeError, match="--max-prompts must be >= 1"):
        settings_from_args(parse(model, "--no-db", "--max-prompts", "0"))


def test_compile_flag_reaches_the_engines(runs):
    model = str(runs / "default" / "finetune" / "sft" / "model")
    assert settings_from_args(parse(model, "--no-db")).compile is False
    s = settings_from_args(parse(model, "--no-db", "--compile"))
    assert s.compile is True
    from chatforge.serve.app import load_models

    (served,) = load_models(s).values()
    assert served.engine.compile is True and served.engine.running is False  # compiles at start, not at load
