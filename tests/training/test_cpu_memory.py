"""retain_freed_memory: a freed tensor's pages are reused by the next one instead of being faulted in again."""

import json
import subprocess
import sys

# Ten "steps", each holding twenty 8 MiB tensors at once (a step's activations), then freeing them all; prints the
# page faults of the last nine steps.
CHURN = """
import json, resource
import torch
from dp_utils.training.cpu_memory import retain_freed_memory
applied = retain_freed_memory()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step = [torch.empty(2 * 2**20).fill_(1.0) for _ in range(20)]
    del step
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": sum(faults[1:])}))
"""


def churn() -> dict:
    out = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_freed_pages_are_reused_instead_of_faulted_in_again():
    retained = churn()
    assert retained["applied"]  # this machine runs glibc
    # Nine steps write 9 * 20 * 2048 pages (8 MiB = 2048 pages). glibc's defaults give them back and fault most of
    # them in again (368k faults in most runs here, 43k in some: its thresholds adapt to earlier frees); kept, the
    # pages of the first step serve all the others.
    assert retained["faults"] < 0.05 * 9 * 20 * 2048
