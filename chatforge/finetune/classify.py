"""Sequence classification: a head on the pre-trained GPT (sentiment, intent, any ``{"text","label"}`` data).

Input is ``<|bos|>`` + the text's tokens, right-padded; the head reads the last
real token's hidden state (or the mean over tokens), like Hugging Face's
``GPT2ForSequenceClassification``. Labels are the ones seen in the training
data, in sorted order; a label at validation/test time that training never saw
is an error naming the file and line, since the head cannot predict it.

Writes under ``runs/<run>/finetune/<stage>/``: ``ckpt/`` (resumable), ``model/``
(LoRA merged into the weights), ``eval.json`` (test accuracy, macro-F1, confusion
matrix, the majority-class baseline, forgetting, trainable parameters, wall time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chatforge.config import ClassifyConfig, RunConfig
from chatforge.data.records import field_of, iter_records
from chatforge.errors import ChatforgeError, DataError
from chatforge.eval.metrics import classification_report, format_confusion
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
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.heads import ClassifierHead, GPTWithHead
from chatforge.train.checkpoint import load_model_weights, load_tokenizer_of, read_model_config, save_model
from chatforge.train.dist import DistInfo, dist_from_env, init_distributed
from chatforge.train.loop import TrainTask, seed_everything, train
from chatforge.train.precision import resolve_device, resolve_precision


@dataclass
class Labelled:
    where: str
    ids: list[int]
    label: int


@dataclass
class LabelledSet:
    examples: list[Labelled]
    truncated: int


def read_labelled(source: str | Path, text_field: str, label_field: str, split: str = "train"
                  ) -> list[tuple[str, str, str]]:
    """``(location, text, label)`` rows; a missing or non-string field is an error naming the row."""
    rows = []
    for where, rec in iter_records(source, split):
        text = field_of(rec, text_field, where)
        label = field_of(rec, label_field, where, (str, int))
        rows.append((where, text, str(label)))
    if not rows:
        raise DataError(f"{source}: no examples")
    return rows


def encode_labelled(rows: list[tuple[str, str, str]], tok: Any, labels: list[str], max_len: int,
                    source: str, warn: bool = True) -> LabelledSet:
    """Token ids and label indices; ``warn``: print the truncation count (off on DDP ranks other than 0)."""
    index = {lab: i for i, lab in enumerate(labels)}
    out, truncated = [], 0
    for where, text, label in rows:
        if label not in index:
            raise DataError(f"{where}: label {label!r} does not occur in the training data, so the classifier "
                            f"cannot predict it (training labels: {', '.join(labels)})")
        ids = [tok.bos_id, *tok.encode(text)]
        if len(ids) > max_len:
            ids, truncated = ids[:max_len], truncated + 1
        out.append(Labelled(where, ids, index[label]))
    if truncated and warn:
        print(f"warning: {source}: {truncated} of {len(rows)} texts were longer than {max_len} tokens and were "
              "truncated (raise max_len to keep more)")
    return LabelledSet(out, truncated)


def collate(examples: list[Labelled], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    T = max(len(e.ids) for e in examples)
    idx = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.bool)
    for i, e in enumerate(examples):
        idx[i, :len(e.ids)] = torch.tensor(e.ids)
        mask[i, :len(e.ids)] = True
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return {"idx": idx.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


@torch.no_grad()
def predict(model: GPTWithHead, data: LabelledSet, pad_id: int, device: torch.device, batch_size: int = 64
            ) -> tuple[list[int], float]:
    """Predicted label indices and the mean cross-entropy over ``data``."""
    preds, total = [], 0.0
    for i in range(0, len(data.examples), batch_size):
        b = collate(data.examples[i:i + batch_size], pad_id, device)
        logits = model(b["idx"], b["attention_mask"])
        total += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
        preds.extend(logits.argmax(-1).tolist())
    return preds, total / max(1, len(data.examples))


def finetune_classifier(cfg: RunConfig, section: str, resume: bool = False, progress: bool = True,
                        dist: DistInfo | None = None) -> dict[str, Any]:
    """Fine-tune a classifier for ``section`` (a ``ClassifyConfig`` section of the run config).

    Under ``torchrun`` each rank trains on its slice of every batch (DDP); rank 0 alone
    evaluates on the test set and writes; the other ranks return ``{}``."""
    f: ClassifyConfig = getattr(cfg, section)
    out = stage_dir(cfg, section)
    dist = dist or dist_from_env()
    device = init_distributed(dist, resolve_device(f.device))
    precision = resolve_precision(f.dtype, device)
    seed_everything(f.seed)
    backbone, tok = load_base(cfg, device)
    max_len = min(f.max_len or backbone.config.block_size, backbone.config.block_size)

    sources = data_sources(cfg, section)
    rows = {split: read_labelled(src, f.text_field, f.label_field) for split, src in sources.items()}
    labels = sorted({label for _, _, label in rows["train"]})
    if len(labels) < 2:
        raise DataError(f"{sources['train']}: only one label ({labels[0]!r}) in the training data; "
                        "a classifier needs at least two")
    sets = {split: encode_labelled(r, tok, labels, max_len, sources[split], warn=dist.is_main)
            for split, r in rows.items()}

    model = GPTWithHead(backbone, ClassifierHead(backbone.config.n_embd, len(labels), f.pooling)).to(device)
    params = adapt(model, f, section, keep_trainable=("head",), dist=dist)
    pre = PretrainData.of(cfg)
    before = pre.heldout_loss(backbone, tok, f.forgetting_batches, precision)
    avg_len = sum(len(e.ids) for e in sets["train"].examples) / len(sets["train"].examples)
    replay = task_replay(pre, model, backbone, f, avg_len * f.batch_size, dist)

    def loss(m: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        ce = F.cross_entropy(m(batch["idx"], batch["attention_mask"]), batch["labels"])
        if "lm" in batch:
            ce = (1 - f.replay) * ce + f.replay * backbone(*batch["lm"])[1]
        return ce

    def evaluate(m: nn.Module) -> dict[str, float]:
        preds, val_loss = predict(m, sets["val"], tok.pad_id, device)
        report = classification_report([labels[e.label] for e in sets["val"].examples], [labels[p] for p in preds],
                                       labels)
        return {"val_loss": val_loss, "val_accuracy": report["accuracy"], "val_macro_f1": report["macro_f1"]}

    task = TrainTask(
        name=section, model=model, tokenizer=tok,
        batches=WithReplay(ShuffledBatches(sets["train"].examples, f.batch_size, f.seed,
                                           lambda ex: collate(ex, tok.pad_id, device), dist), replay, device),
        loss=loss, tokens_per_micro_batch=max(1, round(avg_len * f.batch_size)), evaluate=evaluate,
        meta={"task": "classify", "labels": labels, "pooling": f.pooling}, backbone=backbone,
        param_groups=scaled_param_groups(model, f.weight_decay, backbone, f.backbone_lr_scale),
    )
    t0 = time.perf_counter()
    result = train(task, f, out, precision, dist, resume=resume, section=section, progress=progress)
    wall = time.perf_counter() - t0
    if not dist.is_main:  # no barrier: rank 0's test evaluation may outlast a collective's timeout
        return {}

    model.eval()
    preds, test_loss = predict(model, sets["test"], tok.pad_id, device)
    report = classification_report([labels[e.label] for e in sets["test"].examples], [labels[p] for p in preds],
                                   labels)
    after = pre.heldout_loss(backbone, tok, f.forgetting_batches, precision)
    merge_lora(model)
    save_model(out / "model", model, tok, {"stage": section, "task": "classify", "labels": labels,
                                           "pooling": f.pooling, "step": result.step})
    metrics = {
        "test_accuracy": report["accuracy"], "test_macro_f1": report["macro_f1"],
        "majority_baseline": report["majority_baseline"], "majority_label": report["majority_label"],
        "test_loss": test_loss, **{k: v for k, v in result.eval.items()},
        **forgetting(before, after),
        "trainable_params": params["trainable"], "total_params": params["total"], "method": params["method"],
        "steps": result.step, "wall_time_s": round(wall, 2),
        "truncated": {split: s.truncated for split, s in sets.items()},
        "labels": labels, "confusion": report["confusion"], "per_label": report["per_label"],
        "data": sources,
    }
    write_json(out / "eval.json", metrics)
    (out / "confusion.txt").write_text(format_confusion(report) + "\n", encoding="utf-8")
    return metrics


def load_classifier(directory: Path, device: torch.device | str = "cpu") -> tuple[GPTWithHead, Any, list[str]]:
    """A saved classifier: ``(model in eval mode, tokenizer, labels)``."""
    config = read_model_config(directory)
    if config.get("task") != "classify":
        raise ChatforgeError(f"{directory}: not a classifier (task {config.get('task')!r})")
    backbone = GPT(GPTConfig.from_dict(config["model"], source=str(Path(directory) / "config.json")))
    labels = config["labels"]
    model = GPTWithHead(backbone, ClassifierHead(backbone.config.n_embd, len(labels), config["pooling"]))
    load_model_weights(model, directory)
    return model.to(device).eval(), load_tokenizer_of(directory), labels
