"""CPU settings of the torch port (dlibbridge.port.threads, dlibbridge.port.runtime).

A library call leaves the process alone — environment, torch's thread count, the allocator —
whatever the import order; ``dlibbridge.tune_cpu()`` (which the command line calls) applies
the OpenMP policy and thread sizing explicitly.  What matters here is the mechanism; the speed
it buys on shared cores is measured by tools/bench_embed.py, never asserted.  libgomp reads
its policy when torch is imported, so each case runs in a fresh interpreter.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, os, sys, warnings
env_before = dict(os.environ)
tuned = None
{imports}
threads_at_import = torch.get_num_threads()
from dlibbridge.port import heap, threads
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    {calls}
    net = dlibbridge.to_torch("default")
    with torch.inference_mode():
        net(torch.randint(0, 256, (4, 150, 150, 3), dtype=torch.uint8))
print(json.dumps({{"env_changed": sorted(k for k in set(env_before) | set(os.environ)
                                          if env_before.get(k) != os.environ.get(k)),
                   "env": os.environ.get("OMP_WAIT_POLICY"), "policy": threads.openmp_wait_policy(),
                   "threads_at_import": threads_at_import, "threads": torch.get_num_threads(),
                   "heap": heap.in_effect(), "tuned": tuned, "warned": [str(w.message) for w in caught]}}))
"""

TORCH_FIRST, DLIBBRIDGE_FIRST = "import torch, dlibbridge", "import dlibbridge, torch"


def _probe(imports: str, calls: str = "pass", **env) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports, calls=calls)], env=e,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("imports", [TORCH_FIRST, DLIBBRIDGE_FIRST])
def test_library_calls_leave_the_process_alone(imports):
    r = _probe(imports)
    assert r["env_changed"] == [] and r["env"] is None and r["policy"] == "default"
    assert r["threads"] == r["threads_at_import"] and r["heap"] is False and r["warned"] == []


def test_tune_cpu_before_torch_makes_idle_openmp_threads_sleep_once():
    r = _probe("import dlibbridge; tuned = [dlibbridge.tune_cpu(), dlibbridge.tune_cpu()]; import torch")
    first, second = r["tuned"]
    assert r["env"] == "PASSIVE" and r["policy"] == "passive" and r["env_changed"] == ["OMP_WAIT_POLICY"]
    assert any("OMP_WAIT_POLICY=PASSIVE" in line for line in first) and second == []
    assert r["threads"] == r["threads_at_import"] and r["warned"] == []


def test_an_explicit_policy_in_the_environment_wins():
    r = _probe("import dlibbridge; tuned = dlibbridge.tune_cpu(); import torch", OMP_WAIT_POLICY="active")
    assert r["env"] == "active" and r["policy"] == "active"
    assert not any("OMP_WAIT_POLICY" in line for line in r["tuned"])


def test_tune_cpu_after_torch_sizes_a_spinning_pool_to_free_cores_and_says_so():
    r = _probe(TORCH_FIRST, "tuned = dlibbridge.tune_cpu()")
    assert r["policy"] == "default" and r["env"] is None and r["warned"] == []
    cores = len(os.sched_getaffinity(0))
    assert 1 <= r["threads"] <= r["threads_at_import"] <= cores
    sized = [line for line in r["tuned"] if line.startswith("torch threads")]
    if r["threads"] == r["threads_at_import"]:       # every core was free when it was called
        assert sized == []
    else:
        assert len(sized) == 1 and sized[0].startswith(f"torch threads {r['threads_at_import']} -> {r['threads']} ")


def test_a_thread_count_chosen_by_the_user_is_left_alone():
    r = _probe(TORCH_FIRST, "dlibbridge.set_threads(1); tuned = dlibbridge.tune_cpu()")
    assert r["threads"] == 1 and not any(line.startswith("torch threads") for line in r["tuned"])
    r = _probe(TORCH_FIRST, "tuned = dlibbridge.tune_cpu()", OMP_NUM_THREADS="1")
    assert r["threads"] == 1 and not any(line.startswith("torch threads") for line in r["tuned"])


def test_the_command_line_tunes_its_own_process(face_model_path):
    code = ("import json, os, sys\nfrom dlibbridge import cli\nfrom dlibbridge.port import heap\n"
            f"cli.main(['inspect', {str(face_model_path)!r}])\n"
            "print(json.dumps({'env': os.environ.get('OMP_WAIT_POLICY'), 'heap': heap.in_effect(), "
            "'torch': 'torch' in sys.modules}))")
    e = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY" and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r == {"env": "PASSIVE", "heap": platform.libc_ver()[0] == "glibc", "torch": False}


def test_threads_context_restores_the_previous_count():
    import torch

    from dlibbridge.port import threads
    before = torch.get_num_threads()
    with threads.threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError):
        threads.set_threads(0)
