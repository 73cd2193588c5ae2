"""`LocalBackend`: the HTTP layer's Backend over the plain router and student in one process.

Used by tests (with a fake engine) and anywhere the app runs without Ray; the Ray
deployments provide the same three calls over deployment handles (serving.deployments).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from serving.errors import ModelNotFound
from serving.protocol import GateDecision, GenerationEvent, GenerationRequest
from serving.router import GateRouter
from serving.student_service import StudentService


class LocalBackend:
    """Calls the router and the student service directly (one prompt per gate call)."""

    def __init__(self, student: StudentService, router: GateRouter | None):
        self.student = student
        self.router = router

    async def ready(self) -> bool:
        return self.student.ready

    async def route(self, text: str) -> GateDecision:
        if self.router is None:
            raise ModelNotFound("this bundle has no gate", param="model")
        return self.router.decide([text])[0]

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        return self.student.generate(request)

    async def stats(self) -> dict:
        return self.student.stats()
