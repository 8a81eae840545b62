"""The text files of a deployment kit (`simulation.kit`): start scripts, the systemd unit,
the allowlist template and the checklists. Plain `str.format` templates kept in Python, so
the wheel carries them with the code."""

from __future__ import annotations

SITE_START_SCRIPT = """\
#!/bin/sh
# Start the SuperNode of site '{site}' (OmniFuse-FL): preflight first, then flower-supernode.
# Runs from this folder; site.toml's relative paths resolve here. OMNIFUSE may name the
# `omnifuse` executable of the venv the consortium's wheel was installed into.
set -eu
cd "$(dirname "$0")"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
installed={omnifuse}
exec "${{OMNIFUSE:-$installed}}" site start site.toml "$@"
"""

SITE_SYSTEMD_UNIT = """\
# systemd unit of site '{site}': copy to /etc/systemd/system/omnifuse-{site}.service, set
# User/Group and the two paths, then: systemctl daemon-reload && systemctl enable --now
# omnifuse-{site}. `journalctl -u omnifuse-{site}` shows the preflight table and the
# SuperNode's log (refusals and ClientApp tracebacks stay here, at the site).
[Unit]
Description=OmniFuse-FL SuperNode of site {site}
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=omnifuse
Group=omnifuse
WorkingDirectory={site_dir}
Environment=OMNIFUSE={omnifuse}
ExecStart={site_dir}/start.sh
# SIGTERM to `omnifuse site start` only; it stops the SuperNode's whole process tree itself
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=60
SuccessExitStatus=143 130
Restart=on-failure
RestartSec=30
NoNewPrivileges=true
PrivateTmp=true
ProtectSystem=full
UMask=0077

[Install]
WantedBy=multi-user.target
"""

APPROVED_APPS = """\
# Training code this site has approved (code approval at the site, docs/DEPLOY.md).
# One [[app]] table per approved Flower app bundle: its SHA-256 and a note saying who
# reviewed it and when. An empty list approves nothing. Example:
#
# [[app]]
# sha256 = "<64 hex digits of the app bundle the consortium announced>"
# note = "omnifuse-fl 0.1.0, reviewed by <name> on <date>"
"""

SUPERLINK_START_SCRIPT = """\
#!/bin/sh
# Start the consortium's SuperLink (OmniFuse-FL): TLS on its one port, SuperNode
# authentication on (only registered node keys are let in), state kept in state/.
set -eu
cd "$(dirname "$0")"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p state
exec "${{FLOWER_SUPERLINK:-flower-superlink}}" \\
  --ssl-certfile certs/server.pem --ssl-keyfile certs/server.key \\
  --ssl-ca-certfile certs/ca.pem \\
  --enable-supernode-auth \\
  --host "${{SUPERLINK_HOST:-{bind_host}}}" --port {port} \\
  --database state/superlink.db \\
  --disable-runtime-dependency-installation \\
  --log-file state/superlink.log "$@"
"""

REGISTER_SCRIPT = """\
#!/bin/sh
# Register every hospital's SuperNode public key at the running SuperLink (run on the
# consortium host). Writes the CLI connection into ./flwr_home first.
set -eu
cd "$(dirname "$0")"
export FLWR_HOME="$PWD/flwr_home"
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "{connection}"

[superlink.{connection}]
address = "{address}"
root-certificates = "$PWD/certs/ca.pem"
EOF
{register_lines}
"${{FLWR:-flwr}}" supernode list {connection}
"""

SITE_CHECKLIST = """\
# Site '{site}': checklist

What this folder holds: `ca.pem` (the consortium CA: verifies the SuperLink),
`{key_name}` (this site's SuperNode private key, mode 0600: never copy it elsewhere),
`{key_name}.pub` (its public key: the consortium registers it), `site.toml` (this site's
config with its `[deployment]` section), `approved_apps.toml` (the training code this site
approves), `start.sh`, `omnifuse-{site}.service`.

1. [ ] Install the consortium's pinned version (never a newer one) into a venv:
       `python3.11 -m venv {venv} && {venv}/bin/pip install omnifuse_fl-{version}-py3-none-any.whl`
       (compare the wheel's SHA-256 with the one the consortium announced).
2. [ ] Edit `site.toml`: the `[data]` paths to this hospital's MIMIC-format files, `cache_dir`,
       `[backbones]` to the consortium's backbone files (same SHA-256 as announced).
3. [ ] Optional: replace the key pair with one made here (`omnifuse deploy keys --out .
       {site} --force`) and send only `{key_name}.pub` to the consortium.
4. [ ] `omnifuse prepare site.toml` (frozen backbones into the local feature cache).
5. [ ] Review the training code, then put its SHA-256 into `approved_apps.toml`.
6. [ ] `omnifuse site check site.toml --superlink` until every row is ok (exit code 0).
7. [ ] Firewall: outbound TCP to `{address}` only; no inbound port (the SuperNode dials out;
       its Runtime API port {runtime_port} stays on 127.0.0.1).
8. [ ] Run: `./start.sh` or install `omnifuse-{site}.service` (see its header).
9. [ ] Tell the consortium the SuperNode is up; check `journalctl -u omnifuse-{site}`.
"""

CONSORTIUM_CHECKLIST = """\
# Consortium: checklist

What this folder holds: `certs/ca.pem` (the CA every party trusts), `certs/ca.key` (the CA's
private key: move it offline now), `certs/server.pem` + `certs/server.key` (the SuperLink's
TLS certificate for {hosts}), `node_keys/<site>.pub` (the SuperNode public keys to
register), `start_superlink.sh`, `register_nodes.sh`. Each hospital's folder
(`../sites/<site>/`) goes to that hospital only, over a channel you trust: it holds that
site's private key.

1. [ ] Move `certs/ca.key` off this host (offline storage); it is needed only to re-issue
       `server.pem`.
2. [ ] Build and publish the wheel every party installs (`python -m build --wheel`, or
       `pip wheel --no-deps .`), with its SHA-256, and the SHA-256 of the app bundle
       (`flwr build`) that sites approve.
3. [ ] Start the SuperLink: `./start_superlink.sh` (port {port}; bind address
       `SUPERLINK_HOST`, default {bind_host}).
4. [ ] Register the SuperNode keys: `./register_nodes.sh` (replace a `.pub` first if a
       hospital sent its own).
5. [ ] The SuperLink serves the Control API (run submission) on the same port as the Fleet
       API: bind it to 127.0.0.1 (`SUPERLINK_HOST=127.0.0.1`) and expose only the Fleet API
       to the hospitals through nginx: `omnifuse deploy fleet-proxy --listen PUBLIC:{port}
       --superlink 127.0.0.1:<port> ...` (docs/DEPLOY.md, "The Control API"). Firewall:
       inbound TCP {port} from the hospitals' addresses only.
6. [ ] Send each hospital its folder `sites/<site>/`; wait until `flwr supernode list`
       shows every node `online`.
"""
