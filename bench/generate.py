"""Decode speed: chatforge ``generate`` (KV cache, greedy) against Hugging Face ``generate()``
on the SAME weights, in fp32 and bf16, plus the serving engine with sampled requests.

    python bench/generate.py            # 4 layers x 256 wide, vocab 4096; batch 1 and 8; 32-token prompts, 128 new
    python bench/generate.py --quick    # smoke test
    python bench/generate.py --depth 6 --threads 2 --hf-cache static --dtypes fp32

The peer is an exact equivalent, not a look-alike: ``chatforge.interop.to_hf``
converts the model into ``NanoChatForCausalLM`` (``ArceeForCausalLM`` with
``--no-qk-norm``), whose logits match ours to float rounding; the script checks the
logits and that both produce the same greedy tokens before timing. The weights are
chatforge's init with the zero-initialised matrices (LM head, output projections)
filled with small random values, so greedy decoding is not a constant token.

Both decode every prompt to exactly ``--new-tokens`` tokens (no stop token), batch
rows of equal length (no padding). tokens/s = batch x new tokens / wall time of the
whole call, which includes the prompt's prefill (small next to 128 decode steps).
HF uses its default DynamicCache unless ``--hf-cache static``. ``--dtypes``: fp32,
and bf16 by default where the CPU runs it natively (chatforge: ``dtype="bf16"``,
autocast with an fp32 LM head; HF: its ``generate()`` inside ``torch.autocast``).

``chatforge compiled`` rows (unless ``--no-compile``): ``generate(..., compile=True)``, the decode
steps through one ``torch.compile``d graph (``chatforge.model.compiled_decode``; Inductor with its
C++ wrapper on CPU); the prefill stays eager. Its first call compiles (printed, not timed); ends
also with ``ratio generate_bN_compiled`` (against the same eager HF ``generate()``).

``chatforge int8`` rows (unless ``--no-int8``): the same greedy decoding with the model's
matrices in int8 (``chatforge.model.quantize``, what ``serve --quantize int8`` runs), fp32
around them; its "same greedy tokens" column shows how far int8 rounding moves greedy output
on these random weights (the quality cost on a trained model is in the README). Ends also
with ``ratio generate_bN_int8_vs_hf_fp32``.

``engine`` rows (unless ``--no-engine``): the serving engine (``chatforge.serve.Engine``,
continuous batching) with ``batch`` concurrent SAMPLED requests (temperature 0.8,
top-k 50, top-p 0.95, repetition penalty 1.1, one seed each): tokens/s = all their
tokens / wall time from the first submit to the last token. This is the path whose
per-row sampling is now one vectorised call per step.

``rollout`` rows (unless ``--no-rollout``): what GRPO's rollouts do, ``--rollout-batch``
prompts sampled at temperature 1 with every token's log-probability returned
(``generate_details``), against ``generate(do_sample=True, temperature=1, top_k=0,
output_scores=True)`` on the same weights and batch, whose scores give the same
log-probabilities; fp32.

The weight-streaming floor table: one decode step multiplies by every matrix of the model
once; the time of only those products (fp32, torch's kernels, in model order) is a floor no
implementation can beat on this machine. At batch 1 the weights do not stay in the core's
cache between steps, so the floor is the memory bandwidth, and ``HF time / floor`` is the
highest ratio any decoder could reach against HF here.

Rounds are interleaved and the best counts. Ends with ``ratio generate_bN: X`` per
batch size (fp32): chatforge tokens/s divided by HF tokens/s (higher = chatforge faster),
and ``ratio rollout_vs_hf_generate: X`` for the rollout rows.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import (
    Shape,
    add_shape_args,
    count_params,
    machine_line,
    print_table,
    resolve_shape,
    setup_threads,
    timed,
)

from chatforge.device import resolve_precision
from chatforge.model import GPT, generate, generate_details
from chatforge.model.quantize import quantize_model
from chatforge.serve.engine import Engine, SamplingParams

DEFAULT = Shape(n_layer=4, n_embd=256, n_head=4, block_size=256, vocab_size=4096, batch_size=1)
QUICK = Shape(n_layer=2, n_embd=64, n_head=2, block_size=64, vocab_size=512, batch_size=1)


class IdTokenizer:
    """What the engine needs of a tokenizer for any vocabulary size: one ASCII byte per token id."""

    def decode_bytes(self, ids: list[int]) -> bytes:
        return bytes(65 + i % 26 for i in ids)

    def id_to_token(self, i: int) -> str:
        return chr(65 + i % 26)


def run_engine(model: GPT, prompts: list[list[int]], new_tokens: int, dtype: str) -> list[list[int]]:
    """Sampled requests, all submitted at once, through a fresh engine with one slot per request."""
    with Engine(model, IdTokenizer(), max_batch=len(prompts), dtype=dtype) as engine:
        handles = [engine.submit(p, SamplingParams(max_tokens=new_tokens, temperature=0.8, top_k=50, top_p=0.95,
                                                   repetition_penalty=1.1, seed=i))
                   for i, p in enumerate(prompts)]
        for h in handles:
            h.wait()
    return [h.token_ids for h in handles]


@torch.no_grad()
def randomize_zero_weights(model: GPT, std: float = 0.02) -> None:
    """Fill the matrices the init leaves at zero, so the model's predictions depend on its input."""
    for p in model.parameters():
        if not p.any():
            p.normal_(0.0, std)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, DEFAULT, with_batch=False)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes to compare")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32, --quick 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 128, --quick 16)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds, best counts (default 3, --quick 1)")
    ap.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=True,
                    help="chatforge QK-norm (HF peer: NanoChatForCausalLM; without: ArceeForCausalLM)")
    ap.add_argument("--hf-cache", choices=["dynamic", "static"], default="dynamic",
                    help="transformers KV cache implementation")
    native = resolve_precision("auto", torch.device("cpu")).name
    ap.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32"] + ["bf16"] * (native == "bf16"),
                    help="forward precisions to time (default: fp32, and bf16 where the CPU runs it natively)")
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                    help="also time chatforge with int8 matrices (quantize_model, fp32 around them)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time chatforge generate(compile=True): the compiled decode step")
    ap.add_argument("--engine", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the serving engine with sampled requests")
    ap.add_argument("--rollout", action=argparse.BooleanOptionalAction, default=True,
                    help="also time RL rollouts: sampled, with log-probabilities (generate_details vs HF)")
    ap.add_argument("--rollout-batch", type=int, default=32, help="prompts per rollout batch (GRPO: 8 x group 4)")
    args = ap.parse_args()
    prompt_len = args.prompt_len or (8 if args.quick else 32)
    new_tokens = args.new_tokens or (16 if args.quick else 128)
    rounds = args.rounds or (1 if args.quick else 3)
    if prompt_len < 1 or new_tokens < 1 or rounds < 1 or min(args.batches) < 1:
        ap.error("--prompt-len, --new-tokens, --rounds and --batches must be >= 1")
    try:
        import transformers

        from chatforge.interop import to_hf
    except ImportError:
        sys.exit("this benchmark needs Hugging Face transformers: pip install transformers")

    threads = setup_threads(args.threads)
    config, _ = resolve_shape(args, DEFAULT, QUICK)
    config.qk_norm = args.qk_norm
    if prompt_len + new_tokens > config.block_size:
        ap.error(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceeds --block-size {config.block_size}")
    torch.manual_seed(args.seed)
    model = GPT(config)
    randomize_zero_weights(model)
    model.eval()
    hf = to_hf(model)
    print(machine_line(threads))
    print(f"transformers {transformers.__version__}; peer: {type(hf).__name__} with chatforge's weights "
          f"(exact equivalent); shape: n_layer={config.n_layer} n_embd={config.n_embd} n_head={config.n_head} "
          f"vocab={config.vocab_size}; params {count_params(model) / 1e6:.2f}M (chatforge) / "
          f"{count_params(hf) / 1e6:.2f}M (HF); prompt {prompt_len}, {new_tokens} new tokens, greedy, "
          f"HF cache: {args.hf_cache}; dtypes: {', '.join(args.dtypes)} (auto here: {native}); "
          f"best of {rounds} rounds")

    gen = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(0, config.vocab_size, (b, prompt_len), generator=gen) for b in args.batches}
    with torch.no_grad():
        check = prompts[max(args.batches)]
        diff = (model(check)[0] - hf(input_ids=check).logits).abs().max().item()
    print(f"max |logit difference| chatforge vs HF on the prompts: {diff:.2e}")

    def run_chatforge(b: int, dtype: str) -> list[list[int]]:
        return generate(model, prompts[b].tolist(), new_tokens, temperature=0.0, dtype=dtype)

    def run_compiled(b: int, dtype: str) -> list[list[int]]:
        return generate(model, prompts[b].tolist(), new_tokens, temperature=0.0, dtype=dtype, compile=True)

    def run_hf(b: int, dtype: str) -> list[list[int]]:
        ids = prompts[b]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, cache_implementation=args.hf_cache)
        return out[:, prompt_len:].tolist()

    def run_served(b: int, dtype: str) -> list[list[int]]:
        return run_engine(model, prompts[b].tolist(), new_tokens, dtype)

    int8 = quantize_model(model, "int8") if args.int8 else None

    def run_int8(b: int, dtype: str) -> list[list[int]]:
        return generate(int8, prompts[b].tolist(), new_tokens, temperature=0.0, dtype="fp32")

    hf_name = f"hf-{type(hf).__name__}"
    runners = {"chatforge": run_chatforge, hf_name: run_hf}
    if args.compile:
        runners["chatforge compiled"] = run_compiled
    if int8 is not None:
        runners["chatforge int8"] = run_int8
    if args.engine:
        runners["chatforge engine (sampled)"] = run_served
    cases = [(name, d, b) for d in args.dtypes for b in args.batches for name in runners
             if name != "chatforge int8" or d == "fp32"]  # int8 runs fp32 around its products
    outputs, warmup = {}, {}
    for case in cases:  # warmup; the compiled runner compiles its graphs here
        warmup[case] = timed(lambda case=case: outputs.__setitem__(case, runners[case[0]](case[2], case[1])))
    for case, sec in warmup.items():
        if case[0] == "chatforge compiled":
            print(f"chatforge compiled, {case[1]}, batch {case[2]}: first call (compiles) {sec:.1f} s")
    agree = {}
    for d in args.dtypes:  # greedy chatforge vs HF, same dtype
        for b in args.batches:
            theirs = outputs[(hf_name, d, b)]
            for name in ("chatforge", "chatforge compiled", "chatforge int8"):
                if (name, d, b) in outputs:
                    ours = outputs[(name, d, b)]
                    agree[(name, d, b)] = sum(x == y for r0, r1 in zip(ours, theirs)
                                              for x, y in zip(r0, r1)) / (b * new_tokens)
    best = {case: float("inf") for case in cases}
    for r in range(rounds):
        for case in cases:
            name, d, b = case
            best[case] = min(best[case], timed(lambda name=name, d=d, b=b: runners[name](b, d)))
        print(f"round {r + 1}/{rounds} done", flush=True)

    rows = []
    for (name, d, b), sec in sorted(best.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        same = f"{agree[(name, d, b)]:.1%}" if (name, d, b) in agree else "(sampled)" if "engine" in name else "-"
        rows.append([name, d, str(b), f"{b * new_tokens / sec:,.0f}", f"{sec * 1e3 / new_tokens:.2f}", same])
    print()
    print_table(["model", "dtype", "batch", "tokens/s", "ms/token step", "same greedy tokens"], rows)
    if min(v for k, v in agree.items() if k[0] == "chatforge") < 1.0:
        print("note: greedy outputs differ somewhere (rounding, bf16 above all, can flip a near-tie); timings "
              "still compare the same amount of work")
    floor_rows = []
    for b in args.batches:
        floor = weight_floor(model, b, new_tokens, rounds)
        hf_step = best[(hf_name, "fp32" if "fp32" in args.dtypes else args.dtypes[0], b)] / new_tokens
        floor_rows.append([str(b), f"{floor * 1e3:.2f}", f"{b / floor:,.0f}", f"{hf_step / floor:.2f}"])
    mb = sum(w.numel() * w.element_size() for w in decode_weights(model)) / 1e6
    print(f"\nweight-streaming floor, fp32: every decode step reads each of the model's matrices once "
          f"({mb:.1f} MB); the time of just those matrix products (torch's own kernels, in model order, "
          f"nothing else) bounds what any implementation reaches on this machine")
    print_table(["batch", "floor ms/step", "floor tokens/s", "highest possible ratio vs HF"], floor_rows)
    rollout_ratio = None
    if args.rollout:
        rollout_ratio = time_rollouts(model, hf, config, prompt_len, new_tokens, args.rollout_batch, rounds,
                                      args.seed)
    print()
    d0 = "fp32" if "fp32" in args.dtypes else args.dtypes[0]
    for b in args.batches:
        print(f"ratio generate_b{b}: {best[(hf_name, d0, b)] / best[('chatforge', d0, b)]:.3f}")
    if args.compile:
        for b in args.batches:
            print(f"ratio generate_b{b}_compiled: {best[(hf_name, d0, b)] / best[('chatforge compiled', d0, b)]:.3f}")
    if int8 is not None and "fp32" in args.dtypes:
        for b in args.batches:  # int8 chatforge against fp32 HF: what --quantize int8 buys a user
            print(f"ratio generate_b{b}_int8_vs_hf_fp32: {best[(hf_name, 'fp32', b)] / best[('chatforge int8', 'fp32', b)]:.3f}")
    if rollout_ratio is not None:
        print(f"ratio rollout_vs_hf_generate: {rollout_ratio:.3f}")


def decode_weights(model: GPT) -> list[torch.Tensor]:
    """The matrices one decode step multiplies by, in order: each block's, then the LM head."""
    ws = [m.weight for block in model.blocks for m in block.modules() if isinstance(m, torch.nn.Linear)]
    return [*ws, model.output_weight]


@torch.no_grad()
def weight_floor(model: GPT, batch: int, steps: int, rounds: int) -> float:
    """Seconds per decode step spent in the matrix products alone (fp32, best of ``rounds`` x ``steps``).

    At batch 1 a step is a chain of matrix-vector products whose weights do not stay in the
    core's cache between steps, so this is the memory-bandwidth floor of decoding."""
    ws = decode_weights(model)
    xs = [torch.randn(batch, w.shape[1]) for w in ws]

    def one_pass() -> None:
        for _ in range(steps):
            for w, x in zip(ws, xs):
                torch.nn.functional.linear(x, w)

    one_pass()
    return min(timed(one_pass) for _ in range(rounds)) / steps


def time_rollouts(model: GPT, hf: object, config: object, prompt_len: int, new_tokens: int, batch: int,
                  rounds: int, seed: int) -> float:
    """Sampled decoding with per-token log-probabilities, fp32: chatforge tokens/s over HF tokens/s."""
    gen = torch.Generator().manual_seed(seed + 1)
    prompts = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=gen)

    def ours() -> None:
        out = generate_details(model, prompts.tolist(), new_tokens, temperature=1.0, seed=seed, dtype="fp32")
        assert all(len(g.logprobs) == new_tokens for g in out)

    def theirs() -> None:
        torch.manual_seed(seed)
        out = hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          output_scores=True, return_dict_in_generate=True)
        scores = torch.stack(out.scores, dim=1).log_softmax(-1)  # (B, new, V): the sampling distribution
        picked = scores.gather(-1, out.sequences[:, prompt_len:, None])[..., 0]
        assert picked.shape == (batch, new_tokens)

    ours(), theirs()  # warmup
    t_ours = min(timed(ours) for _ in range(rounds))
    t_hf = min(timed(theirs) for _ in range(rounds))
    n = batch * new_tokens
    print(f"\nrollouts (sampled, temperature 1, log-probabilities, fp32, batch {batch}): chatforge "
          f"{n / t_ours:,.0f} tokens/s, HF generate {n / t_hf:,.0f} tokens/s")
    return t_hf / t_ours


if __name__ == "__main__":
    main()
