"""What a failing ClientApp tells the server: a named error code, nothing site-private.

An exception's text at a site often holds a local path, a stay id or a data value. The
handlers in ``client.app`` run each step under :func:`site_step`; when a step raises, the
full traceback is logged at the site (Python logging, logger ``omnifuse.site``, level ERROR:
the SuperNode's own output in a deployment, the simulation's process output in a
simulation) and the server gets an error reply whose reason is only the step's code and the
exception's type, e.g. ``site_config_unreadable:FileNotFoundError`` or
``training_failed:ValueError``, plus the site's name once its config has been read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TypeVar

from flwr.app import Error, Message

site_log = logging.getLogger("omnifuse.site")

# Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION: the server treats the reply as a failure.
CLIENT_APP_FAILED = 2
SAFE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

T = TypeVar("T")


class SiteStepFailed(Exception):
    """A step at the site failed; ``reason`` is safe to send to the server."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def failure_reason(code: str, error: BaseException, site: str | None = None) -> str:
    """``<code>:<ExceptionType>[:site=<name>]``, where only names known to be harmless are
    kept: a Python identifier for the type, a valid site name."""
    kind = type(error).__name__
    reason = f"{code}:{kind if SAFE_NAME.match(kind) else 'Exception'}"
    if site is not None and SITE_NAME.match(site):
        reason += f":site={site}"
    return reason


def site_step(code: str, step: Callable[[], T], site: str | None = None) -> T:
    """Run ``step``; on an exception log its traceback here and raise ``SiteStepFailed``
    with a safe reason (``SiteStepFailed`` from an inner step passes through)."""
    try:
        return step()
    except SiteStepFailed:
        raise
    except Exception as error:
        site_log.exception("site %s: %s failed", site or "(unknown)", code)
        raise SiteStepFailed(failure_reason(code, error, site)) from None


def refuse(code: str, message: str, site: str | None = None) -> SiteStepFailed:
    """A refusal decided at the site: ``message`` (for the site's log only) is logged and
    the server gets ``code`` and the site name."""
    site_log.error("site %s: %s: %s", site or "(unknown)", code, message)
    reason = code if site is None or not SITE_NAME.match(site) else f"{code}:site={site}"
    return SiteStepFailed(reason)


def error_reply(failure: SiteStepFailed, request: Message) -> Message:
    """The error reply the server gets for a failed step."""
    return Message(Error(code=CLIENT_APP_FAILED, reason=failure.reason), reply_to=request)
