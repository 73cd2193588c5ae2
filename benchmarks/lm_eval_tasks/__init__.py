"""lm-eval tasks built from the paper's test files (`lm_eval --include_path benchmarks/lm_eval_tasks`); see utils.py."""
