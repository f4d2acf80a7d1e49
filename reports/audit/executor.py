"""Where samples are computed, registered by name: ``local`` (this process, one model) or ``ray``
(one model per Ray actor; a local Ray instance by default, a cluster with ``address``).

Both run the same :class:`~.worker.AuditWorker` on the same tasks and hand each
:class:`~.worker.SampleOutput` back to the driver as it finishes; the driver writes it. So the
results are the same whichever executor ran them (a sample's result depends on its seed, not
on which worker ran it or what ran before).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from xmllm.errors import XmllmError
from .config import ExecutorConfig
from .worker import AuditWorker, SampleOutput, SampleTask, WorkerSpec

Done = Callable[[SampleOutput], None]
IN_FLIGHT_PER_WORKER = 2
"""Tasks queued on each actor: one running, one ready, so no actor waits on the driver."""


def run_local(tasks: Iterable[SampleTask], spec: WorkerSpec, options: ExecutorConfig, done: Done) -> dict[str, Any]:
    worker = AuditWorker(spec)
    for task in tasks:
        done(worker.process(task))
    import torch

    return {"executor": "local", "workers": 1, "torch_threads": torch.get_num_threads()}


def run_ray(tasks: Iterable[SampleTask], spec: WorkerSpec, options: ExecutorConfig, done: Done) -> dict[str, Any]:
    with RayPool(spec, options) as pool:
        pool.map(tasks, done)
        return {"executor": "ray", "workers": len(pool.actors), "num_cpus": options.num_cpus,
                "torch_threads": actor_threads(options.num_cpus),
                "num_gpus": options.num_gpus, "address": options.address or "local"}


class RayPool:
    """Ray actors, one model each (started on entry, killed on exit); :meth:`map` streams tasks
    to them, at most :data:`IN_FLIGHT_PER_WORKER` queued per actor, results handed back as they
    finish. Ray is started (and later shut down) only when no instance is connected yet."""

    def __init__(self, spec: WorkerSpec, options: ExecutorConfig) -> None:
        self.spec, self.options = spec, options
        self.actors: list[Any] = []
        self._started = False

    def __enter__(self) -> RayPool:  # noqa: PYI034
        ray = self.ray = import_ray()
        options = self.options
        self._started = not ray.is_initialized()
        if self._started:
            kwargs: dict[str, Any] = {"address": options.address} if options.address else {"include_dashboard": False}
            ray.init(log_to_driver=False, logging_level="ERROR", **kwargs)
        try:
            workers = options.workers or default_workers(ray, options)
            device = "cuda" if options.num_gpus > 0 else None
            remote = ray.remote(num_cpus=options.num_cpus, num_gpus=options.num_gpus)(RayWorker)
            spec = WorkerSpec(self.spec.config, self.spec.model_spec, self.spec.fingerprint, device)
            self.actors = [remote.remote(spec, options.num_cpus) for _ in range(workers)]
            _get(ray, [a.ready.remote() for a in self.actors])  # a model that cannot load fails here, once
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self._started:
            self.ray.shutdown()
            self._started = False

    def map(self, tasks: Iterable[SampleTask], done: Done, workers: int | None = None) -> None:
        """Every task on the first ``workers`` actors (all by default); ``done`` gets each output."""
        ray, actors = self.ray, self.actors[: workers or len(self.actors)]
        pending: dict[Any, Any] = {}
        queue: Iterator[SampleTask] = iter(tasks)
        free = [a for a in actors for _ in range(IN_FLIGHT_PER_WORKER)]
        exhausted = False
        while True:
            while free and not exhausted:
                task = next(queue, None)
                if task is None:
                    exhausted = True
                    break
                actor = free.pop(0)
                pending[actor.process.remote(task)] = actor
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1)
            free.append(pending.pop(ready[0]))
            done(_get(ray, ready[0]))


def actor_threads(num_cpus: float) -> int:
    """Torch threads of an actor given ``num_cpus`` CPUs (at least one)."""
    return max(1, int(num_cpus))


class RayWorker(AuditWorker):
    """An :class:`AuditWorker` as a Ray actor: torch threads pinned to the CPUs Ray gave it."""

    def __init__(self, spec: WorkerSpec, num_cpus: float) -> None:
        import torch

        torch.set_num_threads(actor_threads(num_cpus))
        self.failure: XmllmError | None = None
        try:
            super().__init__(spec)
        except XmllmError as exc:  # kept for ready(): an actor that dies in __init__ loses the message
            self.failure = exc

    def ready(self) -> bool:
        if self.failure is not None:
            raise self.failure
        return True


def default_workers(ray: Any, options: ExecutorConfig) -> int:
    """As many actors as the cluster's free resources hold (at least one)."""
    free = ray.available_resources()
    if options.num_gpus > 0:
        return max(1, int(free.get("GPU", 0) // options.num_gpus))
    return max(1, int(free.get("CPU", 1) // options.num_cpus))


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise XmllmError('executor ray needs Ray: pip install "xmllm[distributed]" (or "ray[default]>=2.30")') from None
    return ray


def _get(ray: Any, ref: Any) -> Any:
    """``ray.get`` with the actor's own error as a one-line message (an XmllmError stays one)."""
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
        if isinstance(cause, XmllmError):
            raise cause from None
        raise XmllmError(f"ray worker failed: {' '.join(str(cause or exc).split())[:300]}") from None
    except RayActorError as exc:
        raise XmllmError(f"ray worker died: {' '.join(str(exc).split())[:300]}") from None


EXECUTORS: dict[str, Callable[[Iterable[SampleTask], WorkerSpec, ExecutorConfig, Done], dict[str, Any]]] = {
    "local": run_local,
    "ray": run_ray,
}
