"""Offline training: teacher rationales, expert distillation, gate training, composition, evaluation."""
