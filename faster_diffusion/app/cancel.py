"""Stopping a generation between denoising steps when the thread that waits for it is interrupted.

Cog cancels a running prediction of a synchronous ``run()`` by raising ``CancelationException`` *inside* the
thread that runs it, asynchronously: the exception surfaces at whatever Python line that thread is executing
(cog 0.23 / coglet, observed: it lands within milliseconds, in the middle of any computation). If that thread
were running the pipeline, the exception could land halfway through a UNet forward or while hooks are being
attached or removed.

:func:`run_stoppable` keeps the pipeline out of its way. The generation runs in a worker thread and the
calling thread only waits; an exception raised into the waiting thread asks the generation to stop, which it
does at its next step boundary through diffusers' ``callback_on_step_end`` (:meth:`StopRequest.callback`).
Once the worker has stopped, the original exception is re-raised in the caller, so Cog sees its own
cancellation and reports the prediction as canceled. Cog takes the next prediction only when ``run()`` has
returned, and ``run()`` returns only after the worker has finished: the pipeline never serves two threads.

Example:
    >>> from faster_diffusion.app.cancel import run_stoppable
    >>> run_stoppable(lambda stop: generate(pipe, request, step_callback=stop.callback))  # doctest: +SKIP
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: How often the waiting thread returns to Python, so that an exception raised into it is noticed.
_POLL_SECONDS = 0.05


class StoppedBetweenSteps(Exception):
    """Raised from a step callback to end a generation early, after ``steps_done`` steps."""

    def __init__(self, steps_done: int) -> None:
        super().__init__(f"stopped after {steps_done} steps")
        self.steps_done = steps_done


class StopRequest:
    """A request to stop, checked by the pipeline at the end of every step."""

    def __init__(self) -> None:
        self._requested = threading.Event()

    def set(self) -> None:
        self._requested.set()

    @property
    def is_set(self) -> bool:
        return self._requested.is_set()

    def callback(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        """diffusers' ``callback_on_step_end``: end the run here if a stop was requested."""
        if self._requested.is_set():
            raise StoppedBetweenSteps(step + 1)
        return tensors


def run_stoppable(
    work: Callable[[StopRequest], T], on_interrupt: Callable[[BaseException | None], None] | None = None
) -> T:
    """Run ``work(stop)`` in a worker thread and wait for it.

    ``work`` must pass ``stop.callback`` to the pipeline as its step callback. If an exception is raised into
    the waiting thread (Cog's cancellation, or ``KeyboardInterrupt``), the stop is requested, the worker is
    awaited until it stops at its next step boundary, ``on_interrupt`` is called with what the worker ended
    with (a :class:`StoppedBetweenSteps` when it stopped early, ``None`` if it had already finished), and the
    interrupting exception is re-raised. Otherwise the worker's result is returned, or its exception raised.

    Starting the worker is part of this: an exception that lands once the worker has begun ``work`` (even
    while ``Thread.start()`` still runs) waits for it to stop, and one that lands before makes sure ``work``
    never runs (``on_interrupt`` then gets ``None``). Either way, when this raises, nothing is running.

    The worker runs in a copy of the caller's context, so that what it prints or logs is attributed to the
    same prediction by servers that route output through context variables (as coglet does).
    """
    stop = StopRequest()
    outcome: dict[str, Any] = {}
    finished = threading.Event()
    # Who goes first: the worker, as it begins, or the waiting thread, interrupted before the worker began.
    # dict.setdefault is atomic, so exactly one of them claims it: a worker that finds the waiting thread
    # there returns without running ``work``, and a waiting thread that finds the worker there waits for it.
    claim: dict[str, str] = {}

    def target() -> None:
        if claim.setdefault("first", "worker") != "worker":
            return  # the waiting thread was interrupted before this thread began: run nothing
        try:
            outcome["value"] = work(stop)
        except BaseException as error:  # handed to the waiting thread, which re-raises it
            outcome["error"] = error
        finally:
            finished.set()

    context = contextvars.copy_context()
    worker = threading.Thread(target=context.run, args=(target,), name="generate", daemon=True)
    started = False
    interruption: BaseException | None = None
    while True:
        # Starting the worker is inside the loop: an exception raised into this thread at any line from here
        # on, in Thread.start() included, lands in the handler below.
        try:
            if interruption is not None:
                stop.set()
                if claim.setdefault("first", "waiting") == "waiting":
                    break  # the worker has not begun the work, and now never will
            elif not started:
                started = True
                worker.start()
            # Sleep and read a flag rather than Thread.join() or Event.wait(): an exception raised into a
            # thread blocked in those can corrupt their lock state (join() then calls a live thread finished).
            while not finished.is_set():
                time.sleep(_POLL_SECONDS)
            break
        except BaseException as error:  # raised into this thread from outside: stop at the next step
            interruption = interruption or error
    error = outcome.get("error")
    if interruption is not None:
        if on_interrupt is not None:
            on_interrupt(error)
        raise interruption
    if error is not None:
        raise error
    return outcome["value"]
