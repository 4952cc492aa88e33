"""glibc heap thresholds for CPU inference (dlibbridge.port.heap).

What is asserted is the mechanism — after the first batch a forward pass takes no fresh
pages from the kernel, and the environment's own choice is left alone; the time it saves
is measured by tools/bench_embed.py, never asserted here.  Each case runs in a fresh
interpreter (the thresholds are per process).
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
import json, resource, torch, dlibbridge
from dlibbridge import assets
from dlibbridge.port import heap
net = dlibbridge.to_torch(assets.face_model_path())
x = torch.randint(0, 256, (16, 150, 150, 3), dtype=torch.uint8)
with torch.inference_mode():
    net(x); net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        net(x)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(json.dumps({"applied": heap.reuse_freed_memory(), "faults": faults}))
"""


def _probe(**env) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=e, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_forward_passes_reuse_freed_feature_maps_unless_the_environment_chose():
    ours = _probe()
    theirs = _probe(MALLOC_MMAP_THRESHOLD_="131072")     # glibc's initial threshold, fixed
    assert ours["applied"] is True and theirs["applied"] is False
    assert theirs["faults"] > 1000                         # every batch maps its maps afresh
    assert ours["faults"] < theirs["faults"] / 10


def test_a_glibc_tunable_also_counts_as_the_environments_choice():
    assert _probe(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")["applied"] is False
