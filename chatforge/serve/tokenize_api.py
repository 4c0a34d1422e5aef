"""vLLM's tokenizer endpoints: ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.

Outside evaluation harnesses need the server's own tokenizer to find where a
context ends in the tokens they send: lm-evaluation-harness's ``local-completions``
uses its ``RemoteTokenizer`` (tokenizer_backend "remote", chosen automatically when
``/tokenizer_info`` and ``/tokenize`` answer) and then sends token-id prompts to
``/v1/completions`` with ``echo`` and ``logprobs``. The paths sit at the server root,
beside ``/v1``, as in vLLM (lm-eval strips ``/v1/completions`` from its base URL).

``/tokenize`` ``{"prompt": str, "add_special_tokens": bool = true, "model"?}`` ->
``{"tokens", "count", "max_model_len"}``; ``add_special_tokens`` puts BOS first (as text
prompts to ``/v1/completions`` get it). A prompt that is exactly one special token's
name (``<|bos|>``) gives that token's id, as Hugging Face tokenizers do, so clients
can look the ids of ``bos_token``/``eos_token`` up; anywhere else special-token text
is ordinary bytes, as everywhere in chatforge.
``/detokenize`` ``{"tokens": [int]}`` -> ``{"prompt"}``.
``/tokenizer_info`` -> ``{"bos_token", "eos_token", "pad_token", their ids, "vocab_size",
"model_max_length", "chat_template": null}``. Guarded like ``/v1`` (API keys, rate limits).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from chatforge.serve.fields import get_bool
from chatforge.serve.openai_api import _body, _model, bad_request, guard
from chatforge.serve.state import ServeState

tokenizer_router = APIRouter(dependencies=[Depends(guard)])


@tokenizer_router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    state: ServeState = request.app.state.cf
    body = await _body(request)
    served = _model(state, body)
    tok = served.engine.tokenizer
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise bad_request("prompt: must be a string", param="prompt")
    special = tok.special_tokens
    if prompt in special:
        ids = [special[prompt]]
    else:
        add = get_bool(body, "add_special_tokens", default=True)
        ids = ([tok.bos_id] if add else []) + tok.encode(prompt)
    return {"tokens": ids, "count": len(ids), "max_model_len": served.context}


@tokenizer_router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    state: ServeState = request.app.state.cf
    body = await _body(request)
    tok = _model(state, body).engine.tokenizer
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                            and 0 <= t < tok.vocab_size for t in ids):
        raise bad_request(f"tokens: must be a list of token ids in [0, {tok.vocab_size})", param="tokens")
    return {"prompt": tok.decode(ids)}


@tokenizer_router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    state: ServeState = request.app.state.cf
    name = request.query_params.get("model")
    served = _model(state, {"model": name} if name else {})
    tok = served.engine.tokenizer
    names = {i: n for n, i in tok.special_tokens.items()}
    return {"bos_token": names[tok.bos_id], "bos_token_id": tok.bos_id,
            "eos_token": names[tok.end_id], "eos_token_id": tok.end_id,
            "pad_token": names[tok.pad_id], "pad_token_id": tok.pad_id,
            "vocab_size": tok.vocab_size, "model_max_length": served.context, "chat_template": None}
