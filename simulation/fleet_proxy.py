"""A TLS reverse proxy (nginx) that exposes only a SuperLink's Fleet API to the hospitals.

flwr 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr supernode
register``: submitting code and managing nodes, with no login in the open-source SuperLink)
and the Runtime API (the ServerApp process) from one HTTPS port (``--host``/``--port``;
``--control-api-address`` and ``--fleet-api-address`` are deprecated no-ops). They cannot be
bound apart. So the consortium binds the SuperLink to its own loopback (``--host 127.0.0.1``)
and puts this proxy on the address hospitals reach: it terminates TLS with the SuperLink's
certificate, forwards exactly the twelve Fleet API paths (POST) and ``GET /health`` to the
SuperLink over verified TLS, and answers everything else with 404. Only someone logged in on
the consortium host can reach the Control API.

`fleet_proxy_config` writes the nginx configuration (``omnifuse deploy fleet-proxy``);
`FleetProxy` runs nginx with it in the foreground (the loopback tests).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from simulation.flower_processes import stop_process

# flwr 1.42 flwr.superlink.routers.fleet.router: every path a SuperNode calls (all POST);
# tests/deployment check this list against the installed flwr.
FLEET_PATHS = (
    "/v1/fleet/register-node",
    "/v1/fleet/activate-node",
    "/v1/fleet/deactivate-node",
    "/v1/fleet/unregister-node",
    "/v1/fleet/send-node-heartbeat",
    "/v1/fleet/pull-messages",
    "/v1/fleet/push-messages",
    "/v1/fleet/get-run",
    "/v1/fleet/get-fab",
    "/v1/fleet/push-object",
    "/v1/fleet/pull-object",
    "/v1/fleet/confirm-message-received",
)
MAX_BODY = "1g"  # push-object carries model updates
TIMEOUT_S = 300


class FleetProxyError(RuntimeError):
    """nginx is missing, rejected its configuration, or did not start (its log is named)."""


@dataclass(frozen=True)
class ProxySettings:
    """What the proxy listens on, where the SuperLink is, and the TLS files it uses."""

    listen: str  # host:port hospitals reach, e.g. "0.0.0.0:9092" (the public side)
    superlink: str  # the SuperLink's loopback address, e.g. "127.0.0.1:9093"
    certificate: Path  # a certificate for the public name (the SuperLink's own will do)
    certificate_key: Path
    ca_certificate: Path  # verifies the SuperLink behind the proxy
    # a DNS name in the SuperLink certificate (nginx 1.22 checks DNS SANs, not IP SANs)
    superlink_name: str = "localhost"
    state_dir: Path = Path("/var/lib/omnifuse-fleet-proxy")  # pid, temp files, logs
    worker_user: str | None = None  # nginx `user` (workers' account when started as root)


def _upstream_tls(settings: ProxySettings) -> str:
    return f"""            proxy_http_version 1.1;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {settings.ca_certificate.resolve()};
            proxy_ssl_name {settings.superlink_name};
            proxy_ssl_server_name on;
            proxy_request_buffering off;
            proxy_buffering off;"""


def fleet_proxy_config(settings: ProxySettings) -> str:
    """The nginx.conf: TLS on ``listen``; the Fleet API paths and /health forwarded; 404 else.

    Exact-match locations forward a fixed path, so the SuperLink only ever receives one of
    the Fleet API paths, whatever the client sent (``..``, ``%2F``, a different method).
    """
    state = settings.state_dir.resolve()
    user = f"user {settings.worker_user};\n" if settings.worker_user else ""
    upstream = _upstream_tls(settings)
    fleet = "\n".join(
        f"""        location = {path} {{
            limit_except POST {{ deny all; }}
            proxy_pass https://superlink{path};
{upstream}
        }}"""
        for path in FLEET_PATHS
    )
    return f"""# Fleet API only; from `omnifuse deploy fleet-proxy` (simulation/fleet_proxy.py)
{user}worker_processes 1;
pid {state}/nginx.pid;
error_log {state}/error.log info;
events {{ worker_connections 512; }}
http {{
    log_format fleet '$remote_addr "$request" $status upstream=$upstream_addr';
    access_log {state}/access.log fleet;
    client_body_temp_path {state}/client_body;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
    server_tokens off;
    upstream superlink {{ server {settings.superlink}; }}
    server {{
        listen {settings.listen} ssl;
        ssl_certificate {settings.certificate.resolve()};
        ssl_certificate_key {settings.certificate_key.resolve()};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size {MAX_BODY};
        proxy_read_timeout {TIMEOUT_S}s;
        proxy_send_timeout {TIMEOUT_S}s;
{fleet}
        location = /health {{
            limit_except GET {{ deny all; }}
            proxy_pass https://superlink/health;
{upstream}
        }}
        location / {{ return 404; }}
    }}
}}
"""


def nginx_binary() -> str:
    """The nginx executable; `FleetProxyError` when it is not installed."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
    )
    if found is None:
        raise FleetProxyError("nginx is not installed (Debian: apt-get install nginx-light)")
    return found


def write_fleet_proxy_config(settings: ProxySettings, out: Path) -> Path:
    """Write the configuration to ``out`` and create its state directory."""
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(fleet_proxy_config(settings))
    return out


@dataclass
class FleetProxy:
    """nginx in the foreground with `fleet_proxy_config`; a context manager."""

    settings: ProxySettings
    config_file: Path = field(init=False)
    popen: subprocess.Popen | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if os.geteuid() == 0 and self.settings.worker_user is None:
            # a test harness started as root: its private state dir is not for `nobody`
            self.settings = replace(self.settings, worker_user="root")
        self.config_file = self.settings.state_dir / "nginx.conf"

    @property
    def log_file(self) -> Path:
        return self.settings.state_dir / "error.log"

    def _base_command(self) -> list[str]:
        state = str(self.settings.state_dir.resolve())
        log = str(self.log_file)
        return [nginx_binary(), "-p", state, "-e", log, "-c", str(self.config_file)]

    def check(self) -> None:
        """Write the configuration and have nginx check it (``nginx -t``)."""
        write_fleet_proxy_config(self.settings, self.config_file)
        checked = subprocess.run(
            [*self._base_command(), "-t"], capture_output=True, text=True, timeout=60, check=False
        )
        if checked.returncode != 0:
            raise FleetProxyError(f"nginx -t rejected {self.config_file}: {checked.stderr}")

    def start(self, timeout: float = 30.0) -> FleetProxy:
        """Check the configuration, start nginx, wait until /health answers through it."""
        self.check()
        self.popen = subprocess.Popen(
            [*self._base_command(), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_healthy(timeout)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        context = ssl.create_default_context(cafile=str(self.settings.ca_certificate))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                raise FleetProxyError(
                    f"nginx exited with {self.popen.returncode}; see {self.log_file}"
                )
            with contextlib.suppress(httpx.HTTPError):
                url = f"https://{self.settings.listen}/health"
                if httpx.get(url, verify=context, timeout=2).is_success:
                    return
            time.sleep(0.3)
        raise FleetProxyError(f"no /health through nginx after {timeout:.0f}s; see {self.log_file}")

    def stop(self) -> None:
        if self.popen is not None:
            stop_process(self.popen)
            self.popen = None

    def __enter__(self) -> FleetProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def add_fleet_proxy_parser(deploy_commands) -> None:
    """`omnifuse deploy fleet-proxy`: write the consortium host's nginx configuration."""
    proxy = deploy_commands.add_parser(
        "fleet-proxy", help="nginx config exposing only the SuperLink's Fleet API"
    )
    proxy.add_argument("--listen", required=True, help="public host:port, e.g. 0.0.0.0:9092")
    proxy.add_argument("--superlink", default="127.0.0.1:9093", help="the SuperLink (loopback)")
    proxy.add_argument("--cert", required=True, help="TLS certificate for the public name")
    proxy.add_argument("--key", required=True, help="its private key")
    proxy.add_argument("--ca", required=True, help="CA that signed the SuperLink's certificate")
    proxy.add_argument(
        "--superlink-name", default="localhost", help="a DNS name in the SuperLink certificate"
    )
    proxy.add_argument(
        "--state-dir",
        default="/var/lib/omnifuse-fleet-proxy",
        help="nginx's pid, temp and log folder on the consortium host",
    )
    proxy.add_argument("--user", help="nginx worker account, e.g. www-data (owns --state-dir)")
    proxy.add_argument("--out", required=True, help="the nginx.conf to write")
    proxy.set_defaults(handler=run_fleet_proxy_config)


def run_fleet_proxy_config(args) -> int:
    for flag, value in (("--cert", args.cert), ("--key", args.key), ("--ca", args.ca)):
        if not Path(value).is_file():
            raise FileNotFoundError(f"{flag} {value} does not exist")
    settings = ProxySettings(
        listen=args.listen,
        superlink=args.superlink,
        certificate=Path(args.cert),
        certificate_key=Path(args.key),
        ca_certificate=Path(args.ca),
        superlink_name=args.superlink_name,
        state_dir=Path(args.state_dir),
        worker_user=args.user,
    )
    out = write_fleet_proxy_config(settings, Path(args.out))
    print(f"nginx configuration written: {out} (run: nginx -c {out.resolve()})")
    return 0
