"""mode-cotd core library: tasks and scoring, data, the student, the bundle format,
mixing math and the gate. Never imports ray, vllm or fastapi."""

__version__ = "0.1.0"
