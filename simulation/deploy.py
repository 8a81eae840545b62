"""A real Flower deployment on one machine: a TLS SuperLink with SuperNode authentication,
one authenticated SuperNode per site, and `flwr run` over TLS (flwr 1.42).

The same commands a consortium and its hospitals run (docs/DEPLOY.md), started as
subprocesses on 127.0.0.1 with ports picked at runtime. `LocalDeployment` owns everything it
starts (each in its own process group; descendants that leave the group are found through
/proc) and stops it all on exit, also when an exception is raised. flwr 1.42 serves the
Fleet, Control and Runtime APIs of the SuperLink over one HTTPS port (``--port``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from server.run_outcome import read_outcome
from simulation.approved_supernode import with_app_approval
from simulation.certificates import (
    CertificatePaths,
    SuperNodeKeyPaths,
    make_certificates,
    make_supernode_keys,
)
from simulation.flower_processes import (
    REPO_ROOT,
    flower_bin,
    flower_env,
    stop_process,
    write_run_config,
)
from simulation.safe_paths import check_name, inside

CONNECTION = "omnifuse-tls"
HOST = "127.0.0.1"


class DeploymentError(RuntimeError):
    """A deployment process failed to start, connect or finish (its log is named)."""


@dataclass
class ManagedProcess:
    """A process this deployment started, with the file its output goes to."""

    name: str
    popen: subprocess.Popen
    log_file: Path

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.is_file() else ""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def write_connection(
    flwr_home: Path, address: str, root_certificates: Path | None, name: str = CONNECTION
) -> Path:
    """``$FLWR_HOME/config.toml`` naming one SuperLink connection (the default).

    With ``root_certificates`` (the consortium CA) the CLI verifies the SuperLink over TLS;
    without it the CLI falls back to the system CA store (which will not trust our CA).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{name}"',
        "",
        f"[superlink.{name}]",
        f'address = "{address}"',
    ]
    if root_certificates is not None:  # flwr requires an absolute path here
        lines.append(f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def superlink_command(
    port: int, certs: CertificatePaths, database: Path, log_file: Path, node_auth: bool = True
) -> list[str]:
    """`flower-superlink` with TLS on every API and, by default, SuperNode authentication."""
    command = [
        flower_bin("flower-superlink"),
        "--ssl-certfile",
        str(certs.server_cert),
        "--ssl-keyfile",
        str(certs.server_key),
        "--ssl-ca-certfile",
        str(certs.ca_cert),
        "--host",
        HOST,
        "--port",
        str(port),
        "--database",
        str(database),
        "--disable-runtime-dependency-installation",
        "--log-file",
        str(log_file),
    ]
    return [*command, "--enable-supernode-auth"] if node_auth else command


def supernode_command(
    superlink: str,
    runtime_port: int,
    site_config: Path | None = None,
    root_certificates: Path | None = None,
    private_key: Path | None = None,
    insecure: bool = False,
    max_retries: int | None = None,
) -> list[str]:
    """`flower-supernode` for one site: TLS with the consortium CA, its auth key, its site."""
    command = [
        flower_bin("flower-supernode"),
        "--superlink",
        superlink,
        "--host",
        HOST,  # its Runtime API (ClientApp processes) on loopback only
        "--port",
        str(runtime_port),
    ]
    if insecure:
        command.append("--insecure")
    if root_certificates is not None:
        command += ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    if site_config is not None:
        # quoted: an unquoted value ending in .toml is read by Flower as a config *file*
        command += ["--node-config", f"site-config={json.dumps(str(Path(site_config).resolve()))}"]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    return command


@dataclass
class LocalDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1 under ``work_dir``; a context manager.

    Layout: ``certs/`` (CA + SuperLink certificate), ``keys/`` (SuperNode key pairs),
    ``flwr_home/`` (the researcher's CLI connection), ``sites/<name>/`` (each SuperNode's
    FLWR_HOME and log), ``superlink.log``, ``flwr_run.log``.
    """

    work_dir: Path
    app_dir: Path = REPO_ROOT
    port: int = 0  # 0: pick a free one
    processes: list[ManagedProcess] = field(default_factory=list)
    certs: CertificatePaths = field(init=False)
    flwr_home: Path = field(init=False)
    env: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        # fresh throwaway credentials for this loopback deployment, in its own work dir
        self.certs = make_certificates(self.work_dir / "certs", force=True)
        self.flwr_home = self.work_dir / "flwr_home"
        write_connection(self.flwr_home, self.address, self.certs.ca_cert)
        self.env = flower_env(self.flwr_home, self.app_dir)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        for process in reversed(self.processes):  # SuperNodes before the SuperLink
            stop_process(process.popen)

    def _spawn(self, name: str, command: list[str], log_file: Path, env: dict) -> ManagedProcess:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("ab") as out:
            popen = subprocess.Popen(
                command,
                env=env,
                cwd=log_file.parent,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as one
            )
        process = ManagedProcess(name, popen, log_file)
        self.processes.append(process)
        return process

    def start_superlink(self, node_auth: bool = True, timeout: float = 90.0) -> ManagedProcess:
        """Start the SuperLink and wait until it answers /health over verified TLS."""
        log_file = self.work_dir / "superlink.log"
        command = superlink_command(
            self.port, self.certs, self.work_dir / "superlink_state.db", log_file, node_auth
        )
        process = self._spawn("superlink", command, self.work_dir / "superlink.out", self.env)
        context = ssl.create_default_context(cafile=str(self.certs.ca_cert))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                raise DeploymentError(
                    f"flower-superlink exited with {process.popen.returncode}; "
                    f"see {process.log_file}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(
                    f"https://{self.address}/health", verify=context, timeout=1
                ).is_success:
                    return process
            time.sleep(0.5)
        raise DeploymentError(f"SuperLink not healthy after {timeout:.0f}s; see {log_file}")

    def flwr(
        self, *args: str, flwr_home: Path | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the `flwr` CLI against this SuperLink (the researcher's / consortium's side)."""
        env = self.env if flwr_home is None else flower_env(flwr_home, self.app_dir)
        return subprocess.run(
            [flower_bin("flwr"), *args],
            env=env,
            cwd=self.work_dir,  # not the app dir: `flwr` may migrate a pyproject it finds
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _flwr_json(self, *args: str) -> dict:
        completed = self.flwr(*args, "--format", "json")
        text = completed.stdout
        if completed.returncode != 0 or "{" not in text:
            raise DeploymentError(
                f"flwr {' '.join(args)} failed ({completed.returncode}): {text}\n{completed.stderr}"
            )
        return json.loads(text[text.index("{") :])

    def make_keys(self, name: str) -> SuperNodeKeyPaths:
        """A SuperNode key pair under ``keys/`` (made at the hospital in a real deployment)."""
        return make_supernode_keys(self.work_dir / "keys", name, force=True)

    def register(self, public_key: Path, name: str | None = None) -> int:
        """`flwr supernode register`: allow the SuperNode holding this key; its node id."""
        args = ["supernode", "register", str(public_key), CONNECTION]
        reply = self._flwr_json(*args, *(["--name", name] if name else []))
        return int(reply["node-id"])

    def list_nodes(self) -> dict[int, str]:
        """Node id -> status ("registered", "online", "offline") from `flwr supernode list`."""
        reply = self._flwr_json("supernode", "list", CONNECTION)
        return {int(node["node-id"]): node["status"] for node in reply["nodes"]}

    def start_supernode(
        self,
        name: str,
        site_config: Path | None = None,
        private_key: Path | None = None,
        trust_ca: bool = True,
        insecure: bool = False,
        max_retries: int | None = None,
        approved_apps: Path | None = None,
        superlink: str | None = None,
    ) -> ManagedProcess:
        """Start ``flower-supernode`` for site ``name``.

        ``trust_ca=False`` leaves out ``--root-certificates``: the node then checks the
        SuperLink against the system CA store only (as a node that was not given our CA).
        ``approved_apps``: the site's allowlist; the node then runs only those app versions
        (`simulation.approved_supernode`). ``superlink``: the Fleet API address the node
        dials (default: the SuperLink itself; e.g. a `simulation.fleet_proxy` in front).
        """
        site_dir = inside(self.work_dir, self.work_dir / "sites" / check_name(name, "site name"))
        command = supernode_command(
            superlink or self.address,
            free_port(),
            site_config=site_config,
            root_certificates=self.certs.ca_cert if trust_ca and not insecure else None,
            private_key=private_key,
            insecure=insecure,
            max_retries=max_retries,
        )
        if approved_apps is not None:
            command = with_app_approval(command, approved_apps)
        env = flower_env(site_dir / "flwr_home", self.app_dir)  # each site its own FLWR_HOME
        return self._spawn(f"supernode-{name}", command, site_dir / "supernode.log", env)

    def wait_online(self, node_ids: set[int], timeout: float = 120.0) -> None:
        """Wait until every node in ``node_ids`` is online at the SuperLink."""
        deadline = time.monotonic() + timeout
        status: dict[int, str] = {}
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.name.startswith("supernode") and process.popen.poll() is not None:
                    raise DeploymentError(
                        f"{process.name} exited with {process.popen.returncode}; "
                        f"see {process.log_file}:\n{process.log_text()[-2000:]}"
                    )
            status = self.list_nodes()
            if all(status.get(node) == "online" for node in node_ids):
                return
            time.sleep(2.0)
        raise DeploymentError(f"SuperNodes not online after {timeout:.0f}s: {status}")

    def run(self, run_config: dict[str, object], timeout: float = 1800.0) -> int:
        """`flwr run <app> omnifuse-tls --stream`; returns its exit code (log: flwr_run.log)."""
        config_file = write_run_config(self.work_dir / "run_config.toml", run_config)
        command = [flower_bin("flwr"), "run", str(self.app_dir), CONNECTION]
        command += ["--run-config", str(config_file), "--stream"]
        with (self.work_dir / "flwr_run.log").open("w") as run_log:
            completed = subprocess.run(
                command,
                env=self.env,
                cwd=self.app_dir,
                stdout=run_log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        return completed.returncode


def completed_rounds(run_dir: Path) -> int:
    """The newest checkpointed round in ``run_dir`` (0 when there is none)."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    return int(latest.read_text().strip().split("_")[-1]) if latest.is_file() else 0


def scenario_sites(scenario_dir: Path) -> dict[str, Path]:
    """Site name -> site config path of every site in ``scenario_dir/scenario.json``.

    Keyed by each config's ``name`` (a scenario written by `omnifuse partition` names every
    file ``site.toml``); a name used twice is a `ValueError` naming both files.
    """
    from omnifuse_model.scenario import Scenario
    from omnifuse_model.site_config import load_site_config

    named: dict[str, Path] = {}
    for site in Scenario.load(scenario_dir).site_configs:
        name = load_site_config(site).name
        if name in named:
            raise ValueError(f"{site}: site name {name!r} is also the name in {named[name]}")
        named[name] = site
    return named


def _start_sites(deployment: LocalDeployment, sites: dict[str, Path]) -> dict[str, int]:
    """A key pair per site, registered at the SuperLink, and its SuperNode; the node ids."""
    node_ids: dict[str, int] = {}
    for name, site in sites.items():
        keys = deployment.make_keys(name)
        node_ids[name] = deployment.register(keys.public_key, name=name)
        deployment.start_supernode(name, site, private_key=keys.private_key)
    deployment.wait_online(set(node_ids.values()))
    return node_ids


def run_deployment_demo(
    work_dir: Path, scenario_dir: Path, rounds: int = 1, timeout: float = 1800.0
) -> dict:
    """A whole TLS deployment of a scenario on loopback: one authenticated SuperNode per site.

    Makes the CA and SuperLink certificate, a key pair per site, starts the SuperLink with
    SuperNode authentication, registers every site's public key, starts the SuperNodes with
    their site configs, `flwr run`s ``rounds`` rounds over TLS and stops everything. Returns
    a summary; raises `DeploymentError` when a round did not complete.
    """

    work_dir, scenario_dir = Path(work_dir).resolve(), Path(scenario_dir).resolve()
    sites = scenario_sites(scenario_dir)
    run_dir = work_dir / "run"
    started = time.monotonic()
    with LocalDeployment(work_dir) as deployment:
        deployment.start_superlink(node_auth=True)
        node_ids = _start_sites(deployment, sites)
        n = len(sites)
        returncode = deployment.run(
            {
                "scenario-dir": str(scenario_dir),
                "run-dir": str(run_dir),
                "num-server-rounds": rounds,
                "min-available-nodes": n,
                "min-train-nodes": n,
                "min-evaluate-nodes": n,
            },
            timeout=timeout,
        )
    done = completed_rounds(run_dir)
    outcome = read_outcome(run_dir) or {}
    if outcome.get("status") == "failed":  # flwr run exits 0 even when the ServerApp raised
        raise DeploymentError(
            f"deployment failed after round {done} of {rounds}: {outcome.get('reason', '')}; "
            f"see {work_dir / 'flwr_run.log'}"
        )
    if returncode != 0 or done < rounds:
        raise DeploymentError(
            f"deployment stopped after round {done} of {rounds} (flwr run exit code "
            f"{returncode}); see {work_dir / 'flwr_run.log'} and {work_dir / 'superlink.log'}"
        )
    return {
        "superlink": deployment.address,
        "node_ids": node_ids,
        "run_dir": str(run_dir),
        "rounds_completed": done,
        "flwr_run_returncode": returncode,
        "outcome": outcome,
        "seconds": round(time.monotonic() - started, 1),
        "certificates": {k: str(v) for k, v in asdict(deployment.certs).items()},
        "logs": str(work_dir),
    }
