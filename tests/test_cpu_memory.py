"""retain_freed_memory: a freed tensor's pages are reused by the next one instead of being faulted in again."""

import json
import subprocess
import sys

# Ten "steps", each holding twenty 8 MiB tensors at once (a step's activations), then freeing them all; prints the
# page faults of the last nine steps.
CHURN = """
import json, resource, sys
import torch
from dp_utils.cpu_memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step = [torch.empty(2 * 2**20).fill_(1.0) for _ in range(20)]
    del step
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": sum(faults[1:])}))
"""


def churn(setting: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHURN, setting], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_freed_pages_are_reused_instead_of_faulted_in_again():
    default, retained = churn("default"), churn("retain")
    assert retained["applied"]  # this machine runs glibc
    assert default["faults"] >= 0.9 * 9 * 20 * 2048  # 8 MiB = 2048 pages, given back and faulted in every step
    assert retained["faults"] < 0.05 * default["faults"]
