"""The prompt-only alternative to a classification head: ask the chat model.

Each text is put to the chat model in a user turn with an instruction that lists
the labels; every label is scored as the assistant's whole reply (its tokens and
the closing ``<|end|>``) by log-likelihood, and the most likely label is the
prediction. Scoring the choices, as evaluation harnesses do for multiple choice,
never fails to parse, so accuracy measures what the model knows rather than how
well its free text can be parsed. The result compares directly with a fine-tuned
head on the same test set.
"""

from __future__ import annotations

from typing import Any

import torch

from chatforge.chat.template import render, render_prompt
from chatforge.eval.metrics import classification_report
from chatforge.model.gpt import GPT

DEFAULT_INSTRUCTION = "Classify the following text as one of: {labels}. Answer with the label only.\n\nText: {text}"


@torch.no_grad()
def label_logprobs(model: GPT, tok: Any, prompt_ids: list[int], labels: list[str], device: Any = "cpu"
                   ) -> list[float]:
    """Log-likelihood of each label as the assistant's complete reply to ``prompt_ids``."""
    rows, reply_lens = [], []
    for label in labels:
        reply = render([{"role": "assistant", "content": label}], tok).ids[2:]  # drop <|bos|><|assistant|>
        rows.append(prompt_ids + reply)
        reply_lens.append(len(reply))
    limit = model.config.block_size + 1
    rows = [r[-limit:] for r in rows]  # a prompt too long for the context loses its start
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    pad = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, T - len(r):] = torch.tensor(r)  # left-pad: every reply ends at the last position
        pad[i, T - len(r):] = True
    idx, pad = idx.to(device), pad.to(device)
    logits, _ = model(idx[:, :-1], padding_mask=pad[:, :-1])
    logp = torch.log_softmax(logits.float(), -1).gather(-1, idx[:, 1:, None]).squeeze(-1)
    # logp[:, j] scores token j+1; rows end together, so each reply is the last reply_lens[i] scores
    return [float(logp[i, -n:].sum()) for i, n in enumerate(reply_lens)]


def prompt_classify(model: GPT, tok: Any, rows: list[tuple[str, str, str]], labels: list[str],
                    instruction: str = DEFAULT_INSTRUCTION, device: Any = "cpu") -> dict[str, Any]:
    """Accuracy/macro-F1 of asking the chat model, on ``(where, text, label)`` rows."""
    model.eval()
    preds = []
    for where, text, _ in rows:
        content = instruction.format(labels=", ".join(labels), text=text)
        prompt = render_prompt([{"role": "user", "content": content}], tok, where)
        scores = label_logprobs(model, tok, prompt, labels, device)
        preds.append(labels[max(range(len(labels)), key=scores.__getitem__)])
    return classification_report([label for _, _, label in rows], preds, labels)
