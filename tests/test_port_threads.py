"""The OpenMP thread policy the torch port runs under (dlibbridge.port.threads).

What matters is that the mechanism is applied — the speed it buys on shared cores is
measured by tools/bench_embed.py --threads-study, never asserted here.  libgomp reads its
policy when torch is imported, so each case runs in a fresh interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, os, sys, warnings
{imports}
from dlibbridge import assets
from dlibbridge.port import threads
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    dlibbridge.to_torch(assets.face_model_path())
print(json.dumps({{"env": os.environ.get("OMP_WAIT_POLICY"), "policy": threads.openmp_wait_policy(),
                   "threads": torch.get_num_threads(), "warned": [str(w.message) for w in caught]}}))
"""


def _probe(imports: str, **env) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)], env=e,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_dlibbridge_first_makes_idle_openmp_threads_sleep():
    r = _probe("import dlibbridge, torch")
    assert r["env"] == "PASSIVE" and r["policy"] == "passive" and r["warned"] == []


def test_an_explicit_policy_in_the_environment_wins():
    r = _probe("import dlibbridge, torch", OMP_WAIT_POLICY="active")
    assert r["env"] == "active" and r["policy"] == "active"


def test_torch_first_with_a_spinning_pool_is_sized_to_free_cores_and_warns():
    r = _probe("import torch, dlibbridge")
    assert r["policy"] == "default" and r["env"] is None
    assert len(r["warned"]) == 1 and "OMP_WAIT_POLICY=PASSIVE" in r["warned"][0]
    cores = len(os.sched_getaffinity(0))
    assert 1 <= r["threads"] <= cores
    assert f"uses {r['threads']} of " in r["warned"][0]


def test_a_thread_count_chosen_by_the_user_is_left_alone():
    r = _probe("import torch, dlibbridge; dlibbridge.set_threads(1)")
    assert r["threads"] == 1 and r["warned"] == []
    r = _probe("import torch, dlibbridge", OMP_NUM_THREADS="1")
    assert r["threads"] == 1 and r["warned"] == []


def test_threads_context_restores_the_previous_count():
    import torch

    from dlibbridge.port import threads
    before = torch.get_num_threads()
    with threads.threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError):
        threads.set_threads(0)
