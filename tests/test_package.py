"""The package as a whole: what each entry point loads, no import cycles, one version everywhere.

The layer rules themselves are import-linter contracts in pyproject.toml (`make lint`); these
tests check what those cannot: what really gets imported at run time, in a fresh interpreter.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import grimp

from service import _native
from tests.support.http import app_client

WEB_AND_PLOTTING = ("fastapi", "starlette", "uvicorn", "matplotlib", "PIL")
# Array libraries the service reads but never needs: loaded only by a caller passing their arrays.
ARRAY_LIBRARIES = ("torch", "tensorflow", "keras", "jax", "jaxlib", "ml_dtypes")
# What a thin client (numpy and httpx installed, nothing else of the service's) does not have.
NOT_IN_A_THIN_CLIENT = (
    *WEB_AND_PLOTTING,
    "pydantic",
    "pydantic_core",
    "pybase64",
    "orjson",
    "simdjson",
    "prometheus_client",
    "threadpoolctl",
    "torch",
    "service._native",
)


def _run(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON document."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_client_needs_neither_the_extension_nor_the_server_dependencies() -> None:
    """`import service.client` in an interpreter where the extension and everything but numpy
    and httpx are missing; a round trip through it encodes and decodes tensors."""
    found = _run(
        f"""
        import importlib.abc, json, sys

        BLOCKED = {NOT_IN_A_THIN_CLIENT!r}

        class Missing(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name in BLOCKED or name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, Missing())
        import httpx
        import numpy as np
        from service.client import AttentionClient

        q = np.arange(6, dtype=np.float32).reshape(2, 3)

        def answer(request):  # a server that returns q as the output
            sent = json.loads(request.content)
            return httpx.Response(200, json={{"output": sent["q"], "meta": {{}}}})

        with AttentionClient(transport=httpx.MockTransport(answer)) as client:
            res = client.attention(q, q, q)
        assert res.output.dtype == np.float32 and (res.output == q).all()
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED
                                or m == "service._native")))
        """
    )
    assert found == []


def test_running_the_python_api_loads_no_web_framework_server_plotting_or_array_library() -> None:
    loaded = _run(
        f"""
        import json, sys
        import numpy as np
        import service

        q = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
        service.attention(q, q, q, causal=True, return_weights=True, mask=q[0, :, :5] > 0,
                          key_lengths=np.array([3]))
        service.attention(q, q, q, method="performer", compare=True)
        w = service.init_multihead_weights(8, 2)
        service.multihead_attention(q, num_heads=2, need_weights=True,
                                    weights={{"q_proj": w.q_proj, "k_proj": w.k_proj,
                                             "v_proj": w.v_proj, "out_proj": w.out_proj}})
        service.attention_map(q, q, q, bins=2, top_k=2)
        from service.core.tokens import self_attention
        self_attention(["a", "b"], d_model=8, num_heads=2, num_kv_heads=None,
                       positional="rope", seed=0, weights=None,
                       masking=service.MaskingOptions())
        names = {WEB_AND_PLOTTING + ARRAY_LIBRARIES!r}
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in names)))
        """
    )
    assert loaded == []


def test_importing_the_package_loads_nothing_until_used() -> None:
    loaded = _run(
        """
        import json, sys
        import service
        before = "service._native" in sys.modules or "numpy" in sys.modules
        service.InputError
        print(json.dumps([before, "service._native" in sys.modules]))
        """
    )
    assert loaded == [False, False]  # errors need neither numpy nor the extension


def test_no_import_cycles_late_imports_included() -> None:
    """Module by module, every import statement (in functions too) counts; imports only a type
    checker sees (`if TYPE_CHECKING:`, as in service/__init__.py) never run, so they do not.
    The extension has no Python source, so importing it shows as importing `service`."""
    graph = grimp.build_graph("service", exclude_type_checking_imports=True)
    modules = sorted(graph.modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    assert len(modules) > 50  # the whole package was read
    assert cycles == []


def test_one_version_everywhere(tmp_path: Path) -> None:
    """pyproject.toml's version, through the package metadata: the package, the extension
    (built with it), /readyz, the OpenAPI document and /v2's server metadata."""
    import service

    version = importlib.metadata.version("attention-service")
    assert service.__version__ == version
    assert getattr(_native, "__version__", None) == version, (
        "service._native.__version__ is missing or differs: rebuild the extension (make build)"
    )
    assert _native.version() == version
    with app_client(tmp_path) as client:
        ready = client.get("/readyz").json()
        assert ready["version"] == ready["native"]["version"] == version
        assert client.get("/openapi.json").json()["info"]["version"] == version
        assert client.get("/v2").json()["version"] == version
