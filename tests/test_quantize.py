"""int8 quantisation for CPU decoding: close to the fp32 model, used by generate, the engine, the
server and the eval commands, never changing the fp32 model it was made from."""

from __future__ import annotations

import json

import pytest
import torch

from chatforge.cli import main as cli_main
from chatforge.errors import ChatforgeError
from chatforge.model import GPT, generate
from chatforge.model.gpt import GPTConfig
from chatforge.model.quantize import is_quantized, model_precision, quantize_model
from chatforge.serve.app import ServeSettings, create_app
from chatforge.tokenizer.byte import ByteTokenizer
from chatforge.train.checkpoint import save_model

pytestmark = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines
                                and "qnnpack" not in torch.backends.quantized.supported_engines,
                                reason="this PyTorch build has no int8 CPU kernels (fbgemm/qnnpack)")


def trained_like(tie: bool, smear: bool, seed: int = 0, vocab: int = 300) -> GPT:
    """Random weights of a trained model's scale (no zero-initialised matrices)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=64, n_layer=2, n_embd=64, n_head=4, tie_embeddings=tie,
                          key_smear=smear))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    return model.eval()


@pytest.mark.parametrize("tie,smear", [(False, False), (True, True)])
def test_int8_logits_track_fp32_and_the_original_is_untouched(tie, smear):
    model = trained_like(tie, smear)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_model(model, "int8")
    assert is_quantized(q) and not is_quantized(model) and q is not model
    x = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(x)[0], q(x)[0]
    # int8 weights per channel, activations per call: an error of a few percent of the logits' RMS on these
    # random weights (measured 3.9-4.5%), and mostly the same top token
    assert (got - ref).pow(2).mean().sqrt() < 0.08 * ref.pow(2).mean().sqrt()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.85
    assert not torch.equal(got, ref)  # it really runs int8 products
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert quantize_model(model, "none") is model


def test_generate_and_precision_with_a_quantized_model():
    q = quantize_model(trained_like(True, True), "int8")
    prompts = [[1, 2, 3, 4], [5, 6]]
    out = generate(q, prompts, 12, temperature=0.0)
    assert [len(o) for o in out] == [12, 12]
    assert out == generate(q, prompts, 12, temperature=0.0)  # deterministic
    assert model_precision(q, "auto", torch.device("cpu")).name == "fp32"
    with pytest.raises(ChatforgeError, match="int8"):
        model_precision(q, "bf16", torch.device("cpu"))
    with pytest.raises(ChatforgeError, match="allowed"):
        quantize_model(trained_like(False, False), "int4")


def test_serve_quantize_int8_answers_through_the_api(tmp_path):
    from fastapi.testclient import TestClient

    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_embd=32, n_head=2))
    d = save_model(tmp_path / "m", model, tok, meta={"stage": "test"})
    app = create_app(ServeSettings(models=[(None, d)], device="cpu", rate_limit_per_minute=0, quantize="int8",
                                   allowed_hosts=("testserver",)))
    with TestClient(app) as http:
        served = app.state.cf.model(None).engine.model
        assert is_quantized(served)
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "temperature": 0}).json()
        assert r["usage"]["completion_tokens"] + (r["choices"][0]["finish_reason"] == "stop") >= 1


def test_eval_perplexity_quantize_reports_both(tmp_path, capsys):
    tok = ByteTokenizer()
    model = trained_like(False, False, vocab=tok.vocab_size)
    d = save_model(tmp_path / "m", model, tok, meta={"stage": "test"})
    text = tmp_path / "t.txt"
    text.write_text("The parcel left the warehouse on Monday and arrives on Friday.\n" * 20)
    results = {}
    for q in ("none", "int8"):
        cli_main(["eval", "perplexity", str(d), "--text", str(text), "--device", "cpu", "--quantize", q, "--json"])
        results[q] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["int8"]["quantize"] == "int8" and results["none"]["quantize"] == "none"
    assert results["int8"]["val_tokens"] == results["none"]["val_tokens"]
    assert results["int8"]["val_loss"] == pytest.approx(results["none"]["val_loss"], rel=0.05)
