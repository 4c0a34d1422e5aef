"""DPO: chatforge's DPO step against TRL's ``DPOTrainer`` on the same model, pairs, beta and batch.

Both sides start from the same weights (a chatforge GPT exported with
``chatforge.interop.hf.to_hf``), see the same preference pairs as the same token ids
(TRL gets the chat-rendered prompt as text with the special tokens spelled out and the
answer without its ``<|end|>``, which TRL appends as EOS; the script checks the ids
agree), use the same loss (sigmoid, beta), batch (every pair in one batch, so data
order cannot differ), optimizer (AdamW, constant LR, no weight decay, clip 1.0) and
fp32, and compute the reference log-probabilities once (TRL:
``precompute_ref_log_probs``). Printed: the loss and ``rewards/margins`` at step 0 and
after ``--steps`` steps on each side, their differences, and the time per step.

The model is the tiny preset's shape with plain keys and untied embeddings (smeared
keys and a tied head have no exact transformers equivalent), randomly initialised
unless ``--model DIR`` names an exportable chatforge model. Needs the bench extra
(``pip install -e '.[bench]'``: transformers, trl) and a run with SupportWorld data
and a tokenizer (``chatforge pipeline run --only supportworld --only collect --only clean
--only tokenizer`` is enough).

    .venv/bin/python bench/dpo_vs_trl.py [--name default] [--pairs 16] [--steps 10]

Ends with ``ratio dpo_step_vs_trl: VALUE`` (TRL's seconds per step / chatforge's; higher is better).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from _common import machine_line

from chatforge.align.dpo import dpo_step_loss, pair_batch, score_pairs
from chatforge.align.pairs import iter_pair_rows, pair_messages, tokenize_pairs
from chatforge.config import DPOConfig
from chatforge.device import resolve_precision
from chatforge.interop.hf import to_hf
from chatforge.model import GPT, GPTConfig
from chatforge.paths import RunPaths
from chatforge.tokenizer import load_tokenizer
from chatforge.train.checkpoint import load_model


def chatforge_steps(model: GPT, scored: list, f: DPOConfig, steps: int, pad_id: int) -> tuple[list, float]:
    """(loss, margin) before each of steps + 1 updates, and seconds per update."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=f.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    batch = pair_batch(scored, pad_id)
    log = []
    t0 = time.perf_counter()
    for _ in range(steps + 1):
        out = dpo_step_loss(model, batch, f)
        loss = out.sum / out.count
        log.append((loss.item(), (out.metrics["rewards/margins"][0] / out.count).item()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return log, (time.perf_counter() - t0) / (steps + 1)


def trl_steps(hf_model, hf_tok, rows: list[dict], f: DPOConfig, steps: int, seed: int) -> tuple[list, float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    with tempfile.TemporaryDirectory() as out:
        cfg = TRLConfig(output_dir=out, beta=f.beta, loss_type=["sigmoid"], learning_rate=f.lr,
                        per_device_train_batch_size=len(rows), gradient_accumulation_steps=1, max_steps=steps + 1,
                        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, logging_steps=1, report_to=[],
                        save_strategy="no", precompute_ref_log_probs=True, use_cpu=True, bf16=False, fp16=False,
                        max_length=None, seed=seed, dataloader_drop_last=False, disable_dropout=True)
        trainer = DPOTrainer(model=hf_model, ref_model=None, args=cfg, train_dataset=Dataset.from_list(rows),
                             processing_class=hf_tok)
        times: list[float] = []

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                times.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                times[-1] = time.perf_counter() - times[-1]

        trainer.add_callback(StepTimer())
        trainer.train()
        log = [(e["loss"], e["rewards/margins"]) for e in trainer.state.log_history if "loss" in e]
    return log, sum(times) / max(1, len(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="default")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--model", help="an exportable chatforge model directory (default: a fresh tiny-shaped GPT)")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import PreTrainedTokenizerFast

    run = RunPaths.of(args.runs_dir, args.name)
    if args.model:
        model, tok, _ = load_model(Path(args.model), torch.device("cpu"))
    else:
        tok = load_tokenizer(run.tokenizer)
        torch.manual_seed(args.seed)
        model = GPT(GPTConfig.from_depth(4, vocab_size=tok.vocab_size, block_size=512, n_embd=128, n_head=4,
                                         qk_norm=False, logit_softcap=0.0, tie_embeddings=False))
    hf_model = to_hf(copy.deepcopy(model), tok.bos_id, tok.end_id, tok.pad_id).train()
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(run.tokenizer / "tokenizer.json"), bos_token="<|bos|>",
                                     eos_token="<|end|>", pad_token="<|pad|>")

    source = run.supportworld / "preferences" / "train.jsonl"
    rows = []
    for where, row in iter_pair_rows(source):
        prompt, chosen, rejected = pair_messages(row, where)
        rows.append((where, row, prompt, chosen[0]["content"], rejected[0]["content"]))
        if len(rows) == args.pairs:
            break
    pairs, stats = tokenize_pairs([(w, r) for w, r, *_ in rows], tok, model.config.block_size + 1)
    if stats.pairs != len(rows) or stats.truncated:
        raise SystemExit(f"{source}: the first {len(rows)} pairs must fit the context whole ({stats.summary()})")
    trl_rows = []
    for (where, _, prompt, chosen, rejected), p in zip(rows, pairs):
        text = "<|bos|>" + "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in prompt) + "<|assistant|>"
        trl_rows.append({"prompt": text, "chosen": chosen, "rejected": rejected})
        for answer, ids in ((chosen, p.chosen), (rejected, p.rejected)):  # the same token ids on both sides
            if hf_tok(text + answer + "<|end|>")["input_ids"] != ids:
                raise SystemExit(f"{where}: the transformers tokenizer does not reproduce chatforge's ids")

    f = DPOConfig(beta=args.beta, lr=args.lr, loss_type="sigmoid")
    fp32 = resolve_precision("fp32", torch.device("cpu"))
    scored = score_pairs(model, pairs, tok.pad_id, 2 * len(pairs), False, fp32)
    ours, our_step = chatforge_steps(model, scored, f, args.steps, tok.pad_id)
    theirs, trl_step = trl_steps(hf_model, hf_tok, trl_rows, f, args.steps, args.seed)

    print(f"\nDPO, {len(pairs)} pairs in one batch, beta {args.beta}, lr {args.lr}, sigmoid loss, fp32; "
          f"{machine_line(torch.get_num_threads())}")
    print("| step | chatforge loss | TRL loss | chatforge rewards/margins | TRL rewards/margins |")
    print("|---|---|---|---|---|")
    for step in (0, args.steps):
        (lo, mo), (lt, mt) = ours[step], theirs[step]
        print(f"| {step} | {lo:.5f} | {lt:.5f} | {mo:.5f} | {mt:.5f} |")
    d_loss = max(abs(ours[s][0] - theirs[s][0]) for s in (0, args.steps))
    d_margin = max(abs(ours[s][1] - theirs[s][1]) for s in (0, args.steps))
    print(f"step 0 loss vs log 2: {abs(ours[0][0] - math.log(2)):.2e}; largest difference: loss {d_loss:.2e}, "
          f"margin {d_margin:.2e}")
    print(json.dumps({"seconds_per_step": {"chatforge": round(our_step, 4), "trl": round(trl_step, 4)}}))
    print(f"ratio dpo_step_vs_trl: {trl_step / our_step:.2f}")


if __name__ == "__main__":
    main()
