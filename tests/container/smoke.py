#!/usr/bin/env python3
"""Container smoke test: build the image, run it as docker-compose.yml does, use it, clean up.

Run by `make container-test`. Standard library only, so it runs on the host's python3.

Engines: `docker` when its daemon answers; otherwise buildah (build, `--isolation chroot`) plus
podman (run), installed with apt-get when missing. When the base image is absent and no daemon
can pull it, ../shared/tools/make-base-image builds a stand-in from Debian's packages.

Checks: the container becomes ready, a real attention request (checked against a pure-Python
reference) returns a heatmap whose PNG is fetched through the published port, from this
replica and from a second one sharing the heatmap volume; the image's own HEALTHCHECK passes;
no process runs as root; the root filesystem is read-only; the image holds no compiler, no
torch, no pip and no sources or tests; every ATTN_ variable in docker-compose.yml is a real
setting with the service's default. Then `docker compose up` / `podman-compose up` runs the
compose file itself (when a compose tool is available) with three replicas of the service and its
Redis: the README's curls run against one, a heatmap made by one is served by the others, a
memory session opened on one is continued on each, and ATTN_RATE_LIMIT is one budget across the
three.
Prints image size, size over the base image, build time and time from start to ready.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MAKE_BASE_IMAGE = REPO.parent / "shared" / "tools" / "make-base-image"
DEFAULT_BASE = "python:3.11-slim-bookworm"
DEFAULT_TAG = "attention-service:latest"
HEATMAP_DIR = "/var/lib/attention/heatmaps"
VENV_PY = "/opt/venv/bin/python"
READY_TIMEOUT_S = 90.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEFAULT_REDIS = "redis:7-bookworm"  # docker-compose.yml's default
STANDIN_REDIS = "localhost/attention-redis-standin:7-bookworm"
COMPOSE_REPLICAS = 3
COMPOSE_RATE_LIMIT = 10
# A stand-in for the official Redis image where no registry is reachable: Debian's redis-server
# (7.0 on bookworm) on the base image, run as its own user, data in /data.
REDIS_STANDIN_FILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \\
 && rm -rf /var/lib/apt/lists/* \\
 && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
"""


class SmokeError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[container-test] {msg}", flush=True)


def run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    quiet: bool = False,
    timeout: float = 1800,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    if not quiet:
        log("$ " + " ".join(cmd))
    proc = subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    if check and proc.returncode != 0:
        raise SmokeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def apt_install(packages: list[str]) -> None:
    missing = [p for p in packages if not have(p)]
    if not missing:
        return
    if os.geteuid() != 0 or not have("apt-get"):
        raise SmokeError(f"{', '.join(missing)} missing; cannot install (not root, or no apt-get)")
    log(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", *missing], env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(
    method: str, url: str, body: Any = None, timeout: float = 30
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


# ---------------------------------------------------------------------------------------------
# Engines: one interface over docker and buildah+podman.


def _bare_id(image_id: str) -> str:
    # `images -q --no-trunc` says sha256:<hex>, `inspect {{.Id}}` (podman) only <hex>.
    return image_id.strip().removeprefix("sha256:")


class Engine:
    name = ""
    cli: list[str] = []

    def __init__(self) -> None:
        self.containers: list[str] = []
        self.volumes: list[str] = []

    def c(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return run([*self.cli, *args], **kw)

    def image_exists(self, ref: str) -> bool:
        return self.c("image", "inspect", ref, check=False, quiet=True).returncode == 0

    def image_id(self, ref: str) -> str | None:
        p = self.c("image", "inspect", "--format", "{{.Id}}", ref, check=False, quiet=True)
        return _bare_id(p.stdout) if p.returncode == 0 and p.stdout.strip() else None

    def image_size(self, ref: str) -> int:
        return int(self.c("image", "inspect", "--format", "{{.Size}}", ref, quiet=True).stdout)

    def image_config(self, ref: str) -> dict[str, Any]:
        out = self.c("image", "inspect", ref, quiet=True).stdout
        data = json.loads(out)[0]
        return data.get("Config") or data.get("config") or {}

    def ensure_base(self, base: str) -> None:
        raise NotImplementedError

    def build_cmd(self, tag: str, base: str, no_cache: bool) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def all_images(self, *filters: str) -> set[str]:
        args = ["images", "-a", "-q", "--no-trunc", *(f"--filter={f}" for f in filters)]
        return {_bare_id(i) for i in self.c(*args, quiet=True).stdout.split()}

    def build(self, tag: str, base: str, no_cache: bool, log_path: Path) -> float:
        """Builds the image; returns seconds. Removes what the build leaves dangling."""
        before = self.all_images()
        old_id = self.image_id(tag)
        cmd, env = self.build_cmd(tag, base, no_cache)
        log("$ " + " ".join(cmd) + f"  (output: {log_path})")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(log_path, "w") as out:
            code = subprocess.call(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        seconds = time.monotonic() - t0
        if code != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
            raise SmokeError(f"build exited {code}; last lines of {log_path}:\n{tail}")
        # The previous build of the tag and this build's intermediate stages are now dangling
        # (untagged, unused): remove them, with their parent layers, so images do not pile up.
        # Images that existed before this build and are not ours are left alone.
        stale = self.all_images("dangling=true") - (before - ({old_id} if old_id else set()))
        for image in stale:
            self.c("rmi", image, check=False, quiet=True)
        return seconds

    def run_args(self) -> list[str]:
        return []

    def start(self, name: str, image: str, port: int, volume: str, env: dict[str, str]) -> str:
        # The same container settings as docker-compose.yml: read-only root, tmpfs /tmp,
        # the heatmap volume, resource limits, an init process.
        args = [
            "run",
            "-d",
            "--name",
            name,
            "--init",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "-v",
            f"{volume}:{HEATMAP_DIR}",
            "-p",
            f"127.0.0.1:{port}:8000",
            "--memory",
            "1g",
            "--cpus",
            "2",
            *self.run_args(),
        ]
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        self.containers.append(name)
        self.c(*args, image)
        return name

    def healthcheck(self, name: str) -> None:
        raise NotImplementedError

    def exec_py(self, name: str, code: str) -> str:
        return self.c("exec", name, VENV_PY, "-c", code, quiet=True).stdout

    def logs(self, name: str) -> str:
        p = self.c("logs", name, check=False, quiet=True)
        return p.stdout + p.stderr

    def running(self, name: str) -> bool:
        p = self.c("inspect", "--format", "{{.State.Running}}", name, check=False, quiet=True)
        return p.stdout.strip() == "true"

    def cleanup(self) -> None:
        self.remove_started()

    def remove_started(self) -> None:
        """Removes the containers and volumes this run started."""
        for name in reversed(self.containers):
            self.c("rm", "-f", "-v", name, check=False, quiet=True)
        for vol in self.volumes:
            self.c("volume", "rm", "-f", vol, check=False, quiet=True)
        self.containers.clear()
        self.volumes.clear()

    def compose_cmd(self) -> list[str] | None:
        return None

    def redis_image(self, base: str) -> str:
        """The Redis image for the compose file's redis service."""
        return DEFAULT_REDIS

    def port(self, name: str, container_port: int) -> int:
        """The host port published for container_port (the first mapping)."""
        out = self.c("port", name, str(container_port), quiet=True).stdout.split()
        if not out:
            raise SmokeError(f"{name} publishes no port for {container_port}")
        return int(out[0].rsplit(":", 1)[1])


class Docker(Engine):
    name = "docker"
    cli = ["docker"]

    @staticmethod
    def available() -> bool:
        return have("docker") and run(["docker", "info"], check=False, quiet=True).returncode == 0

    def ensure_base(self, base: str) -> None:
        if not self.image_exists(base):
            self.c("pull", base)

    def build_cmd(self, tag: str, base: str, no_cache: bool) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ, DOCKER_BUILDKIT="1")  # RUN --mount needs BuildKit
        cmd = ["docker", "build", "--build-arg", f"BASE_IMAGE={base}", "-t", tag]
        if no_cache:
            cmd.append("--no-cache")
        return [*cmd, str(REPO)], env

    def healthcheck(self, name: str) -> None:
        # Docker runs the image's HEALTHCHECK itself; wait for its verdict.
        deadline = time.monotonic() + 60
        status = ""
        while time.monotonic() < deadline:
            status = self.c(
                "inspect", "--format", "{{.State.Health.Status}}", name, quiet=True
            ).stdout.strip()
            if status == "healthy":
                return
            if status == "unhealthy":
                break
            time.sleep(0.5)
        raise SmokeError(f"docker reports the container {status or 'without health'}")

    def compose_cmd(self) -> list[str] | None:
        if run(["docker", "compose", "version"], check=False, quiet=True).returncode == 0:
            return ["docker", "compose"]
        return None


class Podman(Engine):
    """buildah builds, podman runs (both share containers/storage)."""

    name = "buildah+podman"

    def __init__(self) -> None:
        super().__init__()
        self.cli = ["podman"]
        self.env: dict[str, str] | None = None
        self._conf_dir: str | None = None

    def c(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        kw.setdefault("env", self.env)
        return run([*self.cli, *args], **kw)

    def ensure_base(self, base: str) -> None:
        if self.image_exists(base):
            return
        if not MAKE_BASE_IMAGE.exists():
            raise SmokeError(f"{base} is not present and {MAKE_BASE_IMAGE} is missing")
        log(f"{base} not present: building a stand-in with {MAKE_BASE_IMAGE}")
        tag = base if "/" in base.split(":")[0] else f"docker.io/library/{base}"
        run([str(MAKE_BASE_IMAGE), tag], timeout=1800)

    def configure(self, base: str) -> None:
        """Find podman settings under which a container starts on this machine.

        Sandboxes often lack CAP_SYS_RESOURCE (podman's default rlimits cannot be set) or
        mount cgroups in hybrid mode (crun refuses it; runc copes). Defaults are tried first.
        """
        probe = ["run", "--rm", "--network", "none", base, "true"]
        first = self.c(*probe, check=False, quiet=True)
        if first.returncode == 0:
            return
        import resource

        nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)
        self._conf_dir = tempfile.mkdtemp(prefix="attention-smoke-")
        conf = Path(self._conf_dir) / "containers.conf"
        lines = [
            "[containers]",
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=4096:4096"]',
            "[engine]",
            'cgroup_manager = "cgroupfs"',
            'events_logger = "file"',
        ]
        if have("runc"):
            lines.append('runtime = "runc"')
        conf.write_text("\n".join(lines) + "\n")
        self.env = dict(os.environ, CONTAINERS_CONF=str(conf))
        second = self.c(*probe, check=False, quiet=True)
        if second.returncode != 0:
            raise SmokeError(
                "podman cannot start a container here:\n"
                f"defaults: {first.stderr.strip()}\n"
                f"with {conf}: {second.stderr.strip()}"
            )
        log(f"podman needs {conf} here: {first.stderr.strip().splitlines()[-1]}")
        log("  " + " | ".join(lines))

    def build_cmd(self, tag: str, base: str, no_cache: bool) -> tuple[list[str], dict[str, str]]:
        cmd = [
            "buildah",
            "bud",
            "--isolation",
            "chroot",
            "--pull=never",
            "--format",
            "docker",
            "--layers",
            "--build-arg",
            f"BASE_IMAGE={base}",
            "-t",
            tag,
        ]
        if no_cache:
            cmd.append("--no-cache")
        if Path("/etc/ssl/certs").is_dir():
            # Behind a TLS-intercepting proxy, RUN steps need the host's CA bundle.
            cmd += ["-v", "/etc/ssl/certs:/etc/ssl/certs:ro"]
        return [*cmd, str(REPO)], self.env or dict(os.environ)

    def healthcheck(self, name: str) -> None:
        # Runs the image's HEALTHCHECK command once (podman has no timer without systemd).
        p = self.c("healthcheck", "run", name, check=False, quiet=True)
        if p.returncode != 0:
            raise SmokeError(f"podman healthcheck run: {p.returncode} {p.stdout}{p.stderr}")

    def compose_cmd(self) -> list[str] | None:
        try:
            apt_install(["podman-compose"])
        except SmokeError as e:
            log(f"no compose tool: {e}")
            return None
        return ["podman-compose"]

    def redis_image(self, base: str) -> str:
        """The official image when present, else a stand-in built from Debian's package."""
        for ref in (DEFAULT_REDIS, f"docker.io/library/{DEFAULT_REDIS}", STANDIN_REDIS):
            if self.image_exists(ref):
                return ref
        log(f"{DEFAULT_REDIS} not present: building {STANDIN_REDIS} from Debian's redis-server")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "Containerfile").write_text(REDIS_STANDIN_FILE)
            cmd = [
                "buildah", "bud", "--isolation", "chroot", "--pull=never", "--format", "docker",
                "--build-arg", f"BASE_IMAGE={base}", "-t", STANDIN_REDIS,
                "-f", str(Path(tmp) / "Containerfile"),
            ]  # fmt: skip
            if Path("/etc/ssl/certs").is_dir():
                cmd += ["-v", "/etc/ssl/certs:/etc/ssl/certs:ro"]
            run([*cmd, tmp], env=self.env or dict(os.environ), timeout=900)
        return STANDIN_REDIS

    def cleanup(self) -> None:
        super().cleanup()
        if self._conf_dir:
            shutil.rmtree(self._conf_dir, ignore_errors=True)


def pick_engine(base: str) -> Engine:
    if Docker.available():
        engine: Engine = Docker()
    else:
        apt_install(["buildah", "podman", "runc"])
        engine = Podman()
    log(f"engine: {engine.name}")
    engine.ensure_base(base)
    if isinstance(engine, Podman):
        engine.configure(base)
    return engine


# ---------------------------------------------------------------------------------------------
# What the service must do.


def reference_attention(
    q: list[list[float]], k: list[list[float]], v: list[list[float]]
) -> list[list[float]]:
    """softmax(q k^T / sqrt(d)) v in plain float64 Python: independent of numpy and the kernel."""
    scale = 1.0 / math.sqrt(len(q[0]))
    out = []
    for qi in q:
        s = [scale * sum(a * b for a, b in zip(qi, kj, strict=True)) for kj in k]
        m = max(s)
        w = [math.exp(x - m) for x in s]
        z = sum(w)
        out.append([sum(w[j] * v[j][c] for j in range(len(v))) / z for c in range(len(v[0]))])
    return out


def png_size(data: bytes) -> tuple[int, int]:
    if not data.startswith(PNG_MAGIC) or data[12:16] != b"IHDR":
        raise SmokeError(f"not a PNG: {data[:16]!r}")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def wait_ready(engine: Engine, name: str, port: int, t0: float) -> float:
    """Seconds from t0 until GET /readyz answers 200 through the published port."""
    url = f"http://127.0.0.1:{port}/readyz"
    deadline = t0 + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            status, _, _ = http("GET", url, timeout=1)
            if status == 200:
                return time.monotonic() - t0
        except (OSError, urllib.error.URLError):
            pass
        if not engine.running(name):
            raise SmokeError(f"container {name} exited before it was ready")
        time.sleep(0.05)
    raise SmokeError(f"{name} not ready after {READY_TIMEOUT_S:.0f} s")


def check_packaged(base_url: str) -> None:
    """The wheel carried the viewer's static files, and one version shows everywhere."""
    for path, kind in (("/", "text/html"), ("/static/viewer.js", "text/javascript")):
        status, headers, _ = http("GET", base_url + path)
        if status != 200 or not headers.get("content-type", "").startswith(kind):
            raise SmokeError(f"GET {path} -> {status} {headers.get('content-type')}")
    ready = json.loads(http("GET", base_url + "/readyz")[2])
    api = json.loads(http("GET", base_url + "/openapi.json")[2])["info"]["version"]
    if not ready["version"] == ready["native"]["version"] == api:
        raise SmokeError(f"versions differ: /readyz {ready}, OpenAPI {api}")
    log(f"ok: the viewer and its static files are served; version {api} everywhere")


def attention_request(base_url: str) -> tuple[str, bytes]:
    """POST a real request with a heatmap; check the numbers; return the PNG's URL and bytes."""
    rng = random.Random(5)

    def mat(rows: int, cols: int) -> list[list[float]]:
        return [[round(rng.uniform(-1, 1), 4) for _ in range(cols)] for _ in range(rows)]

    q, k, v = mat(5, 8), mat(7, 8), mat(7, 4)
    status, headers, body = http(
        "POST", f"{base_url}/v1/attention", {"q": q, "k": k, "v": v, "heatmap": True}
    )
    if status != 200:
        raise SmokeError(f"POST /v1/attention -> {status}: {body[:2000]!r}")
    resp = json.loads(body)
    want = reference_attention(q, k, v)
    got = resp["output"]
    err = max(
        abs(g - w) for gr, wr in zip(got, want, strict=True) for g, w in zip(gr, wr, strict=True)
    )
    if len(got) != len(want) or err > 1e-4:
        raise SmokeError(f"output differs from the reference by {err}")
    heatmaps = resp.get("heatmaps") or []
    if not heatmaps or not heatmaps[0].get("url"):
        raise SmokeError(f"no heatmap in the response: {resp.get('heatmaps')!r}")
    url = urllib.request.urljoin(base_url + "/", heatmaps[0]["url"])
    status, headers, png = http("GET", url)
    if status != 200 or headers.get("content-type", "").split(";")[0] != "image/png":
        raise SmokeError(f"GET {url} -> {status} {headers.get('content-type')}")
    w, h = png_size(png)
    log(
        f"ok: attention output matches the reference (max error {err:.1e}); "
        f"heatmap {heatmaps[0]['id']} is a {w}x{h} PNG of {len(png)} bytes"
    )
    return heatmaps[0]["url"], png


def model_request(base_url: str) -> None:
    """The image carries the real model (the default build): /v1/models says so, and a sentence
    runs through its 6 layers x 12 heads with the pictures as PNG and SVG."""
    status, _, body = http("GET", f"{base_url}/v1/models")
    models = {m["name"]: m for m in json.loads(body)["models"]} if status == 200 else {}
    if not models.get("minilm-l6", {}).get("installed"):
        raise SmokeError(f"GET /v1/models -> {status}: {body[:500]!r}")
    status, _, body = http(
        "POST",
        f"{base_url}/v1/tokens",
        {"model": "minilm-l6", "text": "The cat sat.", "heatmap": {"views": ["model"]}},
        timeout=120,
    )
    if status != 200:
        raise SmokeError(f"POST /v1/tokens with the model -> {status}: {body[:2000]!r}")
    resp = json.loads(body)
    if resp["tokens"] != ["[CLS]", "the", "cat", "sat", ".", "[SEP]"]:
        raise SmokeError(f"unexpected wordpieces {resp['tokens']}")
    rows = [row for layer in resp["weights"] for head in layer for row in head]
    norm = math.sqrt(sum(x * x for x in resp["embedding"]))
    if len(rows) != 6 * 12 * 6 or any(abs(sum(r) - 1) > 1e-4 for r in rows) or abs(norm - 1) > 1e-4:
        raise SmokeError("the model's weights or embedding are not what they must be")
    svg_url = urllib.request.urljoin(base_url + "/", resp["heatmaps"][0]["svg_url"])
    status, headers, svg = http("GET", svg_url)
    if status != 200 or headers.get("content-type") != "image/svg+xml" or b"<svg" not in svg:
        raise SmokeError(f"GET {svg_url} -> {status} {headers.get('content-type')}")
    log(
        "ok: the image serves minilm-l6: 6 layers x 12 heads of weights, a unit embedding, "
        f"the model view as PNG and SVG ({resp['meta']['elapsed_ms']:.0f} ms)"
    )


IMAGE_AUDIT = r"""
import importlib.util, json, os, shutil
print(json.dumps({
    "tools": [t for t in ("gcc", "cc", "g++", "c++", "clang", "cpp", "make", "cmake", "ninja", "ld")
              if shutil.which(t)],
    "torch": importlib.util.find_spec("torch") is not None,
    "pip": os.path.exists("/opt/venv/bin/pip"),
    "sources": [p for p in ("/src", "/wheels", "/opt/build", "/tests") if os.path.exists(p)],
    "native": importlib.util.find_spec("service._native") is not None,
}))
"""

PROC_UIDS = r"""
import json, os
uids = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        lines = open(f"/proc/{pid}/status").read().splitlines()
    except OSError:
        continue
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    uids[fields["Name"].strip() + "/" + pid] = [int(x) for x in fields["Uid"].split()]
print(json.dumps(uids))
"""

READ_ONLY = r"""
import errno
for path in ("/opt/venv/probe", "/probe"):
    try:
        open(path, "w").close()
        raise SystemExit(f"{path} is writable")
    except OSError as e:
        assert e.errno in (errno.EROFS, errno.EACCES), e
print("read-only")
"""

SETTINGS_DEFAULTS = r"""
import json
from pydantic_core import PydanticUndefined
from service.web.settings import Settings
print(json.dumps({name: (None if f.default is PydanticUndefined else f.default)
                  for name, f in Settings.model_fields.items()}, default=str))
"""
# Compose defaults that differ from the service's on purpose (see the comment in the file).
COMPOSE_OWN_DEFAULTS = {"max_concurrency", "redis_url"}


def check_container(engine: Engine, name: str, image: str) -> None:
    cfg = engine.image_config(image)
    user = cfg.get("User") or ""
    if user.split(":")[0] in ("", "0", "root"):
        raise SmokeError(f"image runs as {user or 'root (no USER)'}")
    uids = json.loads(engine.exec_py(name, PROC_UIDS))
    rooted = {p: u for p, u in uids.items() if 0 in u}
    if rooted:
        raise SmokeError(f"processes running as root: {rooted}")
    log(f"ok: no process runs as root (image USER {user}; {', '.join(sorted(uids))})")

    audit = json.loads(engine.exec_py(name, IMAGE_AUDIT))
    if audit["tools"] or audit["torch"] or audit["pip"] or audit["sources"] or not audit["native"]:
        raise SmokeError(
            f"runtime image holds what it should not (or lacks the extension): {audit}"
        )
    log(
        "ok: no compiler or build tool, no torch, no pip, no sources in the image; "
        "service._native present"
    )

    if engine.exec_py(name, READ_ONLY).strip() != "read-only":
        raise SmokeError("root filesystem is writable")
    log("ok: root filesystem is read-only; the service writes only to its volume and /tmp")

    engine.healthcheck(name)
    log("ok: the image's HEALTHCHECK passes inside the container")

    check_compose_settings(json.loads(engine.exec_py(name, SETTINGS_DEFAULTS)))


def check_compose_settings(defaults: dict[str, Any]) -> None:
    """docker-compose.yml sets only real settings, with the service's own defaults."""
    text = (REPO / "docker-compose.yml").read_text()
    # An empty value passes the variable on from the shell (unset: the service's default).
    values = dict(re.findall(r"^[ \t]+ATTN_([A-Z0-9_]+):[ \t]*(.*?)[ \t]*$", text, re.M))
    problems = []
    for var, value in values.items():
        name = var.lower()
        if name not in defaults:
            problems.append(f"ATTN_{var} is not a setting")
            continue
        m = re.fullmatch(r"\$\{ATTN_" + var + r":-(.*)\}", value)
        want = defaults[name]
        if isinstance(want, bool):
            want_text = str(want).lower()
        elif isinstance(want, list):  # tuples of the settings, comma-separated in the env
            want_text = ",".join(map(str, want))
        else:
            want_text = str(want)
        if m and want is not None and name not in COMPOSE_OWN_DEFAULTS and m[1] != want_text:
            problems.append(f"ATTN_{var} defaults to {m[1]}, the service to {want}")
    if problems:
        raise SmokeError("docker-compose.yml: " + "; ".join(problems))
    missing = sorted(f"ATTN_{n.upper()}" for n in defaults if n.upper() not in values)
    log(f"ok: docker-compose.yml's {len(values)} ATTN_ variables are settings, with their defaults")
    if missing:
        log(f"note: settings not listed in docker-compose.yml: {', '.join(missing)}")


def containers(
    engine: Engine,
    project: str,
    env: dict[str, str],
    stopped: bool = False,
    service: str | None = None,
) -> list[str]:
    """Names of the compose project's containers (running ones, or all with `stopped`), of one
    service when given, in order."""
    flags = ["-a"] if stopped else []
    label = f"label=com.docker.compose.project={project}"
    filters = ["--filter", label]
    if service:
        filters += ["--filter", f"label=com.docker.compose.service={service}"]
    cmd = [*engine.cli, "ps", *flags, *filters, "--format", "{{.Names}}"]
    return sorted(run(cmd, env=env, quiet=True, check=not stopped).stdout.split())


def readme_curls(base_url: str) -> tuple[str, bytes]:
    """The README's two curls, verbatim apart from the port; returns the heatmap URL and PNG."""
    q, k, v = [[1, 0], [0, 1]], [[1, 0], [0, 1]], [[1, 2], [3, 4]]
    body = json.dumps({"q": q, "k": k, "v": v, "heatmap": True})
    if have("curl"):
        out = run(
            [
                "curl",
                "-sS",
                "-f",
                f"{base_url}/v1/attention",
                "-H",
                "Content-Type: application/json",
                "-d",
                body,
            ],
            quiet=True,
        ).stdout
        resp = json.loads(out)
        url = resp["heatmaps"][0]["url"]
        with tempfile.TemporaryDirectory() as tmp:
            png_path = Path(tmp) / "heatmap.png"
            run(["curl", "-sS", "-f", "-o", str(png_path), f"{base_url}{url}"], quiet=True)
            png = png_path.read_bytes()
    else:
        status, _, raw = http("POST", f"{base_url}/v1/attention", json.loads(body))
        resp = json.loads(raw)
        url = resp["heatmaps"][0]["url"]
        png = http("GET", f"{base_url}{url}")[2]
    want = reference_attention(q, k, v)
    err = max(
        abs(g - w)
        for gr, wr in zip(resp["output"], want, strict=True)
        for g, w in zip(gr, wr, strict=True)
    )
    if err > 1e-5:
        raise SmokeError(f"compose: README request answered {resp['output']}, want {want}")
    w, h = png_size(png)
    log(f"ok: the README's curls: output {resp['output']}; {url} is a {w}x{h} PNG")
    return url, png


def check_shared_state(urls: list[str], heatmap_url: str, png: bytes, used: int) -> None:
    """Replicas on one Redis: each serves the heatmap another made, and ATTN_RATE_LIMIT is one
    budget across them (`used` requests of it spent already)."""
    ids = set()
    for url in urls:
        ready = json.loads(http("GET", f"{url}/readyz")[2])
        if ready["store"].get("backend") != "redis":
            raise SmokeError(f"{url}: store is {ready['store']}, not Redis")
        ids.add(ready["replica"]["id"])
        status, _, got = http("GET", url + heatmap_url)
        if status != 200 or got != png:
            raise SmokeError(f"{url}: GET {heatmap_url} -> {status} ({len(got)} bytes)")
    if len(ids) != len(urls):
        raise SmokeError(f"replica ids are not distinct: {ids}")
    log(f"ok: {len(urls)} replicas on Redis (ids {sorted(ids)}) all serve the heatmap")
    body = {"q": [[1.0, 0.0]], "k": [[1.0, 0.0]], "v": [[1.0, 2.0]]}
    codes = []
    for i in range(COMPOSE_RATE_LIMIT - used + 1):
        codes.append(http("POST", f"{urls[(i + 1) % len(urls)]}/v1/attention", body)[0])
    want = [200] * (COMPOSE_RATE_LIMIT - used) + [429]
    if codes != want:
        raise SmokeError(f"one rate budget across replicas: answers {codes}, want {want}")
    log(f"ok: ATTN_RATE_LIMIT={COMPOSE_RATE_LIMIT} is one budget across the replicas ({codes})")


def check_session(urls: list[str]) -> int:
    """A memory session opened on one replica and continued on each of the others in turn (its
    state in Redis); returns the POST requests made (they count against the rate budget)."""
    status, _, raw = http("POST", f"{urls[0]}/v1/sessions", {"memory": {"length": 2}})
    if status != 201:
        raise SmokeError(f"POST /v1/sessions -> {status}: {raw[:300]!r}")
    sid = json.loads(raw)["id"]
    segment = {"q": [[1.0, 0.0]], "k": [[1.0, 0.0]], "v": [[1.0, 2.0]]}
    for i, url in enumerate(urls, start=1):
        status, _, raw = http("POST", f"{url}/v1/sessions/{sid}/segments", segment)
        position = json.loads(raw).get("position") if status == 200 else None
        if position != i:
            raise SmokeError(f"{url}: segment {i} of session {sid} -> {status}: {raw[:300]!r}")
    log(f"ok: a session opened on one replica continued on each of the {len(urls)}")
    return 1 + len(urls)


def compose_phase(engine: Engine, tag: str, base_image: str) -> float | None:
    """Runs docker-compose.yml itself with replicas on Redis; the README's curl against it."""
    compose = engine.compose_cmd()
    if compose is None:
        log("SKIP compose phase: neither `docker compose` nor podman-compose is available")
        return None
    project = f"attnsmoke{os.getpid()}"
    env = dict(
        engine.env if isinstance(engine, Podman) and engine.env else os.environ,
        # Each replica on a free port of the loopback interface (podman cannot publish one
        # container port on a range of host ports).
        ATTENTION_PUBLISH="127.0.0.1:",
        ATTENTION_IMAGE=tag,
        # podman-compose reads the replica count from the file (deploy.replicas); docker
        # compose from --scale as well.
        ATTENTION_REPLICAS=str(COMPOSE_REPLICAS),
        ATTN_RATE_LIMIT=str(COMPOSE_RATE_LIMIT),
        REDIS_IMAGE=engine.redis_image(base_image),
        COMPOSE_PROJECT_NAME=project,
    )
    base = [*compose, "-p", project, "-f", str(REPO / "docker-compose.yml")]
    try:
        t0 = time.monotonic()
        scale = ["--scale", f"attention={COMPOSE_REPLICAS}"]
        run([*base, "up", "-d", "--no-build", *scale], env=env, timeout=600)
        names = containers(engine, project, env, service="attention")
        if len(names) != COMPOSE_REPLICAS:
            raise SmokeError(f"compose started {names}, want {COMPOSE_REPLICAS} replicas")
        ports = [engine.port(name, 8000) for name in names]
        ready = [wait_ready(engine, n, p, t0) for n, p in zip(names, ports, strict=True)]
        log(f"compose: {', '.join(names)} ready {max(ready):.2f} s after `up`")
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        heatmap_url, png = readme_curls(urls[0])
        posts = check_session(urls)
        check_shared_state(urls, heatmap_url, png, used=1 + posts)
        engine.healthcheck(names[0])
        log("ok: compose service healthy by its own HEALTHCHECK")
        return ready[0]
    except BaseException:
        for name in containers(engine, project, env, stopped=True):
            log(f"--- logs of {name}:\n{engine.logs(name)}")
        raise
    finally:
        run([*base, "down", "-v", "-t", "3"], env=env, check=False, timeout=300)
        # podman-compose leaves the project's network behind (docker compose removes it).
        if isinstance(engine, Podman):
            engine.c("network", "rm", "-f", f"{project}_default", check=False, quiet=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-image", default=os.environ.get("BASE_IMAGE", DEFAULT_BASE))
    ap.add_argument("--tag", default=DEFAULT_TAG)
    ap.add_argument("--no-cache", action="store_true", help="build without the layer cache")
    ap.add_argument("--no-compose", action="store_true", help="skip running docker-compose.yml")
    ap.add_argument(
        "--json",
        type=Path,
        default=REPO / "artifacts" / "container-smoke.json",
        help="where to write the measured numbers",
    )
    ap.add_argument(
        "--build-log",
        type=Path,
        default=REPO / "artifacts" / "container-build.log",
        help="where the build's output goes",
    )
    args = ap.parse_args()

    if not (Docker.available() or have("buildah") or (os.geteuid() == 0 and have("apt-get"))):
        print("SKIP: container test: no docker daemon, no buildah, and cannot install buildah")
        return 0

    # SIGTERM (CI timeout, Ctrl-C in make) still removes what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    engine: Engine | None = None
    passed = 0
    try:
        engine = pick_engine(args.base_image)
        build_s = engine.build(args.tag, args.base_image, args.no_cache, args.build_log)
        size, base_size = engine.image_size(args.tag), engine.image_size(args.base_image)
        log(f"built {args.tag} in {build_s:.1f} s")
        passed += 1

        volume = f"attention-smoke-{os.getpid()}"
        engine.volumes.append(volume)
        engine.c("volume", "create", volume, quiet=True)
        env = {"ATTN_LOG_LEVEL": "warning"}
        port_a, port_b = free_port(), free_port()
        t0 = time.monotonic()
        a = engine.start(f"{volume}-a", args.tag, port_a, volume, env)
        started_s = time.monotonic() - t0
        ready_s = wait_ready(engine, a, port_a, t0)
        log(f"ok: ready {ready_s:.2f} s after `run` ({started_s:.2f} s of that in `run` itself)")
        passed += 1

        status, _, _ = http("GET", f"http://127.0.0.1:{port_a}/healthz")
        if status != 200:
            raise SmokeError(f"GET /healthz -> {status}")
        url, png = attention_request(f"http://127.0.0.1:{port_a}")
        check_packaged(f"http://127.0.0.1:{port_a}")
        passed += 1
        model_request(f"http://127.0.0.1:{port_a}")
        passed += 1
        check_container(engine, a, args.tag)
        passed += 4

        # A second replica on the same volume serves the first one's heatmap.
        t0 = time.monotonic()
        b = engine.start(f"{volume}-b", args.tag, port_b, volume, env)
        ready_b = wait_ready(engine, b, port_b, t0)
        status, _, png_b = http("GET", urllib.request.urljoin(f"http://127.0.0.1:{port_b}/", url))
        if status != 200 or png_b != png:
            raise SmokeError(f"replica b: GET {url} -> {status} ({len(png_b)} bytes)")
        log("ok: a second replica on the shared volume serves the same heatmap")
        passed += 1
        engine.remove_started()

        ready_compose = None
        if not args.no_compose:
            ready_compose = compose_phase(engine, args.tag, args.base_image)
            passed += ready_compose is not None

        numbers = {
            "engine": engine.name,
            "base_image": args.base_image,
            "image_bytes": size,
            "base_image_bytes": base_size,
            "added_bytes": size - base_size,
            "build_s": round(build_s, 1),
            "build_cache": not args.no_cache,
            "start_to_ready_s": round(ready_s, 2),
            "start_to_ready_second_replica_s": round(ready_b, 2),
            "compose_up_to_ready_s": None if ready_compose is None else round(ready_compose, 2),
            "load_average_1min": round(os.getloadavg()[0], 1),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
        mb = 1e6
        print(f"image size:          {size / mb:.0f} MB ({args.tag})")
        print(f"base image:          {base_size / mb:.0f} MB ({args.base_image})")
        print(f"added over the base: {(size - base_size) / mb:.0f} MB (goal < 250 MB)")
        cache = "no cache" if args.no_cache else "layer cache allowed"
        print(f"build time:          {build_s:.1f} s ({cache})")
        readies = f"{ready_s:.2f} s; second replica {ready_b:.2f} s"
        if ready_compose is not None:
            readies += f"; compose up {ready_compose:.2f} s"
        print(f"start to ready:      {readies} (goal < 5 s)")
        print(f"load average:        {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"container: {passed} passed, 0 failed")
        return 0
    except (SmokeError, subprocess.TimeoutExpired) as e:
        print(f"[container-test] FAILED: {e}", file=sys.stderr, flush=True)
        if engine:
            for name in engine.containers:
                print(f"--- logs of {name}:\n{engine.logs(name)}", file=sys.stderr)
        print(f"container: {passed} passed, 1 failed")
        return 1
    finally:
        if engine:
            engine.cleanup()


if __name__ == "__main__":
    sys.exit(main())
