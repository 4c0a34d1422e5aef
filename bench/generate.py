"""Decode speed: chatforge ``generate`` (KV cache, greedy) against Hugging Face ``generate()``
on the SAME weights.

    python bench/generate.py            # 4 layers x 256 wide, vocab 4096; batch 1 and 8; 32-token prompts, 128 new
    python bench/generate.py --quick    # smoke test
    python bench/generate.py --depth 6 --threads 2 --hf-cache static

The peer is an exact equivalent, not a look-alike: ``chatforge.interop.to_hf``
converts the model into ``NanoChatForCausalLM`` (``ArceeForCausalLM`` with
``--no-qk-norm``), whose logits match ours to float rounding; the script checks the
logits and that both produce the same greedy tokens before timing. The weights are
chatforge's init with the zero-initialised matrices (LM head, output projections)
filled with small random values, so greedy decoding is not a constant token.

Both decode every prompt to exactly ``--new-tokens`` tokens (no stop token), fp32,
batch rows of equal length (no padding). tokens/s = batch x new tokens / wall time
of the whole call, which includes the prompt's prefill (small next to 128 decode
steps). HF uses its default DynamicCache unless ``--hf-cache static``. Rounds are
interleaved and the best counts. Ends with ``ratio generate_bN: X`` per batch size:
chatforge tokens/s divided by HF tokens/s (higher = chatforge faster).
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

from chatforge.model import GPT, generate

DEFAULT = Shape(n_layer=4, n_embd=256, n_head=4, block_size=256, vocab_size=4096, batch_size=1)
QUICK = Shape(n_layer=2, n_embd=64, n_head=2, block_size=64, vocab_size=512, batch_size=1)


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
          f"{count_params(hf) / 1e6:.2f}M (HF); prompt {prompt_len}, {new_tokens} new tokens, greedy, fp32, "
          f"HF cache: {args.hf_cache}; best of {rounds} rounds")

    gen = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(0, config.vocab_size, (b, prompt_len), generator=gen) for b in args.batches}
    with torch.no_grad():
        check = prompts[max(args.batches)]
        diff = (model(check)[0] - hf(input_ids=check).logits).abs().max().item()
    print(f"max |logit difference| chatforge vs HF on the prompts: {diff:.2e}")

    def run_chatforge(b: int) -> list[list[int]]:
        return generate(model, prompts[b].tolist(), new_tokens, temperature=0.0)

    def run_hf(b: int) -> list[list[int]]:
        ids = prompts[b]
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, cache_implementation=args.hf_cache)
        return out[:, prompt_len:].tolist()

    runners = {"chatforge": run_chatforge, f"hf-{type(hf).__name__}": run_hf}
    agree = {}
    for b in args.batches:  # warmup, and the equivalence check on every batch
        outs = [fn(b) for fn in runners.values()]
        same = sum(x == y for r0, r1 in zip(*outs) for x, y in zip(r0, r1))
        agree[b] = same / (b * new_tokens)
    best = {(name, b): float("inf") for name in runners for b in args.batches}
    for r in range(rounds):
        for b in args.batches:
            for name, fn in runners.items():
                best[(name, b)] = min(best[(name, b)], timed(lambda fn=fn, b=b: fn(b)))
        print(f"round {r + 1}/{rounds} done", flush=True)

    rows = []
    for (name, b), sec in sorted(best.items(), key=lambda kv: kv[0][1]):
        rows.append([name, str(b), f"{b * new_tokens / sec:,.0f}", f"{sec * 1e3 / new_tokens:.2f}",
                     f"{agree[b]:.1%}"])
    print()
    print_table(["model", "batch", "tokens/s", "ms/token step", "same greedy tokens"], rows)
    if min(agree.values()) < 1.0:
        print("note: greedy outputs differ somewhere (fp32 rounding can flip a near-tie); timings still compare "
              "the same amount of work")
    print()
    hf_name = list(runners)[1]
    for b in args.batches:
        print(f"ratio generate_b{b}: {best[(hf_name, b)] / best[('chatforge', b)]:.3f}")


if __name__ == "__main__":
    main()
