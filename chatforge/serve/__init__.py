"""Serving: a continuous-batching engine behind an OpenAI-compatible API and the feedback web app.

    engine.py      Engine / SamplingParams / GenerationHandle: many requests share each decode step
    openai_api.py  /v1/models, /v1/chat/completions, /v1/completions in OpenAI's exact shapes
    app.py         ServeSettings / ServeState / create_app(): models, engines, limits, access log
    cli.py         `chatforge serve [MODEL ...]`
    web.py         the /api router and pages of the human-feedback web app (mounted with a database)

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
