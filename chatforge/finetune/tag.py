"""Token classification (BIO tagging, e.g. product attributes or named entities) on the pre-trained GPT.

Each word is encoded on its own (with the space that precedes it in the sentence),
and the word's tag is learned on its first token; the other tokens of the word
are ignored by the loss, as in Hugging Face's token-classification recipe. The GPT
is causal, so a word's tag is predicted from the words before it and the word
itself (not the words after it): right context helps taggers, and a bidirectional
encoder would score higher; this keeps one backbone for every task.

Reports entity-level precision/recall/F1 (conlleval semantics) on the test split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chatforge.config import TagConfig
from chatforge.data.records import field_of, iter_records
from chatforge.errors import DataError
from chatforge.eval.metrics import bio_entities, entity_f1
from chatforge.finetune.common import ShuffledBatches
from chatforge.model.gpt import GPT
from chatforge.train.loop import LossOutput, TrainResult
from chatforge.train.stage import StageContext, StageParts, StageTest


class TokenTagger(nn.Module):
    """A GPT backbone and a linear layer giving tag logits at every position (B, T, n_tags)."""

    def __init__(self, backbone: GPT, n_tags: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.n_embd, n_tags)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone.forward_hidden(idx, padding_mask=attention_mask)).float()


@dataclass
class Tagged:
    where: str
    ids: list[int]
    targets: list[int]  # tag index on each word's first token, -1 elsewhere
    n_words: int  # words kept (after truncation)


def read_tagged(source: str, tokens_field: str, tags_field: str) -> list[tuple[str, list[str], list[str]]]:
    rows = []
    for where, rec in iter_records(source):
        words, tags = field_of(rec, tokens_field, where, list), field_of(rec, tags_field, where, list)
        if len(words) != len(tags):
            raise DataError(f"{where}: {len(words)} tokens but {len(tags)} tags; each token needs one tag")
        if not all(isinstance(w, str) for w in words) or not all(isinstance(t, str) for t in tags):
            raise DataError(f"{where}: fields {tokens_field!r} and {tags_field!r} must be lists of strings")
        bio_entities(tags, where=f"{where}: {tags_field}")  # validates B-/I-/O syntax
        rows.append((where, words, tags))
    if not rows:
        raise DataError(f"{source}: no examples")
    return rows


def encode_tagged(rows: list[tuple[str, list[str], list[str]]], tok: Any, tag_index: dict[str, int], max_len: int,
                  warn: bool = True) -> tuple[list[Tagged], int]:
    """Token ids and per-token targets; ``warn``: print the truncation count (off on DDP ranks other than 0)."""
    out, truncated = [], 0
    for where, words, tags in rows:
        ids, targets, kept = [tok.bos_id], [-1], 0
        for k, (word, tag) in enumerate(zip(words, tags)):
            if tag not in tag_index:
                raise DataError(f"{where}: tag {tag!r} does not occur in the training data "
                                f"(training tags: {', '.join(tag_index)})")
            pieces = tok.encode(word if k == 0 else " " + word)
            if len(ids) + len(pieces) > max_len:
                truncated += 1
                break
            targets.extend([tag_index[tag]] + [-1] * (len(pieces) - 1))
            ids.extend(pieces)
            kept += 1
        out.append(Tagged(where, ids, targets, kept))
    if truncated and warn:
        print(f"warning: {truncated} of {len(rows)} sentences were longer than {max_len} tokens and were truncated")
    return out, truncated


def collate(examples: list[Tagged], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    T = max(len(e.ids) for e in examples)
    idx = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), -1, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.bool)
    for i, e in enumerate(examples):
        idx[i, :len(e.ids)] = torch.tensor(e.ids)
        targets[i, :len(e.ids)] = torch.tensor(e.targets)
        mask[i, :len(e.ids)] = True
    return {"idx": idx.to(device), "targets": targets.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def predict_tags(model: TokenTagger, data: list[Tagged], tags: list[str], pad_id: int, device: torch.device,
                 batch_size: int = 64) -> list[list[str]]:
    """Predicted tag of each word (read at its first token)."""
    out = []
    for i in range(0, len(data), batch_size):
        chunk = data[i:i + batch_size]
        b = collate(chunk, pad_id, device)
        pred = model(b["idx"], b["attention_mask"]).argmax(-1)
        for row, e in enumerate(chunk):
            first = [t for t, target in enumerate(e.targets) if target != -1]
            out.append([tags[int(pred[row, t])] for t in first])
    return out


def gold_tags(data: list[Tagged], tags: list[str]) -> list[list[str]]:
    return [[tags[t] for t in e.targets if t != -1] for e in data]


def build(ctx: StageContext) -> StageParts:
    """A BIO tagger (a linear layer on every position) on the parent GPT."""
    f: TagConfig = ctx.section
    backbone, tok, device, sources = ctx.backbone, ctx.tokenizer, ctx.device, ctx.sources
    max_len = min(f.max_len or backbone.config.block_size, backbone.config.block_size)
    rows = {s: read_tagged(src, f.tokens_field, f.tags_field) for s, src in sources.items()}
    tags = sorted({t for _, _, ts in rows["train"] for t in ts}, key=lambda t: (t != "O", t))
    tag_index = {t: i for i, t in enumerate(tags)}
    sets, truncated = {}, {}
    for s, r in rows.items():
        sets[s], truncated[s] = encode_tagged(r, tok, tag_index, max_len, warn=ctx.is_main)
    model = TokenTagger(backbone, len(tags)).to(device)

    def loss(m: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        logits = m(batch["idx"], batch["attention_mask"])
        targets = batch["targets"].reshape(-1)
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets, ignore_index=-1, reduction="sum")
        return LossOutput(ce, (targets != -1).sum(), tokens=int(batch["attention_mask"].sum()))

    def evaluate(m: nn.Module) -> dict[str, float]:
        r = entity_f1(gold_tags(sets["val"], tags), predict_tags(m, sets["val"], tags, tok.pad_id, device))
        return {"val_entity_f1": r["f1"], "val_token_accuracy": r["token_accuracy"]}

    def test(m: nn.Module, result: TrainResult) -> StageTest:
        report = entity_f1(gold_tags(sets["test"], tags), predict_tags(m, sets["test"], tags, tok.pad_id, device))
        metrics = {"test_entity_f1": report["f1"], "test_entity_precision": report["precision"],
                   "test_entity_recall": report["recall"], "test_token_accuracy": report["token_accuracy"]}
        return StageTest(metrics=metrics, primary="test_entity_f1", details={"per_type": report["per_type"],
                                                                             "tags": tags})

    examples = sets["train"]
    avg = sum(len(e.ids) for e in examples) / len(examples)
    tagged = sum(sum(t != -1 for t in e.targets) for e in examples) / len(examples)
    return StageParts(
        model=model,
        batches=ShuffledBatches(examples, f.batch_size, f.seed, lambda ex: collate(ex, tok.pad_id, device), ctx.dist),
        loss=loss, tokens_per_micro_batch=max(1, round(avg * f.batch_size)), evaluate=evaluate, test=test,
        meta={"tags": tags}, keep_trainable=("head",), units_per_batch=tagged * f.batch_size,
        info={"truncated": truncated},
    )
