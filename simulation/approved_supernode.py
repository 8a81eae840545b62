"""`flower-supernode` that runs only the apps its site approved (site-run, not pushed code).

Run it exactly like `flower-supernode`, with one more flag in front::

    python -m simulation.approved_supernode --approved-apps /etc/omnifuse/approved_apps.toml \\
        --superlink consortium.example:9092 --root-certificates ca.pem ...

Why here, and why the pushed app cannot bypass it: a SuperNode (flwr 1.42,
``flwr.supernode.start_client_internal._pull_and_store_message``) fetches the app bundle
(FAB) of a run the first time a message of that run arrives, *before* it creates a task; only
a stored task makes the SuperExec start a ClientApp process, and only that process ever
imports code from the FAB. This module runs in the SuperNode's own process, from the site's
installed copy of the project, and reviews every FAB at that fetch: a FAB whose SHA-256 is
not in the site's allowlist (`simulation.app_approval`), or whose bytes do not hash to the
hash the SuperLink announced, never gets a task, so none of its code runs at the site.

The refusal uses flwr's own FAB-verification path (the one behind ``--trusted-entities``):
the SuperNode answers the message with flwr's generic error "The FAB could not be
verified." (``ErrorCode.INVALID_FAB``), so the server learns that the site refused, not why;
the reason (the hash, the allowlist file) goes to the site's log only. An approved FAB is
signed, in memory, with an Ed25519 key made at start-up and never written anywhere, whose
public key is the only trusted entity; flwr's ``_verify_fab`` then checks that signature over
``sha256(fab.content)`` as it would a Flower Hub signature. Hub-signed apps
(``--trusted-entities``) are a different mechanism and cannot be combined with this one.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import sys
import time
from collections.abc import Callable, Sequence
from logging import ERROR, INFO
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from simulation.app_approval import approved_app_hashes

SITE_KEY_ID = "omnifuse-site-allowlist"
APPROVED_APPS_FLAG = "--approved-apps"
SUPPORTED_FLWR = "1.42."
REFUSED_LOG_PREFIX = "APP NOT APPROVED"


class AppApprovalGate:
    """Reviews each FAB a SuperNode fetches against the site's approved SHA-256 hashes."""

    def __init__(self, approved: frozenset[str], source: Path) -> None:
        self.approved = frozenset(approved)
        self.source = Path(source)
        self._key = ed25519.Ed25519PrivateKey.generate()  # in memory only, per process

    def trusted_entities(self) -> dict[str, str]:
        """flwr's ``trusted_entities``: our in-memory key is the only trusted signer."""
        public = self._key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        return {SITE_KEY_ID: public.decode("ascii")}

    def refusal(self, fab_hash: str, content: bytes) -> str | None:
        """Why the site refuses this FAB (for the site's log), or None when approved."""
        digest = hashlib.sha256(content).hexdigest()
        if digest != fab_hash:
            return f"its bytes hash to {digest}, not to the announced FAB hash {fab_hash}"
        if digest not in self.approved:
            return (
                f"FAB sha256 {digest} is not in this site's approved apps "
                f"{self.source} ({len(self.approved)} approved)"
            )
        return None

    def review(self, fab, run_id: int):
        """The FAB with verifications flwr checks: signed by us when approved, else none.

        The content is never changed; only ``verifications`` (not part of the hash) is.
        """
        from flwr.supercore import log
        from flwr.supercore.fab import Fab
        from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

        reason = self.refusal(fab.hash_str, fab.content)
        if reason is not None:
            log(ERROR, "%s: run %s refused at this site: %s", REFUSED_LOG_PREFIX, run_id, reason)
            return Fab(fab.hash_str, fab.content, {"valid_license": "site allowlist"})
        signed_at = int(time.time())
        message = create_message_to_sign(hashlib.sha256(fab.content).digest(), signed_at)
        signature = base64.urlsafe_b64encode(self._key.sign(message)).decode("ascii")
        log(INFO, "App approved by this site: run %s, FAB sha256 %s", run_id, fab.hash_str)
        verification = json.dumps({"signature": signature, "signed_at": signed_at})
        return Fab(
            fab.hash_str,
            fab.content,
            {"valid_license": "site allowlist", SITE_KEY_ID: verification},
        )


def _check_flower() -> None:
    """Fail closed when the installed flwr is not the one this gate was written against."""
    from flwr.supercore.version import package_version
    from flwr.supernode import start_client_internal as internal

    if not package_version.startswith(SUPPORTED_FLWR):
        raise RuntimeError(
            f"app approval supports flwr {SUPPORTED_FLWR}x; installed is {package_version}"
        )
    parameters = inspect.signature(internal._pull_and_store_message).parameters
    if not {"get_fab", "trusted_entities"} <= set(parameters):
        raise RuntimeError(
            "flwr.supernode.start_client_internal._pull_and_store_message no longer takes "
            f"get_fab and trusted_entities (it takes {sorted(parameters)}); refusing to start"
        )


def install(gate: AppApprovalGate) -> Callable[..., object]:
    """Route every FAB the SuperNode fetches through ``gate``; returns the original hook."""
    from flwr.supernode import start_client_internal as internal

    _check_flower()
    original = internal._pull_and_store_message

    def pull_and_store_approved(**kwargs: object) -> object:
        fetch = kwargs["get_fab"]
        kwargs["get_fab"] = lambda fab_hash, run_id: gate.review(fetch(fab_hash, run_id), run_id)
        kwargs["trusted_entities"] = gate.trusted_entities()
        return original(**kwargs)

    internal._pull_and_store_message = pull_and_store_approved
    return original


def split_arguments(argv: Sequence[str]) -> tuple[Path, list[str]]:
    """``--approved-apps PATH`` (or ``=PATH``) and the remaining `flower-supernode` flags."""
    path: str | None = None
    rest: list[str] = []
    items = iter(argv)
    for item in items:
        if item == APPROVED_APPS_FLAG:
            path = next(items, None)
            if path is None:
                raise ValueError(f"{APPROVED_APPS_FLAG} needs a file path")
        elif item.startswith(APPROVED_APPS_FLAG + "="):
            path = item.split("=", 1)[1]
        else:
            rest.append(item)
    if not path:
        raise ValueError(f"{APPROVED_APPS_FLAG} FILE is required (the site's allowlist)")
    if any(item.split("=", 1)[0] == "--trusted-entities" for item in rest):
        raise ValueError(
            f"{APPROVED_APPS_FLAG} and --trusted-entities cannot be combined: the site "
            "allowlist replaces flwr's trusted entities"
        )
    return Path(path), rest


def with_app_approval(supernode_command: Sequence[str], approved_apps: Path) -> list[str]:
    """A `flower-supernode` command line turned into the approval-enforcing one.

    ``supernode_command[0]`` is the `flower-supernode` executable; its flags are kept.
    """
    return [
        sys.executable,
        "-m",
        "simulation.approved_supernode",
        APPROVED_APPS_FLAG,
        str(Path(approved_apps).resolve()),
        *supernode_command[1:],
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """Read the allowlist (a bad file stops the SuperNode before it connects), then run
    flwr's own `flower-supernode` with the gate installed."""
    path, flower_args = split_arguments(sys.argv[1:] if argv is None else argv)
    try:
        approved = approved_app_hashes(path)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    install(AppApprovalGate(approved, path.resolve()))
    from flwr.supercore import log
    from flwr.supernode.cli import flower_supernode

    log(INFO, "App approval: %d approved app(s) from %s", len(approved), path.resolve())
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
