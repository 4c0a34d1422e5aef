"""``/docs``: Swagger UI for the server's OpenAPI schema, served from this machine (``--docs``).

Off by default: the schema tells a visitor every route and field. When asked for, the
page loads nothing from other origins: Swagger UI's files come from the installed
``swagger-ui-bundle`` package (``pip install 'chatforge[docs]'``), its start-up script
is our own file (no inline script), and the page's Content-Security-Policy allows only
this origin (Swagger UI styles its widgets with inline styles, so styles also allow
``'unsafe-inline'``; scripts never do).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from chatforge.errors import ChatforgeError

STATIC_DIR = Path(__file__).parent / "static"
DOCS_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def swagger_ui_dir() -> Path:
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        raise ChatforgeError("--docs needs Swagger UI's files from the swagger-ui-bundle package: "
                             "pip install 'chatforge[docs]' (or serve without --docs)") from None
    return Path(str(swagger_ui_path))


def mount_docs(app: FastAPI) -> None:
    """``GET /docs`` (the page), ``/docs/init.js`` (its start-up script), ``/docs/assets/*`` (Swagger UI)."""
    assets = swagger_ui_dir()
    headers = {"Content-Security-Policy": DOCS_CSP, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "same-origin"}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(STATIC_DIR / "docs.html", media_type="text/html", headers=headers)

    @app.get("/docs/init.js", include_in_schema=False)
    async def docs_init() -> FileResponse:
        return FileResponse(STATIC_DIR / "docs.js", media_type="text/javascript", headers=headers)

    app.mount("/docs/assets", StaticFiles(directory=assets), name="docs-assets")
