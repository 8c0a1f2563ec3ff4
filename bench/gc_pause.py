"""Garbage-collector pauses in a worker's processes: a full pass before and after `gc.freeze()`.

    .venv/bin/python bench/gc_pause.py [--passes 5]

Python runs a full (generation-2) collection now and then as new objects pile up, and it walks
every tracked object, however old: in a worker that is what start-up imported (torch,
transformers, Celery, SQLAlchemy), and the thread that triggers the pass waits for it — the
batch engine's step loop, or a task on its way to a claim. For each process kind the script
starts a fresh Python that imports what that process imports (`worker`: `workers.main` and the
batch engine; `result-writer`: `workers.result_process`, which must not import torch), times
`gc.collect()` (median of --passes), then freezes as `run_worker` and the writer's `serve` do
and times it again. Baseline: the pass unfrozen; result: frozen; ratio: frozen / unfrozen.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time

IMPORTS = {
    "worker": ["workers.main", "workers.batch_engine", "transformers"],
    "result-writer": ["workers.result_process"],
}


def time_passes(passes: int) -> float:
    """Return the median wall time of a full collection, in ms."""
    times = []
    for _ in range(passes):
        started = time.perf_counter()
        gc.collect()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def measure(kind: str, passes: int) -> dict:
    """In this process: import what `kind` imports, then time full passes before and after freezing."""
    import importlib

    for module in IMPORTS[kind]:
        importlib.import_module(module)
    tracked = len(gc.get_objects())
    unfrozen = time_passes(passes)
    gc.freeze()
    return {"tracked": tracked, "unfrozen_ms": unfrozen, "frozen_ms": time_passes(passes),
            "torch": "torch" in sys.modules}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--measure", choices=list(IMPORTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.passes)))
        return
    print(f"settings: full collections (gc.collect), median of {args.passes}, each process kind in a fresh Python")
    for kind in IMPORTS:
        output = subprocess.run([sys.executable, __file__, "--measure", kind, "--passes", str(args.passes)],
                                check=True, capture_output=True, text=True).stdout
        found = json.loads(output.splitlines()[-1])
        print(f"{kind:13s} {found['tracked']:>8,} objects tracked (torch imported: {found['torch']})")
        print(f"  baseline  full pass, unfrozen : {found['unfrozen_ms']:8.2f} ms")
        print(f"  result    full pass, frozen   : {found['frozen_ms']:8.2f} ms")
        print(f"  ratio     frozen / unfrozen   : {found['frozen_ms'] / found['unfrozen_ms']:8.3f}")


if __name__ == "__main__":
    main()
