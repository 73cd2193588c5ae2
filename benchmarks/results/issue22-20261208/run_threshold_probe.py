"""Where the fused kernel stops beating a run's matmuls (pairs.FLAT_RUN_MAX_PAIRS): the decode step of
step_probe.py with N rows on one expert (dN) or on one top-2 mixture (mN), as one run (`run`) or flat in the
kernel (`flat`, RUN_MIN_ROWS out of reach).
Run: .venv/bin/python benchmarks/results/issue22-20261208/run_threshold_probe.py
"""
from pathlib import Path

probe = Path(__file__).resolve().with_name("step_probe.py")
src = probe.read_text()
src = src.replace("for trial in range(2):",
                  'STEPS = {f"d{n}": [member_id(layout, 4)] * n for n in (32, 64, 128)} | '
                  '{f"m{n}": [m2] * n for n in (16, 32, 64)}\n'
                  'LAYOUTS = {"run": {"FLAT_RUN_MAX_PAIRS": 0}, "flat": {"RUN_MIN_ROWS": 10**9}}\n'
                  "for trial in range(2):")
src = src.replace('ref = results["batch"][1]', 'ref = results["run"][1]')
src = src.replace('results["fused"][1][n]', 'results["flat"][1][n]')
src = src.replace("""+ f"  fused/batch {results['fused'][0] / results['batch'][0]:.2f}  max |fused - batch| {diff:.1e}",""",
                  """+ f"  flat/run {results['flat'][0] / results['run'][0]:.2f}",""")
# the sibling probe's own code with its steps and layouts swapped, so both measure the same way
exec(compile(src, str(probe), "exec"), {"__file__": str(probe), "__name__": "__main__"})  # noqa: S102
