"""Run a call with a deadline: a hung reward function or engine call becomes an error instead of a silent stall.

The call runs in a daemon thread; the caller waits at most ``timeout`` seconds. Python cannot kill a thread, so a call
that really hangs keeps its thread (a daemon: it does not keep the process alive) and the caller gets
:class:`CallTimeout`. ``async def`` functions are run to completion on their own event loop inside that thread.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any, Callable


class CallTimeout(TimeoutError):
    pass


def run_call(fn: Callable, args: tuple, kwargs: dict) -> Any:
    """``fn(*args, **kwargs)``, run to completion on its own event loop when it returns an awaitable."""
    out = fn(*args, **kwargs)
    if inspect.isawaitable(out):
        async def wait():
            return await out

        return asyncio.run(wait())
    return out


def call_with_timeout(fn: Callable, args: tuple = (), kwargs: dict | None = None, *, timeout: float | None,
                      setup: Callable[[], None] | None = None) -> Any:
    """``fn(*args, **kwargs)`` (awaited when it returns an awaitable), or :class:`CallTimeout` after ``timeout`` s.

    ``timeout=None`` runs in the calling thread with no deadline (coroutines still get their own loop). ``setup`` runs
    first in the worker thread (e.g. ``torch.cuda.set_device``: the current device is per thread).
    """
    kwargs = kwargs or {}
    if timeout is None:
        return run_call(fn, args, kwargs)
    box: dict[str, Any] = {}

    def target():
        try:
            if setup is not None:
                setup()
            box["value"] = run_call(fn, args, kwargs)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True, name=f"timeout:{getattr(fn, '__name__', 'call')}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise CallTimeout(f"did not return within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")
