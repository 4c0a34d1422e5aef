"""Sequence classification: a head on the pre-trained GPT (sentiment, intent, any ``{"text","label"}`` data).

Input is ``<|bos|>`` + the text's tokens, right-padded; the head reads the last
real token's hidden state (or the mean over tokens), like Hugging Face's
``GPT2ForSequenceClassification``. Labels are the ones seen in the training
data, in sorted order; a label at validation/test time that training never saw
is an error naming the file and line, since the head cannot predict it.
With ``weight_field`` set (e.g. ``"weight"``, as ``chatforge data balance --mode reweight``
writes it), each training example's cross-entropy is multiplied by its weight; the loss
is still divided by the number of examples, so weights that average 1 keep its scale.
Validation and test are never weighted: they measure the data as it is.

Writes under ``runs/<run>/finetune/<stage>/``: ``ckpt/`` (resumable), ``model/``
(LoRA merged into the weights), ``eval.json`` (test accuracy, macro-F1, confusion
matrix, the majority-class baseline, the TF-IDF + logistic-regression baseline fitted
on the same training split (``eval.baselines``, when scikit-learn is installed),
forgetting, trainable parameters, wall time).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chatforge.config import ClassifyConfig
from chatforge.data.records import field_of, iter_records
from chatforge.errors import ChatforgeError, DataError
from chatforge.eval.baselines import tfidf_logreg
from chatforge.eval.metrics import classification_report, format_confusion
from chatforge.finetune.common import ShuffledBatches
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.heads import ClassifierHead, GPTWithHead
from chatforge.train.checkpoint import load_model_weights, load_tokenizer_of, read_model_config
from chatforge.train.loop import LossOutput, TrainResult
from chatforge.train.stage import StageContext, StageParts, StageTest


@dataclass
class Labelled:
    where: str
    ids: list[int]
    label: int
    weight: float | None = None  # the loss weight (training rows with a weight field); None: unweighted


@dataclass
class LabelledSet:
    examples: list[Labelled]
    truncated: int


def read_labelled(source: str | Path, text_field: str, label_field: str, split: str = "train"
                  ) -> list[tuple[str, str, str]]:
    """``(location, text, label)`` rows; a missing or non-string field is an error naming the row."""
    return read_labelled_weighted(source, text_field, label_field, split)[0]


def read_labelled_weighted(source: str | Path, text_field: str, label_field: str, split: str = "train",
                           weight_field: str = "") -> tuple[list[tuple[str, str, str]], list[float] | None]:
    """``read_labelled``'s rows and, with ``weight_field``, each row's weight (a row without one weighs 1)."""
    from chatforge.data.balance import example_weight

    rows, weights = [], []
    for where, rec in iter_records(source, split):
        text = field_of(rec, text_field, where)
        label = field_of(rec, label_field, where, (str, int))
        rows.append((where, text, str(label)))
        if weight_field:
            weights.append(example_weight(rec, where, weight_field))
    if not rows:
        raise DataError(f"{source}: no examples")
    return rows, weights if weight_field else None


def encode_labelled(rows: list[tuple[str, str, str]], tok: Any, labels: list[str], max_len: int,
                    source: str, warn: bool = True, weights: list[float] | None = None) -> LabelledSet:
    """Token ids and label indices (and loss ``weights``, one per row); ``warn``: print the truncation
    count (off on DDP ranks other than 0)."""
    index = {lab: i for i, lab in enumerate(labels)}
    out, truncated = [], 0
    for i, (where, text, label) in enumerate(rows):
        if label not in index:
            raise DataError(f"{where}: label {label!r} does not occur in the training data, so the classifier "
                            f"cannot predict it (training labels: {', '.join(labels)})")
        ids = [tok.bos_id, *tok.encode(text)]
        if len(ids) > max_len:
            ids, truncated = ids[:max_len], truncated + 1
        out.append(Labelled(where, ids, index[label], weights[i] if weights is not None else None))
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
    batch = {"idx": idx.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
    if examples[0].weight is not None:  # a weighted set: every example has one
        batch["weights"] = torch.tensor([e.weight for e in examples], dtype=torch.float32).to(device)
    return batch


def classify_loss(m: nn.Module, batch: dict[str, Any]) -> LossOutput:
    """Summed cross-entropy over the batch's examples (each times its ``weights`` entry, when the batch has
    them), counted per example; accuracy unweighted."""
    logits = m(batch["idx"], batch["attention_mask"])
    if "weights" in batch:
        ce = (F.cross_entropy(logits, batch["labels"], reduction="none") * batch["weights"]).sum()
    else:  # the unweighted sum as before, bit for bit
        ce = F.cross_entropy(logits, batch["labels"], reduction="sum")
    correct = (logits.argmax(-1) == batch["labels"]).sum()
    n = batch["labels"].numel()
    return LossOutput(ce, n, {"accuracy": (correct, n)}, tokens=int(batch["attention_mask"].sum()))


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


def build(ctx: StageContext) -> StageParts:
    """A classifier head on the parent GPT for a ``ClassifyConfig`` section (sentiment, intent, ...)."""
    f: ClassifyConfig = ctx.section
    backbone, tok, device, sources = ctx.backbone, ctx.tokenizer, ctx.device, ctx.sources
    max_len = min(f.max_len or backbone.config.block_size, backbone.config.block_size)
    rows, train_weights = {}, None
    for split, src in sources.items():  # only the training rows' weights are read: evaluation is unweighted
        rows[split], w = read_labelled_weighted(src, f.text_field, f.label_field,
                                                weight_field=f.weight_field if split == "train" else "")
        train_weights = w if split == "train" else train_weights
    labels = sorted({label for _, _, label in rows["train"]})
    if len(labels) < 2:
        raise DataError(f"{sources['train']}: only one label ({labels[0]!r}) in the training data; "
                        "a classifier needs at least two")
    sets = {split: encode_labelled(r, tok, labels, max_len, sources[split], warn=ctx.is_main,
                                   weights=train_weights if split == "train" else None)
            for split, r in rows.items()}
    model = GPTWithHead(backbone, ClassifierHead(backbone.config.n_embd, len(labels), f.pooling)).to(device)

    def evaluate(m: nn.Module) -> dict[str, float]:
        preds, val_loss = predict(m, sets["val"], tok.pad_id, device)
        report = classification_report([labels[e.label] for e in sets["val"].examples], [labels[p] for p in preds],
                                       labels)
        return {"val_loss": val_loss, "val_accuracy": report["accuracy"], "val_macro_f1": report["macro_f1"]}

    def test(m: nn.Module, result: TrainResult) -> StageTest:
        preds, test_loss = predict(m, sets["test"], tok.pad_id, device)
        report = classification_report([labels[e.label] for e in sets["test"].examples], [labels[p] for p in preds],
                                       labels)
        metrics = {"test_accuracy": report["accuracy"], "test_macro_f1": report["macro_f1"],
                   "majority_baseline": report["majority_baseline"], "test_loss": test_loss}
        pairs = {split: [(text, label) for _, text, label in r] for split, r in rows.items()}
        classical = tfidf_logreg(pairs["train"], pairs["test"], pairs.get("val", ()), labels, seed=f.seed)
        if classical["available"]:
            metrics.update(tfidf_logreg_accuracy=classical["accuracy"], tfidf_logreg_macro_f1=classical["macro_f1"])
        details = {"labels": labels, "majority_label": report["majority_label"], "confusion": report["confusion"],
                   "per_label": report["per_label"], "tfidf_logreg": {k: v for k, v in classical.items()
                                                                      if k not in ("accuracy", "macro_f1")}}
        return StageTest(metrics=metrics, primary="test_accuracy", details=details,
                         files={"confusion.txt": format_confusion(report) + "\n"})

    avg_len = sum(len(e.ids) for e in sets["train"].examples) / len(sets["train"].examples)
    return StageParts(
        model=model,
        batches=ShuffledBatches(sets["train"].examples, f.batch_size, f.seed,
                                lambda ex: collate(ex, tok.pad_id, device), ctx.dist),
        loss=classify_loss, tokens_per_micro_batch=max(1, round(avg_len * f.batch_size)), evaluate=evaluate, test=test,
        meta={"labels": labels, "pooling": f.pooling}, keep_trainable=("head",), units_per_batch=f.batch_size,
        info={"truncated": {split: s.truncated for split, s in sets.items()}},
    )


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
