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

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chatforge.config import RunConfig, TagConfig
from chatforge.data.records import field_of, iter_records
from chatforge.errors import DataError
from chatforge.eval.metrics import bio_entities, entity_f1
from chatforge.finetune.common import (
    PretrainData,
    ShuffledBatches,
    WithReplay,
    adapt,
    data_sources,
    forgetting,
    load_base,
    scaled_param_groups,
    stage_dir,
    task_replay,
)
from chatforge.finetune.peft import merge_lora
from chatforge.io import write_json
from chatforge.model.gpt import GPT
from chatforge.train.checkpoint import save_model
from chatforge.train.dist import DistInfo, dist_from_env, init_distributed
from chatforge.train.loop import TrainTask, seed_everything, train
from chatforge.train.precision import resolve_device, resolve_precision


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


def finetune_tagger(cfg: RunConfig, section: str = "tagging", resume: bool = False, progress: bool = True,
                    dist: DistInfo | None = None) -> dict[str, Any]:
    """Fine-tune a BIO tagger; under ``torchrun`` data-parallel, rank 0 alone tests and writes."""
    f: TagConfig = getattr(cfg, section)
    out = stage_dir(cfg, section)
    dist = dist or dist_from_env()
    device = init_distributed(dist, resolve_device(f.device))
    precision = resolve_precision(f.dtype, device)
    seed_everything(f.seed)
    backbone, tok = load_base(cfg, device)
    max_len = min(f.max_len or backbone.config.block_size, backbone.config.block_size)
    sources = data_sources(cfg, section)
    rows = {s: read_tagged(src, f.tokens_field, f.tags_field) for s, src in sources.items()}
    tags = sorted({t for _, _, ts in rows["train"] for t in ts}, key=lambda t: (t != "O", t))
    tag_index = {t: i for i, t in enumerate(tags)}
    sets, truncated = {}, {}
    for s, r in rows.items():
        sets[s], truncated[s] = encode_tagged(r, tok, tag_index, max_len, warn=dist.is_main)

    model = TokenTagger(backbone, len(tags)).to(device)
    params = adapt(model, f, section, keep_trainable=("head",), dist=dist)
    pre = PretrainData.of(cfg)
    before = pre.heldout_loss(backbone, tok, f.forgetting_batches, precision)
    avg = sum(len(e.ids) for e in sets["train"]) / len(sets["train"])
    replay = task_replay(pre, model, backbone, f, avg * f.batch_size, dist)

    def loss(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = m(batch["idx"], batch["attention_mask"])
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["targets"].reshape(-1), ignore_index=-1)
        if "lm" in batch:
            ce = (1 - f.replay) * ce + f.replay * backbone(*batch["lm"])[1]
        return ce

    def evaluate(m: nn.Module) -> dict[str, float]:
        r = entity_f1(gold_tags(sets["val"], tags), predict_tags(m, sets["val"], tags, tok.pad_id, device))
        return {"val_entity_f1": r["f1"], "val_token_accuracy": r["token_accuracy"]}

    task = TrainTask(name=section, model=model, tokenizer=tok,
                     batches=WithReplay(ShuffledBatches(sets["train"], f.batch_size, f.seed,
                                                        lambda ex: collate(ex, tok.pad_id, device), dist),
                                        replay, device), loss=loss,
                     tokens_per_micro_batch=max(1, round(avg * f.batch_size)), evaluate=evaluate,
                     meta={"task": "tag", "tags": tags}, backbone=backbone,
                     param_groups=scaled_param_groups(model, f.weight_decay, backbone, f.backbone_lr_scale))
    t0 = time.perf_counter()
    result = train(task, f, out, precision, dist, resume=resume, section=section, progress=progress)
    wall = time.perf_counter() - t0
    if not dist.is_main:  # no barrier: rank 0's test evaluation may outlast a collective's timeout
        return {}
    model.eval()
    report = entity_f1(gold_tags(sets["test"], tags), predict_tags(model, sets["test"], tags, tok.pad_id, device))
    after = pre.heldout_loss(backbone, tok, f.forgetting_batches, precision)
    merge_lora(model)
    save_model(out / "model", model, tok, {"stage": section, "task": "tag", "tags": tags, "step": result.step})
    metrics = {
        "test_entity_f1": report["f1"], "test_entity_precision": report["precision"],
        "test_entity_recall": report["recall"], "test_token_accuracy": report["token_accuracy"],
        "per_type": report["per_type"], **result.eval, **forgetting(before, after),
        "trainable_params": params["trainable"], "total_params": params["total"], "method": params["method"],
        "steps": result.step, "wall_time_s": round(wall, 2), "truncated": truncated, "tags": tags, "data": sources,
    }
    write_json(out / "eval.json", metrics)
    return metrics
