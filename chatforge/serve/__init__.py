"""Serving: a continuous-batching engine behind an OpenAI-compatible API and the feedback web app.

    engine.py      Engine / SamplingParams / GenerationHandle: many requests share each decode step
    state.py       ServeSettings / ServeState / ServedModel / APIError: what every part below shares
    limits.py      RateLimiter (request and token buckets) / FailureThrottle (back-off on failed logins, keys)
    fields.py      the one JSON body parser (content type, nesting limit) and request-field checks
    openai_api.py  /v1/models, /v1/chat/completions, /v1/completions in OpenAI's exact shapes
    web.py         the /api router and pages of the human-feedback web app (mounted with a database)
    docs.py        /docs (Swagger UI from this machine), only with --docs
    app.py         create_app(): composes the two routers; models, engines, Host allow-list, body limit, access log
    cli.py         `chatforge serve [MODEL ...]`

The routers depend on state/fields/limits and never on each other or on app.py
(tests/test_serve_layering.py reads the imports and checks the graph has no cycle).

The web framework is imported only by the modules that need it, so the engine
works in scripts and notebooks without FastAPI.
"""

from typing import Any

__all__ = ["Engine", "GenerationHandle", "PromptTooLong", "QueueFull", "SamplingParams", "TokenEvent"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `chatforge --help` (which imports serve.cli) does not load torch.
    if name in __all__:
        from chatforge.serve import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'chatforge.serve' has no attribute {name!r}")
