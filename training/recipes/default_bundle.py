"""The recipe of the default bundle: SmolLM2-135M-Instruct experts for the 10 seen tasks.

Stages, each a plain call of the project's own training code, each resumable (distillation
checkpoints in the cache; finished experts are skipped) and each writing a JSON report:

  sweep     choose target modules, rank and epochs by the validation loss of a held-out 20%
            split of two small seen tasks' train files (never a test file)
  experts   distil the 10 seen-task experts with the chosen settings into ``bundles/default``;
            tasks with more than SUBSAMPLE train rationales are subsampled (seeded)
  all_data  the paper's all_data baseline: one LoRA on the union of the same training sets,
            into ``bundles/all_data`` (evaluation only; not served by default)

The gate and the compositions are separate commands (``mode-cotd train-gate`` /
``mode-cotd compose``); ``training/recipes/default_bundle.sh`` runs everything in order.

    python -m training.recipes.default_bundle --stage sweep|experts|all_data|all [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mode_cotd.atomic import write_json_atomic
from mode_cotd.data import load_task, train_val_split, write_jsonl
from mode_cotd.student import load_student, resolve_student
from mode_cotd.tasks import SEEN_TASKS
from training.distill import DistillConfig, distill
from training.objectives import TokenLoss

SUBSAMPLE = 1000
"""Most train rationales per task (aqua, commonsense_qa and gsm8k have 3-5k; the rest fewer)."""
SWEEP_TASKS = ("last_letter_concatenation", "addsub")
"""Small seen tasks whose train files are split 80/20 to choose the settings."""
SWEEP_CANDIDATES = {
    "qv-r16": {"target_modules": ["q_proj", "v_proj"], "r": 16, "lora_alpha": 32},
    "qkvo-r16": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "r": 16, "lora_alpha": 32},
    "all-linear-r8": {"target_modules": "all-linear", "r": 8, "lora_alpha": 16},
}
"""Adapter shapes tried (the paper's q,v r16 first); all keep a bf16 expert under ~5 MB."""
SWEEP_EPOCHS = (2, 4)
"""Epoch counts tried."""
COMMON = {"batch_size": 16, "lr": 5e-4, "lora_dropout": 0.1, "max_length": 512, "seed": 0, "progress": False}
"""Settings shared by every run (the paper's batch 16, lr 5e-4, dropout 0.1, max length 512)."""


def _distill(**settings) -> dict:
    started = time.perf_counter()
    result = distill(DistillConfig(**{**COMMON, **settings}))
    report = result.report
    return {"expert_dir": str(result.expert_dir), "final_loss": report["final_loss"], "steps": report["steps"],
            "tokens_per_second": report["tokens_per_second"], "seconds": time.perf_counter() - started}


def validation_loss(student: Path, expert_dir: Path, examples: list, device: str) -> float:
    """Mean target-token cross-entropy of the student with ``expert_dir`` on ``examples``."""
    import torch
    from peft import PeftModel

    dtype = "bfloat16" if device == "cuda" else "float32"
    model, tokenizer = load_student(student, dtype=dtype, device=device)
    model = PeftModel.from_pretrained(model, str(expert_dir)).to(device).eval()
    with torch.no_grad():
        return TokenLoss(model, tokenizer, examples, COMMON["max_length"], 16, device)()


def sweep(out: Path, student: Path, device: str) -> dict:
    """Train every candidate on 80% of each sweep task; pick the lowest mean validation loss."""
    report_path = out / "sweep.json"
    results = json.loads(report_path.read_text()) if report_path.exists() else {}
    for task in SWEEP_TASKS:
        train, val = train_val_split(load_task(task, "train"), 0.2, seed=0)
        train_file = out / "sweep-data" / f"{task}.train.jsonl"
        write_jsonl(train_file, train)
        for name, shape in SWEEP_CANDIDATES.items():
            for epochs in SWEEP_EPOCHS:
                key = f"{task}/{name}/e{epochs}"
                if key in results:
                    continue
                run = _distill(task=task, student=str(student), train_file=str(train_file), epochs=epochs,
                               bundle=str(out / "sweep-bundles" / f"{name}-e{epochs}"), **shape)
                run["val_loss"] = validation_loss(student, Path(run["expert_dir"]), val, device)
                run["val_examples"] = len(val)
                results[key] = run
                write_json_atomic(report_path, results)
                print(f"[sweep] {key}: val loss {run['val_loss']:.4f}", flush=True)
    means = {f"{n}/e{e}": sum(results[f"{t}/{n}/e{e}"]["val_loss"] for t in SWEEP_TASKS) / len(SWEEP_TASKS)
             for n in SWEEP_CANDIDATES for e in SWEEP_EPOCHS}
    best = min(means, key=means.get)
    name, epochs = best.split("/e")
    choice = {"candidate": name, "epochs": int(epochs), **SWEEP_CANDIDATES[name], "mean_val_loss": means}
    write_json_atomic(out / "choice.json", choice)
    print(f"[sweep] chose {best} (mean validation loss {means[best]:.4f})", flush=True)
    return choice


def experts(out: Path, bundle: Path, student: Path, choice: dict) -> dict:
    """Distil the 10 seen experts with the chosen settings into ``bundle``; skips finished ones."""
    shape = {k: choice[k] for k in ("target_modules", "r", "lora_alpha")}
    done = {}
    for task in SEEN_TASKS:
        if (bundle / "experts" / task / "adapter_model.safetensors").exists():
            continue
        done[task] = _distill(task=task, student=str(student), subsample=SUBSAMPLE, epochs=choice["epochs"],
                              bundle=str(bundle), **shape)
        print(f"[experts] {task}: final loss {done[task]['final_loss']:.4f} in {done[task]['seconds']:.0f} s",
              flush=True)
    return done


def all_data(out: Path, bundle: Path, student: Path, choice: dict) -> dict:
    """The all_data baseline: one expert on the union of the seen tasks' (subsampled) train sets."""
    shape = {k: choice[k] for k in ("target_modules", "r", "lora_alpha")}
    if (bundle / "experts" / "all_data" / "adapter_model.safetensors").exists():
        return {}
    run = _distill(task="all_data", tasks=list(SEEN_TASKS), student=str(student), subsample=SUBSAMPLE,
                   epochs=choice["epochs"], bundle=str(bundle), expert="all_data", **shape)
    print(f"[all_data] final loss {run['final_loss']:.4f} in {run['seconds']:.0f} s", flush=True)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("sweep", "experts", "all_data", "all"), default="all")
    parser.add_argument("--student", default=None, help="student folder (default: the converted default student)")
    parser.add_argument("--out", type=Path, default=Path("runs/default-bundle"), help="sweep runs and reports")
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    parser.add_argument("--all-data-bundle", type=Path, default=Path("bundles/all_data"))
    parser.add_argument("--smoke", action="store_true", help="2 steps per run, 20 examples: checks the recipe runs")
    args = parser.parse_args(argv)
    if args.smoke:
        global SUBSAMPLE
        SUBSAMPLE = 20
        COMMON.update(max_steps=2, batch_size=2, max_length=1024)

    import torch

    student = resolve_student(args.student)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    choice_path = args.out / "choice.json"
    if args.stage in ("sweep", "all"):
        sweep(args.out, student, device)
    if args.stage == "sweep":
        return 0
    if not choice_path.exists():
        print(f"no {choice_path}: run --stage sweep first", file=sys.stderr)
        return 2
    choice = json.loads(choice_path.read_text())
    if args.stage in ("experts", "all"):
        experts(args.out, args.bundle, student, choice)
    if args.stage in ("all_data", "all"):
        all_data(args.out, args.all_data_bundle, student, choice)
    return 0


if __name__ == "__main__":
    sys.exit(main())
