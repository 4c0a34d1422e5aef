"""``/docs``: Swagger UI for the server's OpenAPI schema, served from this machine (``--docs``).

Off by default: the schema tells a visitor every route and field. When asked for, the
page loads nothing from other origins: Swagger UI's two files (a 5.x build, which reads
the OpenAPI 3.1 schema FastAPI writes) come from the installed ``fastapi-offline``
package (``pip install 'chatforge[docs]'``; only its files are used, not its app, whose
page has an inline script), the start-up script is our own file, and the page's
Content-Security-Policy allows only this origin (Swagger UI styles its widgets with
inline styles, so styles also allow ``'unsafe-inline'``; scripts never do).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

from chatforge.errors import ChatforgeError

STATIC_DIR = Path(__file__).parent / "static"
DOCS_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css")


def swagger_ui_dir() -> Path:
    """The directory holding Swagger UI's ``SWAGGER_FILES`` (from the ``fastapi-offline`` package)."""
    try:
        import fastapi_offline
    except ImportError:
        raise ChatforgeError("--docs needs Swagger UI's files from the fastapi-offline package: "
                             "pip install 'chatforge[docs]' (or serve without --docs)") from None
    directory = Path(fastapi_offline.__file__).parent / "static"
    missing = [name for name in SWAGGER_FILES if not (directory / name).is_file()]
    if missing:
        raise ChatforgeError(f"--docs: {directory} lacks {', '.join(missing)}; reinstall fastapi-offline")
    return directory


def mount_docs(app: FastAPI) -> None:
    """``GET /docs`` (the page), ``/docs/init.js`` (its start-up script), ``/docs/assets/*`` (Swagger UI's files)."""
    assets = swagger_ui_dir()
    headers = {"Content-Security-Policy": DOCS_CSP, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "same-origin"}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(STATIC_DIR / "docs.html", media_type="text/html", headers=headers)

    @app.get("/docs/init.js", include_in_schema=False)
    async def docs_init() -> FileResponse:
        return FileResponse(STATIC_DIR / "docs.js", media_type="text/javascript", headers=headers)

    def asset(name: str) -> Callable[[], Awaitable[FileResponse]]:  # only Swagger UI's two files, not everything in that package directory
        async def serve() -> FileResponse:
            return FileResponse(assets / name, headers={"X-Content-Type-Options": "nosniff"})
        serve.__name__ = f"docs_{name.replace('-', '_').replace('.', '_')}"
        return serve

    for name in SWAGGER_FILES:
        app.add_api_route(f"/docs/assets/{name}", asset(name), methods=["GET"], include_in_schema=False)
