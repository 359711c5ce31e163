"""Deployment files: the compose file is valid for Debian's docker-compose (no Docker engine needed for `config`),
the Dockerfile pins the CPU build of torch before the project, and the healthcheck is a working Python one-liner."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import require_system_package

from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
READY_URL = "http://127.0.0.1:8000/v1/ready"


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments and blank lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    return instructions[starts[-1]:]


def compose_file() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def healthcheck_code(test: list[str]) -> str:
    assert test[:3] == ["CMD", "python", "-c"], test
    assert len(test) == 4, test
    return test[3]


def volume_mounts(volumes: list) -> dict[str, tuple[str, bool]]:
    """container path -> (host path, read-only), from short ("src:dst[:mode]") or long (dict) volume syntax."""
    mounts = {}
    for volume in volumes:
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            mounts[target] = (source, mode == ["ro"])
        else:
            mounts[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
    return mounts


def resolved_compose(**settings: str) -> dict:
    """`docker-compose config`: the compose file as Debian's docker-compose (1.29) parses and resolves it, with
    these variables set (and no other NMT_* ones)."""
    exe = shutil.which("docker-compose")
    require_system_package(exe, "docker-compose is not installed (`make system-deps` installs Debian's package)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NMT_", "COMPOSE_", "DOCKER_"))} | settings
    proc = subprocess.run([exe, "-f", "docker-compose.yml", "config"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stdout}\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def compose_config() -> dict:
    return resolved_compose()


def published_ports(service: dict) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of each port a resolved service publishes; "" for every address."""
    ports = []
    for port in service["ports"]:
        if isinstance(port, dict):
            ports.append((port.get("host_ip", ""), str(port["published"]), str(port["target"])))
        else:
            *address, published, target = str(port).split("/")[0].split(":")  # "127.0.0.1:8000:8000/tcp"
            ports.append((":".join(address), published, target))
    return ports


def test_compose_translate_service(compose_config: dict) -> None:
    translate = compose_config["services"]["translate"]
    assert translate["build"]["target"] == "serve"
    assert published_ports(translate) == [("", "8000", "8000")]
    command = translate["command"]
    assert command[:2] == ["nmt", "serve"] and command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "8000"
    source, read_only = volume_mounts(translate["volumes"])["/models"]
    assert Path(source).resolve() == (ROOT / "models").resolve() and read_only
    assert translate["environment"]["NMT_MODEL_DIR"].startswith("/models/")
    assert (ROOT / "models" / Path(translate["environment"]["NMT_MODEL_DIR"]).name / "config.yaml").is_file()
    assert int(translate["environment"]["NMT_THREADS"]) >= 1
    assert READY_URL in healthcheck_code(translate["healthcheck"]["test"])
    assert translate["restart"] == "unless-stopped"
    # 45 s: Docker killed the service before it cut off what was left of a graceful stop (30 + 30 s by default).
    fields = Settings.model_fields
    assert seconds(translate["stop_grace_period"]) > fields["request_timeout_s"].default + fields[
        "send_timeout_s"].default
    assert {"NMT_REQUEST_TIMEOUT_S", "NMT_SEND_TIMEOUT_S"} <= set(translate["environment"])
    assert "profiles" not in translate
    # Rotated: Docker's default json-file log grows for ever, a line a request.
    assert translate["logging"] == {"driver": "json-file", "options": {"max-size": "10m", "max-file": "5"}}


def seconds(duration: str) -> int:
    """A compose duration such as 1m15s, in seconds."""
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in re.findall(r"(\d+)([hms])", duration))


def test_compose_passes_the_proxy_and_stop_settings_through() -> None:
    # Behind a reverse proxy on the host every client shared the proxy's rate limit (uvicorn trusts X-Forwarded-For
    # from 127.0.0.1 only, and the proxy comes from the network's gateway); a longer request timeout was cut off by
    # the fixed 75 s before Docker's SIGKILL.
    translate = resolved_compose(FORWARDED_ALLOW_IPS="172.18.0.1", NMT_STOP_GRACE_PERIOD="3m")["services"]["translate"]
    assert translate["environment"]["FORWARDED_ALLOW_IPS"] == "172.18.0.1"
    assert seconds(translate["stop_grace_period"]) == 180


def test_compose_train_service(compose_config: dict) -> None:
    train = compose_config["services"]["train"]
    assert train["profiles"] == ["train"]
    assert train["build"]["target"] == "train"
    assert train["command"] == ["nmt", "train", "configs/base.yaml"]
    mounts = volume_mounts(train["volumes"])
    for name in ("data", "runs", "configs"):
        assert Path(mounts[f"/app/{name}"][0]).resolve() == (ROOT / name).resolve()
    assert not mounts["/app/runs"][1] and not mounts["/app/data"][1]
    assert (ROOT / "configs" / "base.yaml").is_file()


def test_compose_variables_have_defaults() -> None:
    """Every ${VAR} in the compose file has a default, so `docker-compose up` needs no .env file."""
    text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    for match in re.finditer(r"\$\{([^}]*)\}", text):
        assert ":-" in match.group(1), f"${{{match.group(1)}}} has no default"


def test_dockerfile_pins_cpu_torch_before_the_project() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim-bookworm AS base")
    runs = [(i, args) for i, (keyword, args) in enumerate(instructions) if keyword == "RUN"]
    torch = [i for i, args in runs if "pip install torch==2.13.0 " in args + " "]
    project = [i for i, args in runs if "pip install -c constraints.txt . " in args + " "]
    assert len(torch) == 1 and len(project) == 1, runs
    assert torch[0] < project[0], "torch must be installed before the project (else pip pulls the CUDA build)"
    assert "--index-url https://download.pytorch.org/whl/cpu" in instructions[torch[0]][1]



def test_the_image_installs_the_pinned_versions_and_they_meet_pyproject() -> None:
    # The image took whatever PyPI had newest on the day: a uvicorn whose internals service/server.py uses, untested.
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    runs = [args for keyword, args in dockerfile_instructions() if keyword == "RUN" and "pip install " in args]
    assert [args for args in runs if "pip install -c constraints.txt . " in args + " "], runs
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and " " not in line, f"not a pin: {line!r}"
            pins[canonical(name)] = version
    runtime = [Requirement(r) for r in requires("rnnsearch") or () if "extra ==" not in r]
    assert len(runtime) > 10
    for requirement in runtime:
        if canonical(requirement.name) != "torch":  # pinned on its own: the CPU build
            version = pins.get(canonical(requirement.name))
            assert version and requirement.specifier.contains(version, prereleases=True), (requirement, version)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.skipif(not shutil.which("make"), reason="needs make")
def test_the_makefile_installs_cpu_torch_before_the_project(tmp_path: Path) -> None:
    # The same pin as the Dockerfile; from the machine's own wheels when it has them, else from the CPU index:
    # never a bare `torch` from PyPI, whose Linux build is the several-GB CUDA one.
    venv = tmp_path / "venv"
    recipe = subprocess.run(["make", "-n", "-B", f"{venv}/.installed", f"VENV={venv}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    commands = [line for line in recipe.splitlines() if not line.startswith("#")]
    torch = [i for i, line in enumerate(commands) if "pip install" in line and "torch==2.13.0" in line]
    project = [i for i, line in enumerate(commands) if "pip install" in line and "-e '.[test]'" in line]
    assert torch and project and max(torch) < project[0], commands
    assert "-c constraints.txt" in commands[project[0]]  # the runtime versions the Docker image installs
    assert "--no-index --no-deps torch==2.13.0" in commands[torch[0]]
    assert "--no-deps torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in commands[torch[1]]


def test_dockerfile_runs_under_tini() -> None:
    # nmt was PID 1, which ignores a SIGTERM it has no handler for: `docker stop` during start-up waited for SIGKILL.
    base = dockerfile_instructions()[:[k for k, _ in dockerfile_instructions()].index("FROM", 1)]
    assert ("ENTRYPOINT", '["/usr/bin/tini", "--"]') in base
    assert any("apt-get install -y --no-install-recommends tini" in args for keyword, args in base if keyword == "RUN")


def test_dockerfile_service_stage() -> None:
    stage = final_stage(dockerfile_instructions())
    assert stage[0] == ("FROM", "base AS serve")
    by_keyword: dict[str, list[str]] = {}
    for keyword, args in stage:
        by_keyword.setdefault(keyword, []).append(args)
    user = by_keyword["USER"][-1].split(":")[0]
    assert user not in ("root", "0")
    assert by_keyword["EXPOSE"] == ["8000"]
    assert any("NMT_MODEL_DIR=/models/es-en-bible" in args.split() for args in by_keyword["ENV"])
    assert any(args.startswith("NMT_THREADS=") or " NMT_THREADS=" in args for args in by_keyword["ENV"])
    cmd = json.loads(by_keyword["CMD"][-1])
    assert cmd == ["nmt", "serve", "--host", "0.0.0.0", "--port", "8000"]
    # The model comes from its own stage in one layer, without a chmod layer copying it again here.
    assert ["--from=model", "/models/", "/models/"] in [args.split() for args in by_keyword["COPY"]]
    assert not any("chmod" in args for args in by_keyword.get("RUN", []))
    stages = {args.split()[-1]: i for i, (keyword, args) in enumerate(dockerfile_instructions()) if keyword == "FROM"}
    model = dockerfile_instructions()[stages["model"]:stages["serve"]]
    assert ("COPY", "models/es-en-bible/ /models/es-en-bible/") in model
    assert ("RUN", "chmod -R a+rX /models") in model
    assert (ROOT / "models" / "es-en-bible" / "model.safetensors").is_file()
    # The image's own healthcheck is the compose one.
    healthcheck = by_keyword["HEALTHCHECK"][-1]
    image_test = ["CMD", *json.loads(healthcheck[healthcheck.index(" CMD ") + len(" CMD "):])]
    assert image_test == compose_file()["services"]["translate"]["healthcheck"]["test"]


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")}
    for name in (".venv", "runs", "data", "scratch", ".git", ".pytest_cache", ".ruff_cache", ".hypothesis", ".env"):
        assert name in patterns, name
    assert "models/*" in patterns and "!models/es-en-bible" in patterns
    # Whatever the Dockerfile copies (README.md too: pyproject.toml names it as the readme) is in the context.
    sources = [path.rstrip("/") for keyword, args in dockerfile_instructions()
               if keyword == "COPY" and not args.startswith("--from=")  # another stage's files, not the context's
               for path in args.split()[:-1]]
    assert "README.md" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        top = source.split("/")[0]
        assert source not in patterns and top not in patterns, source
        if f"{top}/*" in patterns:
            assert f"!{source}" in patterns, source


class _Ready(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/v1/ready" else 404
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": "ready"}' if code == 200 else b'{"error": "not ready"}')

    def log_message(self, *args: object) -> None:
        pass


def test_healthcheck_one_liner() -> None:
    """The compose healthcheck compiles, needs no `$` escaping, and exits 0 on 200, non-zero on 503 or no server."""
    code = healthcheck_code(compose_file()["services"]["translate"]["healthcheck"]["test"])
    compile(code, "<healthcheck>", "exec")
    assert "$" not in code and READY_URL in code

    def run(port: int) -> int:
        probe = code.replace(READY_URL, f"http://127.0.0.1:{port}/v1/ready")
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=20).returncode

    class NotReady(_Ready):
        status = 503

    for handler, ok in ((_Ready, True), (NotReady, False)):
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            port = server.server_address[1]
            assert (run(port) == 0) is ok, handler
        finally:
            server.shutdown()
            server.server_close()
    assert run(port) != 0  # nothing listens any more


def test_compose_port_can_be_kept_to_this_machine() -> None:
    # The service was published on every interface of the host, with no way to narrow it but editing the file.
    translate = resolved_compose(NMT_PUBLISH="127.0.0.1:8000")["services"]["translate"]
    assert published_ports(translate) == [("127.0.0.1", "8000", "8000")]
