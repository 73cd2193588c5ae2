"""The ingress's routes while runtime routes are on: the bundle's, plus the state folder's, kept current.

    current()            the bundle's RouteTable merged with the runtime state (re-merged when its version
                         changes: one stat per request otherwise)
    load_expert(...)     check a LoRA folder (serving/runtime_adapters.py), copy it into the state folder
    unload(name)         drop a runtime expert or composition from the routes
    add_composition(...) record a composition found by a job (serving/composition_jobs.py)

Names: a runtime route is served as "<served name>:<name>"; the name may not be a bundle route's, the
student's, another runtime route's, or a name a running job holds (409, code "conflict"). At most
`runtime.max_routes` runtime routes (400). Unloading takes the route away from new requests at once;
requests in flight finish with the adapter they hold (its folder is deleted only at the next start,
mode_cotd.runtime_state.RuntimeState.collect_garbage).
"""

from __future__ import annotations

import logging
import threading

from mode_cotd.errors import ModeCotdError
from mode_cotd.mixture import check_name
from mode_cotd.runtime_state import RuntimeSnapshot, RuntimeState
from serving.errors import Conflict, InvalidRequest, ModelNotFound
from serving.routes import Route, RouteTable
from serving.runtime_adapters import AdapterRoots, StudentFit
from serving.settings import RuntimeSettings

logger = logging.getLogger(__name__)


class RuntimeRoutes:
    """RouteTable's reading interface (resolve, models, model_ids, served_experts, experts) over bundle + runtime
    routes."""

    def __init__(self, base: RouteTable, state: RuntimeState | None, settings: RuntimeSettings,
                 fit: StudentFit | None = None):
        self.base = base
        self.state = state
        self.settings = settings
        self.fit = fit
        self.roots = AdapterRoots.of(settings.adapter_roots)
        self.reserved: set[str] = set()
        """Names held by jobs in flight on this replica."""
        self._table = base
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------ reading

    def current(self) -> RouteTable:
        """The routes as they are now."""
        if self.state is None:
            return self.base
        try:
            snapshot = self.state.snapshot()
        except ModeCotdError as e:  # a damaged state file: keep serving the routes last read
            logger.error("runtime state unreadable, serving version %d: %s", self._table.runtime_version, e)
            return self._table
        if snapshot.version != self._table.runtime_version:
            self._table = self._merged(snapshot)
        return self._table

    def _merged(self, snapshot: RuntimeSnapshot) -> RouteTable:
        compositions = {n: (c.weights, c.mode) for n, c in snapshot.compositions.items()}
        return self.base.with_runtime(list(snapshot.experts), compositions, snapshot.version)

    def resolve(self, model: str, mixture=None) -> Route:
        return self.current().resolve(model, mixture)

    def models(self):
        return self.current().models()

    def model_ids(self) -> list[str]:
        return self.current().model_ids()

    def served_experts(self, adapter) -> dict[str, float]:
        return self.base.served_experts(adapter)  # the shared adapter is the bundle's; runtime routes keep it

    @property
    def experts(self) -> list[str]:
        return self.current().experts

    @property
    def served_name(self) -> str:
        return self.base.served_name

    @property
    def student_name(self) -> str:
        return self.base.student_name

    def runtime_names(self) -> set[str]:
        """Names of the runtime experts and compositions."""
        if self.state is None:
            return set()
        snapshot = self.state.snapshot()
        return {*snapshot.experts, *snapshot.compositions}

    # ------------------------------------------------------------------------ writing

    def route_name(self, lora_name: object, param: str = "lora_name") -> str:
        """The route name in `lora_name` ("<name>" or "<served name>:<name>"); 400 when it is not a valid name."""
        if not isinstance(lora_name, str) or not lora_name:
            raise InvalidRequest(f"{param} must be a non-empty string", param=param)
        prefix = f"{self.served_name}:"
        name = lora_name.removeprefix(prefix)
        try:
            return check_name(name, param)
        except ModeCotdError as e:
            raise InvalidRequest(str(e), param=param) from e

    def claim(self, name: str, param: str) -> None:
        """Hold `name` for a new runtime route (409 when taken, 400 past max_routes); `release` it after."""
        with self._lock:
            if name in self.base.names() or name == self.served_name:
                raise Conflict(f"{param} {name!r} is a route of the bundle; choose another name", param=param)
            runtime = self.runtime_names()
            if name in runtime or name in self.reserved:
                raise Conflict(f"{param} {name!r} is already loaded (or being composed); unload it first",
                               param=param)
            if len(runtime) + len(self.reserved) >= self.settings.max_routes:
                raise InvalidRequest(f"this server holds {self.settings.max_routes} runtime routes "
                                     "(runtime.max_routes); unload one first", param=param, code="too_many_routes")
            self.reserved.add(name)

    def release(self, name: str) -> None:
        with self._lock:
            self.reserved.discard(name)

    def load_expert(self, lora_name: object, lora_path: object) -> str:
        """Check and add a runtime expert; its route name. Blocking (file copies): call it in a thread."""
        name = self.route_name(lora_name)
        if self.state is None or self.fit is None:
            raise ModelNotFound("runtime routes are off on this server (runtime.enabled)")
        self.claim(name, "lora_name")
        try:
            with self.roots.local(lora_path) as folder:
                try:
                    self.state.add_expert(name, folder, self.fit.check)
                except ModeCotdError as e:
                    raise InvalidRequest(str(e), param="lora_path", code="invalid_adapter") from e
        finally:
            self.release(name)
        return name

    def unload(self, lora_name: object) -> str:
        """Drop a runtime expert or composition; its route name (404 when there is none of that name)."""
        name = self.route_name(lora_name)
        if self.state is None:
            raise ModelNotFound("runtime routes are off on this server (runtime.enabled)")
        snapshot = self.state.snapshot()
        try:
            if name in snapshot.experts:
                self.state.remove_expert(name)
            elif name in snapshot.compositions:
                self.state.remove_composition(name)
            elif name in self.base.names():
                raise InvalidRequest(f"{name!r} is a route of the bundle, which cannot be unloaded", param="lora_name")
            else:
                raise ModelNotFound(f"The lora adapter {name!r} cannot be found.", param="lora_name")
        except ModeCotdError as e:  # e.g. a runtime composition still uses the expert
            raise InvalidRequest(str(e), param="lora_name") from e
        return name
