"""Data flows down the floors only: stages never import the pipeline or the CLI, the model never
imports training or serving, and the stage declarations match the config sections."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from chatforge.config import RunConfig, TrainConfig
from chatforge.stages import TRAINING_STAGES

PACKAGE = Path(__file__).resolve().parents[1] / "chatforge"


def imports_of(path: Path) -> set[str]:
    """Every chatforge module ``path`` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("chatforge"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chatforge"):
            out.add(node.module)
    return out


def modules_under(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", ["train", "finetune", "model", "chat", "data", "eval", "tokenizer", "serve",
                                    "store"])
def test_lower_floors_never_import_the_pipeline_or_the_cli(folder):
    for path in modules_under(folder):
        bad = {m for m in imports_of(path) if m in ("chatforge.pipeline", "chatforge.cli")}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {', '.join(sorted(bad))}"


def test_the_model_never_imports_training_or_serving():
    for path in modules_under("model"):
        bad = {m for m in imports_of(path) if m.split(".")[1] in ("train", "finetune", "serve", "store", "stages")}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {', '.join(sorted(bad))}"


def test_stage_modules_never_import_the_pipeline():
    for decl in TRAINING_STAGES:
        module = decl.build.partition(":")[0]
        path = PACKAGE.parent / (module.replace(".", "/") + ".py")
        assert "chatforge.pipeline" not in imports_of(path), decl.name


def test_every_declared_stage_has_its_config_section_and_back():
    sections = {f.name for f in dataclasses.fields(RunConfig) if isinstance(getattr(RunConfig(), f.name), TrainConfig)}
    declared = [d.name for d in TRAINING_STAGES]
    assert len(declared) == len(set(declared))
    assert set(declared) == sections
    for decl in TRAINING_STAGES:
        module, _, function = decl.build.partition(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function)), decl.build
        assert decl.parent is None or decl.parent in declared
