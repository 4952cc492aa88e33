"""glibc heap thresholds for CPU inference (dlibbridge.port.heap), applied by
``dlibbridge.tune_cpu()`` only.

What is asserted is the mechanism — without ``tune_cpu`` every forward pass maps its feature
maps afresh (a library call leaves the allocator alone); with it, after the first batch a
forward pass takes no fresh pages from the kernel, and the environment's own choice is left
alone; the time it saves is measured by tools/bench_embed.py, never asserted here.  Each case
runs in a fresh interpreter (the thresholds are per process).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's heap only")

PROBE = """
import json, resource, sys, torch, dlibbridge
from dlibbridge.port import heap
if sys.argv[1] == "tune":
    dlibbridge.tune_cpu()
net = dlibbridge.to_torch("default")
x = torch.randint(0, 256, (16, 150, 150, 3), dtype=torch.uint8)
with torch.inference_mode():
    net(x); net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        net(x)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(json.dumps({"applied": heap.in_effect(), "faults": faults}))
"""


def _probe(tune: bool, **env) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE, "tune" if tune else "library"], env=e,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tune_cpu_makes_forward_passes_reuse_freed_feature_maps_and_a_library_call_does_not():
    tuned, untouched = _probe(True), _probe(False)
    theirs = _probe(True, MALLOC_MMAP_THRESHOLD_="131072")     # glibc's initial threshold, fixed
    assert tuned["applied"] is True and untouched["applied"] is False and theirs["applied"] is False
    assert theirs["faults"] > 1000 and untouched["faults"] > 1000   # every batch maps its maps afresh
    assert tuned["faults"] < untouched["faults"] / 10


def test_a_glibc_tunable_also_counts_as_the_environments_choice():
    assert _probe(True, GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")["applied"] is False
