"""Chat SFT and prompt -> completion tasks (translation): next-token loss on assistant tokens only.

Both read ``messages`` datasets (or TRL prompt/completion records) through the chat
template, pack conversations into full blocks with attention kept inside each
(``doc_ids``), and learn only the assistant's tokens and its closing ``<|end|>``,
so the model learns to end its turn. Evaluation: loss on held-out assistant
tokens during training; at the end, held-out prompts are answered by greedy
generation (the same template and stop tokens as ``chatforge chat``) and scored
by BLEU/chrF against the references, where the data carries an order record by
whether the answer states the record's order status, and, on SupportWorld data, by
SupportWorld's checks (``chatforge.eval.checks``: status, order number, name, intent
handled, no other customer's data, turn ended).

Writes under ``runs/<run>/finetune/<stage>/``: ``ckpt/``, ``model/`` (LoRA merged),
``eval.json`` and ``answers.jsonl`` (prompt, reference, generated answer, checks).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from chatforge.chat.batching import ChatBatches, chat_loss, eval_batches
from chatforge.chat.data import iter_conversations, load_chat_examples
from chatforge.chat.template import prompt_messages, render_prompt
from chatforge.config import ChatTuneConfig
from chatforge.data.records import iter_records
from chatforge.errors import ChatforgeError, DataError
from chatforge.eval.checks import CHECKS, SupportChecks, is_support_row, summarize, support_turn
from chatforge.eval.generation import MIN_ROOM, answer_prompts
from chatforge.eval.metrics import bleu_chrf
from chatforge.model.gpt import GPT
from chatforge.train.loop import TrainResult
from chatforge.train.stage import StageContext, StageParts, StageTest


def status_stated(record: Any, answer: str) -> bool | None:
    """Whether ``answer`` states the order status of ``record`` (None: no status to check)."""
    if not isinstance(record, dict):
        return None
    status = record.get("status")
    if not isinstance(status, str) or not status:
        return None
    return status.replace("_", " ").lower() in answer.lower()


def evaluate_generation(model: GPT, tok: Any, source: str, n: int, max_new_tokens: int, device: torch.device,
                        frequency_penalty: float = 0.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Answer ``n`` held-out prompts of ``source`` by greedy decoding and score them: BLEU/chrF
    against the references, and, for prompts whose reference answer states the order
    status of the conversation's record, whether the generated answer states it too.
    Half of the prompts are such status questions (when the data has them), half the rest.
    SupportWorld rows whose prompt is the main support question (no follow-up turn) also get
    SupportWorld's checks (``eval.checks``): ``check_*`` rates and the report in ``checks``."""
    limit = model.config.block_size - min(MIN_ROOM, max_new_tokens)  # answer_prompts' rule
    status_pool, other_pool = [], []
    for (where, msgs), (_, rec) in zip(iter_conversations(source), iter_records(source)):
        if not msgs or msgs[-1].get("role") != "assistant" or not prompt_messages(msgs):
            continue
        record = rec.get("record") if isinstance(rec, dict) else None
        checkable = status_stated(record, msgs[-1]["content"]) is True
        pool = status_pool if checkable else other_pool
        if len(pool) < n and len(render_prompt(msgs, tok, where)) <= limit:
            pool.append((where, msgs, record if checkable else None, rec))
        if len(status_pool) >= n and len(other_pool) >= n:
            break
    k = min(len(status_pool), (n + 1) // 2)
    chosen = status_pool[:k] + other_pool[:n - k]
    chosen += status_pool[k:k + n - len(chosen)]
    was_training = model.training
    model.eval()
    answers = answer_prompts(model, tok, [(w, m) for w, m, _, _ in chosen], max_new_tokens, device,
                             frequency_penalty=frequency_penalty)
    model.train(was_training)
    rows, hyps, refs, checks = [], [], [], []
    verdicts: list[tuple[str, dict[str, bool | None]]] = []
    support: SupportChecks | None = None
    for (where, msgs, record, rec), ans in zip(chosen, answers):
        ref = msgs[-1]["content"]
        row = {"where": where, "prompt": prompt_messages(msgs), "reference": ref,
               "answer": ans.text if ans is not None else None}
        if ans is not None:
            hyps.append(ans.text)
            refs.append(ref)
            if record is not None:
                row["status"] = record["status"]
                row["status_stated"] = bool(status_stated(record, ans.text))
                checks.append(row["status_stated"])
            if is_support_row(rec) and support_turn(rec) == len(msgs) - 1:
                try:
                    support = support or SupportChecks.for_data(source)
                    row["checks"] = support.check(rec, ans.text, ans.ended)
                    verdicts.append((rec["intent"], row["checks"]))
                except DataError as e:  # records of another shape: not SupportWorld data
                    row["checks_error"] = str(e)
        rows.append(row)
    metrics: dict[str, Any] = {"generated": len(hyps)}
    if hyps:
        metrics.update(bleu_chrf(hyps, refs))
    if checks:
        metrics["status_correct"] = sum(checks) / len(checks)
        metrics["status_checked"] = len(checks)
    if verdicts:
        report = summarize(verdicts)
        metrics["checks"] = report
        metrics["checked"] = report["answers"]
        for name in (*CHECKS, "all"):
            if report["checks"][name]["n"]:
                metrics[f"check_{name}"] = report["checks"][name]["rate"]
    return metrics, rows


def build(ctx: StageContext) -> StageParts:
    """Chat SFT (``sft``) or a prompt -> completion task (``translate``) on the parent model."""
    f: ChatTuneConfig = ctx.section
    section, tok, model, device = ctx.decl.name, ctx.tokenizer, ctx.backbone, ctx.device
    block = model.config.block_size
    max_tokens = min(f.max_len or block + 1, block + 1)
    train_ex, train_stats = load_chat_examples(ctx.sources["train"], tok, max_tokens)
    val_ex, val_stats = load_chat_examples(ctx.sources["val"], tok, max_tokens)
    if not train_ex:
        raise ChatforgeError(f"{ctx.sources['train']}: no usable conversations ({train_stats.summary()})")
    for name, stats in (("train", train_stats), ("val", val_stats)):
        ctx.say(f"{section} {name}: {stats.summary()}")
        for w in stats.warnings[:3]:
            ctx.say(f"  warning: {w}")
    chats = ChatBatches(train_ex, block, f.batch_size, seed=f.seed, pack=f.pack, pad_id=tok.pad_id,
                        rank=ctx.dist.rank, world_size=ctx.dist.world_size)

    def evaluate(m: nn.Module) -> dict[str, float]:
        total, n = 0.0, 0
        for b in eval_batches(val_ex, block, f.batch_size, pack=f.pack, pad_id=tok.pad_id,
                              max_batches=f.eval_batches or None):
            loss_sum, count = chat_loss(m, b)
            total, n = total + float(loss_sum), n + int(count)
        loss_value = total / max(n, 1)
        return {"val_loss": loss_value, "val_ppl": float(torch.tensor(loss_value).exp())}

    def test(m: nn.Module, result: TrainResult) -> StageTest:
        gen, rows = evaluate_generation(m, tok, ctx.sources["test"], f.eval_generate, f.max_new_tokens, device,
                                        f.frequency_penalty)
        metrics = {f"test_{k}" if k in ("bleu", "chrf", "status_correct") or k.startswith("check_") else k: v
                   for k, v in gen.items() if isinstance(v, int | float)}
        # the sacrebleu signature; the checks' report (per check and intent, with 95% intervals)
        details = {k: v for k, v in gen.items() if not isinstance(v, int | float)}
        # the order-status check where the data has records, else chrF, else the held-out loss
        primary = next((k for k in ("test_status_correct", "test_chrf") if k in metrics), "val_loss")
        return StageTest(metrics=metrics, primary=primary, details=details, files={"answers.jsonl": rows})

    return StageParts(
        model=model, batches=chats, loss=chat_loss, tokens_per_micro_batch=chats.tokens_per_batch,
        evaluate=evaluate, test=test, keep_trainable=("lm_head",) if f.lora_r else (),
        units_per_batch=train_stats.learned_tokens / max(1, len(chats.rows(0))) * f.batch_size,
        info={"packing_fill": round(chats.fill_ratio(), 3), "train_examples": train_stats.examples,
              "truncated": train_stats.truncated + val_stats.truncated,
              "dropped": train_stats.dropped_no_learned + val_stats.dropped_no_learned},
    )
