"""`mode-cotd pipeline CONFIG`: teacher -> distill -> gate -> compose -> eval, one bundle at the end.

    teacher   rationales for the seen tasks -> <work>/teacher/rationales.jsonl (+ .report.json)
    distill   one expert per seen task, trained on those rationales -> <bundle>/experts/<task>/ (+ report.json)
    gate      the router over the experts -> <bundle>/gate/ (+ <bundle>/reports/gate.json)
    gate_e2e  (opt-in) the gate tuned through the LM loss of the mixed experts -> <bundle>/gate/
    compose   one composition per unseen task from its shots -> manifest (+ <bundle>/reports/compose_<task>.json)
    eval      routes on the test sets -> <bundle>/reports/eval/eval.{json,md}
    summary   <work>/pipeline.json: what each stage produced and how long it took

The config (YAML, TOML or JSON) has the top-level keys of PipelineConfig; the sections
`teacher`, `distill`, `gate`, `gate_e2e`, `compose`, `eval` and `ray` hold the settings of
TeacherStage, training.distill.DistillConfig, training.gate.GateTrainConfig,
training.gate_e2e.GateE2EConfig, training.compose.ComposeConfig,
training.evaluate.EvalConfig and training.pipeline_ray.RayConfig, less the keys the pipeline
sets itself (student, bundle, task, data files). Every section is checked before any stage
runs: an unknown key is a ConfigError naming it. `student: tiny` builds the tiny test student
(mode_cotd.tiny) into <work>/student once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mode_cotd.atomic import atomic_dir, write_json_atomic
from mode_cotd.data import split_path, subsample
from mode_cotd.errors import ConfigError
from mode_cotd.settings import load_config_file, settings_from_dict
from mode_cotd.student import resolve_student, student_identity
from mode_cotd.tasks import SEEN_TASKS, UNSEEN_TASKS, get_task
from mode_cotd.tiny import build_tiny_student
from training import teacher
from training.compose import ComposeConfig, compose
from training.distill import DistillConfig, distill
from training.evaluate import EvalConfig, evaluate
from training.gate import GateTrainConfig, train_gate
from training.gate_e2e import GateE2EConfig, finetune_gate
from training.pipeline_ray import RayConfig, distill_experts_ray
from training.programmatic import PROGRAMMATIC_TEACHERS
from training.teacher import EndpointConfig

STAGES = ("teacher", "distill", "gate", "gate_e2e", "compose", "eval")
DEFAULT_STAGES = ("teacher", "distill", "gate", "compose", "eval")
"""What runs unless `stages` says otherwise (gate_e2e is opt-in)."""
TEACHER_SOURCES = ("import", "programmatic", "endpoint")
SET_BY_PIPELINE = {
    "distill": {"task", "student", "train_file", "data_dir", "bundle", "expert", "work_dir"},
    "gate": {"bundle", "student", "data_dir"},
    "gate_e2e": {"bundle", "student", "data_dir"},
    "compose": {"task", "bundle", "student", "name", "data_dir"},
    "eval": {"bundle", "student", "data_dir"},
}
"""Section keys the pipeline fills in itself; a config that sets them gets a ConfigError."""


@dataclass
class TeacherStage:
    """The pipeline's `teacher` section: where each seen task's rationales come from."""

    source: str = "import"
    """Default source: "import" (released rationale files), "programmatic" (exact teachers) or "endpoint"."""
    sources: dict[str, str] = field(default_factory=dict)
    """Task -> source, overriding `source` for that task."""
    files: dict[str, str] = field(default_factory=dict)
    """Task -> released rationale file to import; default: the task's shared train file."""
    subsample: int | None = None
    """Questions (or imported rationales) per task, drawn with the pipeline's seed; None: all."""
    endpoint: dict[str, Any] = field(default_factory=dict)
    """training.teacher.EndpointConfig settings (base_url, model, samples, ...) for the endpoint source."""

    def validate(self) -> None:
        for task, source in {"*": self.source, **self.sources}.items():
            if source not in TEACHER_SOURCES:
                raise ConfigError(f"teacher: source for {task!r} must be one of {TEACHER_SOURCES}, got {source!r}")
            if source == "programmatic" and task != "*" and task not in PROGRAMMATIC_TEACHERS:
                raise ConfigError(f"teacher: no programmatic teacher for {task!r}; "
                                  f"there are: {sorted(PROGRAMMATIC_TEACHERS)}")
        if self.subsample is not None and self.subsample < 1:
            raise ConfigError(f"teacher: subsample must be >= 1, got {self.subsample}")


@dataclass
class PipelineConfig:
    """A pipeline run (top-level keys of the config file)."""

    student: str | None = None
    """Student: a local HF folder, "tiny" (built into <work_dir>/student), or None for the default student."""
    work_dir: str = "runs/pipeline"
    """Where rationales, checkpoints and the summary go."""
    bundle: str | None = None
    """Bundle root; None: <work_dir>/bundle."""
    data_dir: str | None = None
    """Shared data folder; None: $MODE_COTD_DATA or ../shared/data/mode-cotd."""
    seed: int = 0
    """Seed of every stage (a section's own `seed` wins)."""
    seen_tasks: list[str] | None = None
    """Tasks that get an expert; None: the paper's 10 seen tasks."""
    unseen_tasks: list[str] | None = None
    """Tasks that get a few-shot composition; None: the paper's 4 unseen tasks."""
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    """Stages to run (always in pipeline order): teacher, distill, gate, gate_e2e, compose, eval."""
    teacher: dict[str, Any] = field(default_factory=dict)
    """TeacherStage settings."""
    distill: dict[str, Any] = field(default_factory=dict)
    """DistillConfig settings shared by every expert."""
    gate: dict[str, Any] = field(default_factory=dict)
    """GateTrainConfig settings."""
    gate_e2e: dict[str, Any] = field(default_factory=dict)
    """GateE2EConfig settings (used when `stages` has gate_e2e)."""
    compose: dict[str, Any] = field(default_factory=dict)
    """ComposeConfig settings shared by every unseen task."""
    eval: dict[str, Any] = field(default_factory=dict)
    """EvalConfig settings (tasks default to seen + unseen tasks)."""
    ray: dict[str, Any] = field(default_factory=dict)
    """RayConfig settings (opt-in distributed distillation)."""

    def validate(self) -> None:
        for task in [*(self.seen_tasks or ()), *(self.unseen_tasks or ())]:
            get_task(task)
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"pipeline: unknown stages {unknown}; stages: {list(STAGES)}")
        for section, keys in SET_BY_PIPELINE.items():
            clash = sorted(keys & set(getattr(self, section)))
            if clash:
                raise ConfigError(f"pipeline config: {section}: keys {clash} are set by the pipeline itself")


@dataclass
class Plan:
    """Every stage's validated settings, built before anything runs."""

    config: PipelineConfig
    work_dir: Path
    bundle: Path
    seen: list[str]
    unseen: list[str]
    teacher: TeacherStage
    endpoint: Any
    """training.teacher.EndpointConfig when a task's source is "endpoint", else None."""
    distill: list[DistillConfig]
    gate: GateTrainConfig
    gate_e2e: GateE2EConfig
    compose: list[ComposeConfig]
    eval: EvalConfig
    ray: RayConfig


def plan(config: PipelineConfig, source: str) -> Plan:
    """Check every section against its settings class; ConfigError names the section and key."""
    work = Path(config.work_dir)
    bundle = Path(config.bundle) if config.bundle else work / "bundle"
    student = str(work / "student") if config.student == "tiny" else config.student
    seen, unseen = list(config.seen_tasks or SEEN_TASKS), list(config.unseen_tasks or UNSEEN_TASKS)
    rationales = work / "teacher" / "rationales.jsonl"
    common = {"student": student, "bundle": str(bundle)}
    seeded = {"seed": config.seed}
    where = f"{source}: "
    teacher = settings_from_dict(TeacherStage, config.teacher, where + "teacher")
    endpoint = None
    if "endpoint" in [teacher.sources.get(task, teacher.source) for task in seen]:
        endpoint = settings_from_dict(EndpointConfig, teacher.endpoint, where + "teacher: endpoint")
    distill = [DistillConfig.from_dict(
        {**seeded, **config.distill, **common, "task": task, "data_dir": config.data_dir,
         "train_file": str(rationales) if "teacher" in config.stages or rationales.exists() else None,
         "work_dir": str(work / "distill" / task)}, where + "distill") for task in seen]
    gate = settings_from_dict(GateTrainConfig, {**seeded, **config.gate, **common, "data_dir": config.data_dir},
                              where + "gate")
    gate_e2e = settings_from_dict(GateE2EConfig, {**seeded, **config.gate_e2e, **common,
                                                  "data_dir": config.data_dir}, where + "gate_e2e")
    compose = [settings_from_dict(ComposeConfig, {**seeded, **config.compose, **common, "task": task,
                                                  "data_dir": config.data_dir}, where + "compose")
               for task in unseen]
    evaluation = settings_from_dict(EvalConfig, {**seeded, "tasks": seen + unseen, **config.eval, **common,
                                                 "data_dir": config.data_dir}, where + "eval")
    ray = settings_from_dict(RayConfig, config.ray, where + "ray")
    return Plan(config, work, bundle, seen, unseen, teacher, endpoint, distill, gate, gate_e2e, compose, evaluation,
                ray)


# ----------------------------------------------------------------------------- stages


def run_teacher(p: Plan) -> dict:
    """Collect each seen task's rationales into <work>/teacher/rationales.jsonl, filtered by answer."""
    output = p.work_dir / "teacher" / "rationales.jsonl"
    raw = teacher.raw_path(output)
    seed, n = p.config.seed, p.teacher.subsample
    for task in p.seen:
        source = p.teacher.sources.get(task, p.teacher.source)
        if source == "import":
            file = p.teacher.files.get(task) or split_path(task, "train", p.config.data_dir)
            samples = teacher.imported_samples(file, task)
            teacher.add_samples(raw, subsample(samples, n, seed) if n else samples)
            continue
        questions = teacher.question_examples(task, None, p.config.data_dir, n, seed)
        if source == "programmatic":
            teacher.add_samples(raw, teacher.programmatic_samples(questions))
        else:
            teacher.collect_from_endpoint(p.endpoint, questions, raw)
    report = teacher.filter_rationales(output)
    return {"rationales": str(output), "report": str(teacher.report_path(output)), "kept": report["kept"],
            "kept_fraction": report["kept_fraction"]}


def run_distill(p: Plan) -> dict:
    """One expert per seen task, in-process or as Ray tasks."""
    if p.ray.enabled:
        identity = student_identity(resolve_student(p.distill[0].student))
        results = distill_experts_ray(p.distill, p.ray, p.bundle, identity)
    else:
        results = [distill(config) for config in p.distill]
    return {config.task: {"expert_dir": str(r.expert_dir) if r.expert_dir else None,
                          "final_loss": r.report.get("final_loss"), "steps": r.report.get("steps")}
            for config, r in zip(p.distill, results)}


def run_gate(p: Plan) -> dict:
    result = train_gate(p.gate)
    return {"report": str(result.report_path), "routing_accuracy": result.report["routing_accuracy"],
            "balanced_routing_accuracy": result.report["balanced_routing_accuracy"]}


def run_gate_e2e(p: Plan) -> dict:
    report = finetune_gate(p.gate_e2e)
    return {"routing_accuracy": report["routing_accuracy"], "before": report["end_to_end"]["before"],
            "after": report["end_to_end"]["after"]}


def run_compose(p: Plan) -> dict:
    results = {}
    for config in p.compose:
        result = compose(config)
        results[config.task] = {"report": str(result.report_path), "uniform_loss": result.report["uniform"]["loss"],
                                "found_loss": result.report["found"]["loss"], "weights": result.weights}
    return results


def run_eval(p: Plan) -> dict:
    result = evaluate(p.eval)
    return {"report": str(result.out_dir / "eval.json"), "table": str(result.out_dir / "eval.md"),
            "routes": {route: {k: r[k] for k in ("seen_average", "unseen_average", "average")}
                       for route, r in result.report["routes"].items()}}


RUNNERS = {"teacher": run_teacher, "distill": run_distill, "gate": run_gate, "gate_e2e": run_gate_e2e,
           "compose": run_compose, "eval": run_eval}


def ensure_tiny_student(folder: Path) -> Path:
    """Build the tiny student into ``folder`` once (atomically)."""
    if not (folder / "config.json").is_file():
        with atomic_dir(folder) as tmp:
            build_tiny_student(tmp)
    return folder


def load_pipeline_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """A PipelineConfig from a YAML/TOML/JSON file (plus top-level overrides); ConfigError names bad keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: pipeline config not found")
    data = load_config_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    return settings_from_dict(PipelineConfig, {**data, **(overrides or {})}, str(path))


def run_pipeline(config: PipelineConfig, source: str = "pipeline config") -> dict:
    """Run the configured stages in order; returns (and writes to <work>/pipeline.json) the summary."""
    p = plan(config, source)
    if config.student == "tiny":
        ensure_tiny_student(p.work_dir / "student")
    summary: dict[str, Any] = {"config": asdict(config), "bundle": str(p.bundle), "stages": {}, "seconds": {}}
    for stage in STAGES:
        if stage not in config.stages:
            continue
        started = time.perf_counter()
        summary["stages"][stage] = RUNNERS[stage](p)
        summary["seconds"][stage] = round(time.perf_counter() - started, 3)
        write_json_atomic(p.work_dir / "pipeline.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mode-cotd pipeline", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="teacher -> distill -> gate [-> gate_e2e] -> compose -> eval from one config file "
                    "(YAML, TOML or JSON); see training/configs/.")
    parser.add_argument("config", type=Path, help="pipeline config file")
    parser.add_argument("--work-dir", default=None, help="override the config's work_dir")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=None, help="run only these stages")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("work_dir", args.work_dir), ("stages", args.stages)) if v is not None}
    summary = run_pipeline(load_pipeline_config(args.config, overrides), str(args.config))
    print(json.dumps({"bundle": summary["bundle"], "seconds": summary["seconds"],
                      "summary": str(Path(summary["config"]["work_dir"]) / "pipeline.json")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
