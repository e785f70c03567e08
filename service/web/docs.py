"""The API's documentation: the OpenAPI document, and Swagger UI at /docs served from here.

Routes parse their JSON bodies themselves (orjson + numpy), so FastAPI cannot see the request
models: `request_body` documents a route's body by reference, and `install_openapi` adds the
models to the document's components.

FastAPI's default /docs page loads Swagger UI from jsDelivr, so it is blank offline and in a
container without internet. This is FastAPI's self-hosting recipe: the page from
get_swagger_ui_html, its script and stylesheet from a local static mount. ReDoc is not served
(it has no packaged bundle); /openapi.json is the schema for any other viewer.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"


def install_docs(app: FastAPI) -> None:
    """Serve Swagger UI at /docs with its files under /docs/assets (FastAPI(docs_url=None))."""
    app.mount(ASSETS_URL, StaticFiles(directory=swagger_ui_path), name="swagger-ui")
    redirect_url = app.swagger_ui_oauth2_redirect_url or DOCS_URL + "/oauth2-redirect"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"),
            title=f"{app.title} - API docs",
            oauth2_redirect_url=root + redirect_url,
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon-32x32.png",
            # validatorUrl null: Swagger UI would otherwise ask validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": False},
        )

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()


def example_config(example: dict[str, Any], **config: Any) -> ConfigDict:
    """A model's config whose JSON schema shows `example` (Swagger UI fills requests with it)."""
    return ConfigDict(json_schema_extra={"examples": [example]}, **config)  # type: ignore[typeddict-item]


def request_body(*models: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra documenting a JSON body of `model` (or of one of several) by reference
    (components added by install_openapi)."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in models]
    schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def add_component_schemas(openapi: dict[str, Any], models: tuple[type[BaseModel], ...]) -> None:
    """Put `models` and the models they use into the OpenAPI components."""
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model.__name__] = schema


def install_openapi(app: FastAPI, models: tuple[type[BaseModel], ...], keys: bool) -> None:
    """The app's OpenAPI document, with `models` in its components; built once, on demand.

    keys: whether the service was started with API keys; without, {} (no credentials) is an
    accepted alternative to the bearer scheme on every guarded operation.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            add_component_schemas(schema, models)
            if not keys:
                for operations in schema["paths"].values():
                    for op in operations.values():
                        if isinstance(op, dict) and "security" in op:
                            op["security"].append({})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
