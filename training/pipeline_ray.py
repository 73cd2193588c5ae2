"""Distil a bundle's experts as Ray tasks: one task per expert, results collected by the driver.

    driver: DistillConfig per task -> ray task (num_gpus when set) -> distill into a task-local bundle
            -> the expert's files and report come back as bytes -> driver: bundle.add_expert

The experts train independently, so each is one Ray task; the task returns the expert's
PEFT files (a few MB) rather than a path, so workers need no filesystem shared with the
driver and only the driver writes the bundle (one writer at a time, as the bundle wants).
Each worker must be able to import mode_cotd and training and to find the student (the
default student is converted on first use on each node; a local student folder must exist
at the same path there). It is opt-in: `ray: {enabled: true}` in the pipeline config.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mode_cotd.bundle import MANIFEST, add_expert, create_bundle
from mode_cotd.errors import ConfigError
from training.distill import DistillConfig, DistillResult, distill


@dataclass
class RayConfig:
    """The pipeline's `ray` section."""

    enabled: bool = False
    """Run the distillation stage as Ray tasks; false: in-process, one expert after another."""
    address: str | None = None
    """Ray cluster to join ("auto", "ray://host:10001"); None: start a local instance."""
    num_cpus: float = 1
    """CPUs each expert's task asks for."""
    num_gpus: float | None = None
    """GPUs each expert's task asks for; None: none (CPU training)."""
    local_num_cpus: int | None = None
    """CPUs of a local instance started here (ray.init(num_cpus=...)); None: all of this machine's."""

    def validate(self) -> None:
        if self.num_cpus < 0 or (self.num_gpus is not None and self.num_gpus < 0):
            raise ConfigError("ray: num_cpus and num_gpus must be >= 0")
        if self.local_num_cpus is not None and self.local_num_cpus < 1:
            raise ConfigError("ray: local_num_cpus must be >= 1")


def distill_task(settings: dict) -> dict:
    """Body of one Ray task: distil into a private bundle, return the expert's files, report and name."""
    with tempfile.TemporaryDirectory(prefix="mode-cotd-ray-") as tmp:
        config = DistillConfig(**{**settings, "bundle": str(Path(tmp) / "bundle"), "progress": False})
        result = distill(config)
        if result.expert_dir is None:
            return {"name": config.expert or config.task, "task": config.task, "files": None, "report": result.report}
        files = {f.name: f.read_bytes() for f in sorted(Path(result.expert_dir).iterdir())
                 if f.is_file() and f.name != "report.json"}
        return {"name": config.expert or config.task, "task": config.task, "files": files, "report": result.report}


def distill_experts_ray(configs: list[DistillConfig], ray_config: RayConfig, bundle: str | Path,
                        student_identity: dict) -> list[DistillResult]:
    """Run each config as a Ray task and add the experts to ``bundle`` (created for the student when missing)."""
    import ray

    ray_config.validate()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=ray_config.address, num_cpus=ray_config.local_num_cpus if ray_config.address is None else None,
                 include_dashboard=False, log_to_driver=False)
    try:
        options = {"num_cpus": ray_config.num_cpus}
        if ray_config.num_gpus:
            options["num_gpus"] = ray_config.num_gpus
        remote = ray.remote(**options)(distill_task)
        outputs = ray.get([remote.remote(dataclasses.asdict(c)) for c in configs])
    finally:
        if started_here:
            ray.shutdown()

    bundle = Path(bundle)
    if not (bundle / MANIFEST).exists():
        create_bundle(bundle, student_identity)
    results = []
    for output in outputs:
        if output["files"] is None:
            results.append(DistillResult(expert_dir=None, report=output["report"]))
            continue
        with tempfile.TemporaryDirectory(prefix="mode-cotd-expert-") as tmp:
            for name, data in output["files"].items():
                (Path(tmp) / name).write_bytes(data)
            add_expert(bundle, output["name"], tmp, output["task"], output["report"])
        results.append(DistillResult(expert_dir=bundle / "experts" / output["name"], report=output["report"]))
    return results
