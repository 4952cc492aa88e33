#!/usr/bin/env python
"""Throughput of the torch port vs dlib's own ``compute_face_descriptor``, same run, same chips.

    python tools/bench_embed.py                       # CPU: dlib + every port variant, batches 1,16,64,256
    python tools/bench_embed.py --variants eager,onnxruntime --batch-sizes 64
    python tools/bench_embed.py --device cuda --batch-sizes 256,1024 --variants eager,fp16,bf16 --no-dlib
    python tools/bench_embed.py --threads-study --rounds 3      # thread policies, idle vs one busy core
    python tools/bench_embed.py --overlap --photos 200 --rounds 3   # embed + evaluate end to end, serial vs overlapped
    python tools/bench_embed.py --interleave --variants unfolded,eager,nchw --batch-sizes 64 --rounds 30

Engines (``--variants``):

* ``dlib``          — ``dlib.face_recognition_model_v1.compute_face_descriptor(list_of_chips)``
                      (the batched list form; always measured unless ``--no-dlib``);
* ``eager``         — ``to_torch`` frozen form as returned (channels_last weights, batches
                      over ``cpu_chunk`` = 32 run in chunks), ``torch.inference_mode``;
* ``nchw``          — the same with contiguous NCHW weights (PyTorch's default layout);
* ``unfused``       — the same without oneDNN's post-ops and once-reordered weights
                      (``dlibbridge.port.onednn.disabled()``: folded convolutions through
                      ``F.conv2d``, then relu and residual adds as separate ops);
* ``unfolded``      — the same, but each convolution followed by its own affine pass (what
                      ``eager`` did before it folded the affines into the convolutions);
* ``jit_onednn``    — TorchScript trace → ``torch.jit.freeze`` → ``optimize_for_inference``
                      (oneDNN conv+relu/add fusions, prepacked weights);
* ``compile``       — ``torch.compile`` (inductor, ``freezing=True``: prepacked oneDNN
                      convolutions, fused elementwise tails); compile time reported separately;
* ``onnxruntime``   — the ``export_onnx`` graph in onnxruntime's CPU provider;
* ``fp16`` / ``bf16`` — CUDA only: ``module.half()`` / ``.bfloat16()`` (input means stay fp32).

Every variant's descriptors are compared with dlib's on the same chips (max |Δ| per element).
The CPU's fp32 FMA peak is cores × GHz × FLOP/cycle; AVX2+FMA cores (Zen 2/3, Haswell+) issue
two 8-lane FMAs per cycle = 32 FLOP/cycle, AVX-512 cores two 16-lane ones = 64 (the widest the
CPU lists is used).  The rate is *measured*: a small C loop of independent FMAs of that width
(compiled with the system C compiler), one process per core at once, gives a core's FMA GFLOP
per CPU-second with every core busy = FLOP/cycle × the all-core clock it really runs at (turbo
included; a VM's /proc/cpuinfo shows only the nominal clock, printed beside it); it is measured
before and after the timed cells and the higher figure is the peak (the clock of these VMs
moves by ~10% over minutes).  ``--ghz`` overrides.  A 2048² sgemm is timed too.

Threads: torch's OpenMP (libgomp) spins idle threads by default; on cores shared with other
jobs that made the port ~4x slower at 2 threads (see ``dlibbridge.port.threads``).  This tool
imports torch before dlibbridge, so the policy is the environment's; the value in effect is
printed; it calls ``dlibbridge.tune_cpu()`` for the heap.  ``--threads-study`` measures, in
fresh processes, what a user's script gets from each import order / thread setting, with and
without a busy-loop process competing for a core, interleaved over ``--rounds``;
``--spin-counts`` adds runs with each bounded spin (``GOMP_SPINCOUNT``) between PASSIVE's 0 and
libgomp's default 300,000.  ``--import-orders`` times what the Python API gives a script that
imports torch first or dlibbridge first, with and without ``tune_cpu()``, each in a fresh
process, beside dlib-bin (dlib's ``compute_face_descriptor``) in the same rounds:

    python tools/bench_embed.py --import-orders --batch-sizes 64 --rounds 3

Timing: each cell runs until ``--min-time`` seconds and at least ``--reps`` calls have been
timed after one warm-up call; faces/s is reported for the fastest call (the machine's
capability) and the median (what a contended run sees).  Process CPU time of the fastest call
gives "GFLOP per CPU-second": on cores shared with other jobs, wall-clock throughput measures
the share of the machine a run got, CPU time the engine's own efficiency (% of one core's peak).
Minor page faults per timed call are printed per cell: ``tune_cpu`` keeps freed feature maps
for reuse (``dlibbridge.port.heap``); any ``glibc.malloc`` tunable in the environment, e.g.
``GLIBC_TUNABLES=glibc.malloc.perturb=0`` (a no-op value), leaves glibc's default heap, to
compare.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from dlibbridge import _io, assets  # noqa: E402
from dlibbridge.port import arch, convert, export, heap, onednn, runtime  # noqa: E402
from dlibbridge.port import threads  # noqa: E402

CPU_VARIANTS = ("eager", "unfused", "nchw", "unfolded", "jit_onednn", "compile", "onnxruntime")
CUDA_VARIANTS = ("eager", "nchw", "compile", "fp16", "bf16")


def load_chips(n: int) -> np.ndarray:
    """``n`` real aligned chips (the johns, repeated): uint8 (n,150,150,3), dlib's decoder."""
    import dlib
    files = sorted((SHARED / "data" / "johns").glob("*/*.jpg"))
    if not files:
        sys.exit(f"no chips under {SHARED / 'data' / 'johns'}")
    base = np.stack([dlib.load_rgb_image(str(f)) for f in files])
    return np.ascontiguousarray(base[np.arange(n) % len(base)])


FMA_PROBE_C = r"""
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#ifdef __AVX512F__                    /* the widest FMA the compiler was asked for */
typedef __m512 V;
#define LANES 16
#define SET _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define ADD _mm512_add_ps
#define STORE _mm512_storeu_ps
#else
typedef __m256 V;
#define LANES 8
#define SET _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define ADD _mm256_add_ps
#define STORE _mm256_storeu_ps
#endif
#define F(x) x = FMA(x, m, c)
int main(int argc, char** argv) {   /* 10 independent FMA chains: covers 2 pipes x latency 4-5 */
    long n = atol(argv[1]);
    V m = SET(0.999999f), c = SET(1e-7f);
    V a0 = SET(0), a1 = SET(1), a2 = SET(2), a3 = SET(3), a4 = SET(4), a5 = SET(5), a6 = SET(6), a7 = SET(7),
      a8 = SET(8), a9 = SET(9);
    struct timespec t0, t1;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t0);
    for (long k = 0; k < n; ++k) { F(a0); F(a1); F(a2); F(a3); F(a4); F(a5); F(a6); F(a7); F(a8); F(a9); }
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t1);
    V s = ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(ADD(a4, a5), ADD(a6, a7)), ADD(a8, a9)));
    float v[LANES]; STORE(v, s);
    double sec = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    printf("%.3f %g\n", n * 10.0 * 2 * LANES / sec / 1e9, v[0]);
    return 0;
}
"""


def vector_isa() -> tuple[str, int]:
    """The widest fp32 FMA vector this CPU has, as (name, lanes): AVX-512 when /proc/cpuinfo
    lists avx512f (these VMs do, though they were described as AVX2), else AVX2."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    return ("avx512", 16) if "avx512f" in flags else ("avx2", 8)


def flop_per_cycle(lanes: int) -> int:
    return 2 * lanes * 2                 # 2 FMA pipes × lanes × (mul + add)


def measured_core_peak(cores: int, runs: int = 5) -> float | None:
    """fp32 FMA GFLOP per CPU-second of one core *while all ``cores`` run the probe at once*:
    a C loop of independent FMAs of the widest vector the CPU has (:func:`vector_isa`;
    compiled here with the system C compiler), one process per core, the mean over the
    processes, best of ``runs``.  What the cores really sustain together (all-core turbo and
    the number of FMA pipes included, which /proc/cpuinfo in a VM does not show; one core
    alone runs ~10% faster on these VMs, which a one-core probe doubled would overstate).
    None when there is no compiler or no AVX2/FMA."""
    import shutil
    import subprocess
    import tempfile
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    isa_flags = ["-mavx512f"] if vector_isa()[0] == "avx512" else []
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "fma.c", Path(d) / "fma"
        src.write_text(FMA_PROBE_C)
        try:
            subprocess.run([cc, "-O2", "-mavx2", "-mfma", *isa_flags, str(src), "-o", str(exe)], check=True,
                           capture_output=True)
            best = 0.0
            for _ in range(runs):
                procs = [subprocess.Popen([str(exe), "100000000"], stdout=subprocess.PIPE, text=True)
                         for _ in range(cores)]
                rates = [float(p.communicate()[0].split()[0]) for p in procs]
                if any(p.returncode for p in procs):
                    return None
                best = max(best, sum(rates) / len(rates))
            return best
        except (subprocess.CalledProcessError, OSError, ValueError, IndexError):
            return None


def cpu_ghz() -> float:
    with open("/proc/cpuinfo") as f:
        mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
    return max(mhz) / 1000.0


def sgemm_gflops(device: torch.device, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, min_time: float, reps: int, sync=lambda: None, warmup: bool = True) -> tuple[list[float], float]:
    """Wall seconds of each timed call, and the process CPU seconds of the fastest call.

    CPU time is what the engine actually got from the cores: on a machine shared with other
    jobs, work per CPU-second still measures the engine's efficiency while wall time only
    measures its share of the machine."""
    if warmup:                             # allocations, oneDNN primitive creation
        fn()
        sync()
    times, cpu = [], []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time:
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return times, cpu[times.index(min(times))]


def unfold_affines(module: arch.FaceResNet) -> arch.FaceResNet:
    """The module with every ConvNorm run layer by layer (conv, then a separate affine pass)."""
    for unit in module.modules():
        if isinstance(unit, arch.ConvNorm):
            unit.runs_folded = lambda: False
    return module


# What a user's script does, per --threads-study configuration: import order, then threads.
# Every configuration tunes the heap (tune_cpu), so the rows differ in threads only.
THREAD_CONFIGS = {
    # torch first (libgomp spins), all cores: what a script that never calls tune_cpu runs
    "spinning, all cores": "import torch, dlibbridge; dlibbridge.set_threads(CORES); dlibbridge.tune_cpu(); "
                           "net = dlibbridge.to_torch(MODEL)",
    # torch first, then tune_cpu: the pool sized to the free cores
    "torch first, tune_cpu (sized)": "import torch, dlibbridge; dlibbridge.tune_cpu(); net = dlibbridge.to_torch(MODEL)",
    # tune_cpu before torch: OMP_WAIT_POLICY=PASSIVE before libgomp starts, all cores
    "tune_cpu first (passive)": "import dlibbridge; dlibbridge.tune_cpu(); import torch; "
                                "net = dlibbridge.to_torch(MODEL)",
    # the environment chose spinning (a dedicated machine), all cores: the environment wins
    "environment: OMP_WAIT_POLICY=ACTIVE": "os.environ['OMP_WAIT_POLICY'] = 'ACTIVE'; os.environ['OMP_NUM_THREADS'] = "
                                           "str(CORES); import dlibbridge; dlibbridge.tune_cpu(); import torch; "
                                           "net = dlibbridge.to_torch(MODEL)",
}


def thread_configs(spin_counts: list[int]) -> dict[str, str]:
    """THREAD_CONFIGS plus tune_cpu first with each bounded spin before sleeping
    (``GOMP_SPINCOUNT`` iterations; libgomp's default is 300,000, PASSIVE's 0)."""
    return {**THREAD_CONFIGS, **{
        f"tune_cpu first, GOMP_SPINCOUNT={n}": f"os.environ['GOMP_SPINCOUNT'] = '{n}'; import dlibbridge; "
                                               "dlibbridge.tune_cpu(); import torch; net = dlibbridge.to_torch(MODEL)"
        for n in spin_counts}}


# --import-orders: what a Python API user gets from each import order, without and with
# tune_cpu, beside dlib's own binary (``compute_face_descriptor`` on the same chips) in the
# same run.
DLIB_BIN = "dlib-bin"
IMPORT_ORDER_CONFIGS = {
    DLIB_BIN: "import dlib; fr = dlib.face_recognition_model_v1(MODEL); "
              "net = lambda x: fr.compute_face_descriptor(list(x))",
    "torch first": "import torch, dlibbridge; net = dlibbridge.to_torch(MODEL)",
    "dlibbridge first": "import dlibbridge, torch; net = dlibbridge.to_torch(MODEL)",
    "torch first, then tune_cpu()": "import torch, dlibbridge; dlibbridge.tune_cpu(); net = dlibbridge.to_torch(MODEL)",
    "tune_cpu() before torch": "import dlibbridge; dlibbridge.tune_cpu(); import torch; "
                               "net = dlibbridge.to_torch(MODEL)",
}


THREAD_CHILD = """
import json, os, sys, time, warnings
warnings.simplefilter("ignore")
MODEL, CORES = sys.argv[1], len(os.sched_getaffinity(0))
{setup}
import contextlib
import numpy as np
chips = np.load(sys.argv[2])
times = []
torch = sys.modules.get("torch")
with torch.inference_mode() if torch else contextlib.nullcontext():
    net(chips)
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < float(sys.argv[3]):
        t = time.perf_counter(); net(chips); times.append(time.perf_counter() - t)
from dlibbridge.port import threads
spin = os.environ.get("GOMP_SPINCOUNT")
print(json.dumps({{"times": times, "threads": torch.get_num_threads() if torch else "dlib's",
                  "policy": threads.openmp_wait_policy() + (f", GOMP_SPINCOUNT {{spin}}" if spin else "")}}))
"""


def process_study(chips: np.ndarray, rounds: int, min_time: float, configs: dict[str, str],
                  baseline: str, busy_loops: tuple[bool, ...] = (False, True)) -> int:
    """Each of ``configs`` in a fresh process (the OpenMP policy is fixed at torch's
    import), for each of ``busy_loops`` alone or beside one busy-loop process, interleaved over
    ``rounds``; ms/face per call, and each configuration's speed relative to ``baseline``'s
    in the same round (the load of a shared machine moves between rounds, less within one)."""
    import subprocess
    import tempfile
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    results: dict = {}
    loads = []
    with tempfile.TemporaryDirectory() as d:
        npy = Path(d) / "chips.npy"
        np.save(npy, chips)
        for r in range(rounds):
            for busy in busy_loops:
                for name, setup in configs.items():
                    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
                    try:
                        loads.append(os.getloadavg()[0])
                        out = subprocess.run([sys.executable, "-c", THREAD_CHILD.format(setup=setup),
                                              str(assets.face_model_path()), str(npy), str(min_time)],
                                             env=env, capture_output=True, text=True, check=True)
                    finally:
                        if hog is not None:
                            hog.kill()
                            hog.wait()
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                    ms = [1000 * t / len(chips) for t in res["times"]]
                    cell = results.setdefault((name, busy), {"median_ms": [], "best_ms": [], "threads": set(),
                                                             "policy": res["policy"]})
                    cell["median_ms"].append(statistics.median(ms))
                    cell["best_ms"].append(min(ms))
                    cell["threads"].add(str(res["threads"]))
                    print(f"round {r + 1} {'busy core' if busy else 'no hog   '} {name:30s}: "
                          f"{statistics.median(ms):7.2f} ms/face median, {min(ms):7.2f} best, "
                          f"{res['threads']} threads, policy {res['policy']}, load {loads[-1]:.1f}", flush=True)
    print(f"\nbatch {len(chips)}, {rounds} rounds; 1-minute load average during the study "
          f"{min(loads):.1f}–{max(loads):.1f} (includes this study's own processes)\n")
    print("| configuration | competing busy loop | threads | OpenMP policy | ms/face (median of rounds) "
          f"| range over rounds | × {baseline} (median of rounds) | range over rounds |")
    print("|---|---|---:|---|---:|---|---:|---|")
    for busy in busy_loops:
        base = results[(baseline, busy)]["median_ms"]
        for name in configs:
            c = results[(name, busy)]
            ratios = [b / m for b, m in zip(base, c["median_ms"])]
            print(f"| {name} | {'yes' if busy else 'no'} | {'/'.join(sorted(c['threads']))} | "
                  f"{c['policy']} | {statistics.median(c['median_ms']):.2f} | "
                  f"{min(c['median_ms']):.2f}–{max(c['median_ms']):.2f} | "
                  f"{statistics.median(ratios):.2f}× | {min(ratios):.2f}–{max(ratios):.2f}× |")
    return 0


class Runner:
    """One engine at one batch size: ``prepare`` (untimed) then ``__call__`` → descriptors."""

    def __init__(self, name: str, base: arch.FaceResNet, device: torch.device, onnx_path: Path | None):
        self.name, self.device = name, device
        self.setup_s = 0.0
        t = time.perf_counter()
        m = copy.deepcopy(base).to(device).eval()
        self.nchw_float = False
        if name == "nchw":
            m = m.to(memory_format=torch.contiguous_format)
        elif name == "unfolded":
            m = unfold_affines(m)
        elif name == "fp16":
            m = m.half()
        elif name == "bf16":
            m = m.bfloat16()
        elif name == "jit_onednn":
            self.nchw_float = True
            with torch.no_grad():
                example = torch.zeros(2, 3, 150, 150, device=device)
                traced = torch.jit.trace(m, (example,), check_trace=False)
                m = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        elif name == "compile":
            import torch._inductor.config as inductor_config
            inductor_config.freezing = True
            m = torch.compile(m)
        elif name == "onnxruntime":
            import onnxruntime as ort
            so = ort.SessionOptions()
            so.intra_op_num_threads = torch.get_num_threads()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        self.module = m
        self.setup_s = time.perf_counter() - t

    def prepare(self, chips: np.ndarray):
        if self.name == "onnxruntime":
            return np.ascontiguousarray(chips)     # the export takes the module's uint8 NHWC chips
        x = torch.from_numpy(chips).to(self.device)
        if self.nchw_float:
            x = x.permute(0, 3, 1, 2).float().contiguous()
        return x

    def __call__(self, x) -> np.ndarray:
        if self.name == "onnxruntime":
            return self.sess.run(None, {"chips": x})[0]
        with torch.inference_mode(), (onednn.disabled() if self.name == "unfused" else contextlib.nullcontext()):
            return self.module(x).float().cpu().numpy()


def overlap_study(photos_dir: Path, n_photos: int, n_chips: int, batch: int, rounds: int, device: str) -> int:
    """``embed`` and ``evaluate`` end to end, serial and overlapped, beside their stages alone,
    on the first ``n_photos`` photos of an identity-folder tree (celeba-dev), and on the chips
    of its first ``n_chips`` photos (aligned once, up front, by ``align``: a few hundred chips
    pass in about a second, too short for a steady state).  Stages, interleaved over ``rounds``:

    * network only: the chips already in memory, batches of ``batch``;
    * decode only / align only: chips read (``embed``'s reader), photos aligned and their chips
      read (``evaluate``'s loader), one process, no network;
    * ``embed_folder`` and ``evaluate``'s ``compute_embeddings`` (content hashing, alignment,
      descriptors; no descriptor cache) with no workers (serial: load, then embed, batch by
      batch) and with workers loading ahead while the network runs (overlapped);
    * the previous ``evaluate`` pipeline: ``align`` over the photos on every core first, then
      the chips read and embedded batch by batch.

    ``embed_folder`` opens the model in every run (``to_torch``, the file's sha256); that time
    is printed and is part of embed's end-to-end figures, not evaluate's (its stages share one
    opened model).

    Photos/s are photos of the sample over wall-clock seconds; load averages are printed
    because other jobs may share the cores — compare stages within a run."""
    import shutil
    import tempfile

    from dlibbridge.data.align import AlignSettings, align
    from dlibbridge.data.prefetch import MAX_DECODE_WORKERS, cores, default_workers
    from dlibbridge.eval import embed
    from dlibbridge.eval.embedders import ModelSpec, make_embedder
    from dlibbridge.eval.evaluate import ChipSource, compute_embeddings

    every = sorted(photos_dir.glob("*/*.jpg"))
    photos = every[:n_photos]
    if not photos:
        sys.exit(f"no identity folders of .jpg photos under {photos_dir}")
    model = str(assets.face_model_path())
    t = time.perf_counter()
    net = make_embedder(ModelSpec.parse(model, "torch"), device=device, batch_size=batch)
    embed._fingerprint(Path(model), "torch", [])
    open_s = time.perf_counter() - t
    decode_workers = max(1, min(MAX_DECODE_WORKERS, cores() - 1))     # embed's choice for a large folder
    align_workers = default_workers(len(photos), batch, aligning=True)
    rates: dict = {}
    loads = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for folder, sample in (("photos", photos), ("chip-photos", every[:n_chips])):
            for p in sample:
                (d / folder / p.parent.name).mkdir(parents=True, exist_ok=True)
                (d / folder / p.parent.name / p.name).symlink_to(p.resolve())
        data = d / "photos"
        settings = AlignSettings(multi="center", fallback="center")       # evaluate's defaults
        summary = align(d / "chip-photos", d / "chips", settings, progress=False)
        chip_files = embed.list_images(d / "chips")
        chip_paths = [d / "chips" / rel for rel in chip_files]
        photo_paths = sorted(p for p in data.glob("*/*.jpg"))
        chips = np.stack([embed._read_chip(p) for p in chip_paths])     # warms the page cache
        net.embed(chips[:batch])

        def fresh(name: str) -> Path:
            out = d / name
            shutil.rmtree(out, ignore_errors=True)
            return out

        def network():
            for i in range(0, len(chips), batch):
                net.embed(chips[i:i + batch])

        def decode():
            for p in chip_paths:
                embed._read_chip(p)

        def align_only():
            for _ in ChipSource(data, fresh("aligned"), workers=0).load(photo_paths, batch):
                pass

        def evaluate(paths, workers, chips_dir=None):
            return lambda: compute_embeddings(paths, [net], ChipSource(data if chips_dir is None else d / "chips",
                                                                       fresh("eval-chips"), workers=workers),
                                              None, batch, progress=False)

        def previous_evaluate():
            out = fresh("eval-chips")
            align(data, out, settings, progress=False)
            compute_embeddings(photo_paths, [net], ChipSource(data, out, workers=0), None, batch, progress=False)

        stages = {
            "network only (chips in memory)": (network, len(chips)),
            "embed: decode only (1 process)": (decode, len(chips)),
            "embed end to end, serial (--workers 0)": (functools.partial(
                embed.embed_folder, model, d / "chips", d / "out.npz", batch_size=batch, progress=False, workers=0),
                len(chips)),
            f"embed end to end, overlapped (--workers {decode_workers})": (functools.partial(
                embed.embed_folder, model, d / "chips", d / "out.npz", batch_size=batch, progress=False,
                workers=decode_workers), len(chips)),
            "evaluate chips, serial (--workers 0)": (evaluate(chip_paths, 0, "chips"), len(chips)),
            f"evaluate chips, overlapped (--workers {decode_workers})": (evaluate(chip_paths, decode_workers, "chips"),
                                                                          len(chips)),
            "evaluate photos: align only (1 process)": (align_only, len(photos)),
            "evaluate photos, serial (--workers 0)": (evaluate(photo_paths, 0), len(photos)),
        }
        for w in sorted({1, align_workers}):
            stages[f"evaluate photos, overlapped (--workers {w})"] = (evaluate(photo_paths, w), len(photos))
        stages[f"evaluate photos, previous pipeline (align -j {cores()}, then embed)"] = (previous_evaluate,
                                                                                          len(photos))
        for r in range(rounds):
            for name, (fn, n) in stages.items():
                loads.append(os.getloadavg()[0])
                t = time.perf_counter()
                fn()
                rate = n / (time.perf_counter() - t)
                rates.setdefault(name, []).append(rate)
                print(f"round {r + 1} {name:62s}: {rate:7.1f} images/s", flush=True)
    print(f"\n{len(photos)} photos of {photos_dir}; {len(chips)} chips of its first {n_chips} photos "
          f"({summary['status_counts']}); batch {batch}, device {device}, torch {torch.get_num_threads()} threads, "
          f"{cores()} cores, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', '(default)')}, {rounds} rounds; "
          f"load average {min(loads):.1f}–{max(loads):.1f}; opening the model (embed, every run): {open_s:.2f} s\n")
    net = "network only (chips in memory)"
    serial_of = {name: next(n for n in rates if n.startswith(name.split(",")[0] + ", serial"))
                 for name in rates if "," in name}

    def per_round(name: str, base: str) -> str:
        r = [a / b for a, b in zip(rates[name], rates[base])]
        return f"{statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f})"
    print("| stage | images/s (median of rounds) | range over rounds | × network only, per round | "
          "× serial, per round |")
    print("|---|---:|---|---:|---:|")
    for name, rs in rates.items():
        print(f"| {name} | {statistics.median(rs):.1f} | {min(rs):.1f}–{max(rs):.1f} | {per_round(name, net)} | "
              f"{per_round(name, serial_of[name]) if name in serial_of else ''} |")
    med = {name: statistics.median(rs) for name, rs in rates.items()}
    print("\nIf the stages shared no cores (medians): serial = 1/(1/network + 1/load), overlapped = the slower")
    for what, load in (("embed", "embed: decode only (1 process)"),
                       ("evaluate photos", "evaluate photos: align only (1 process)")):
        a, b = med[net], med[load]
        print(f"  {what}: serial {1 / (1 / a + 1 / b):.1f}, overlapped {min(a, b):.1f} images/s")
    return 0


def interleaved_study(base: arch.FaceResNet, chips: np.ndarray, variants: list[str], rounds: int,
                      device: torch.device) -> int:
    """The variants called in turn, ``rounds`` times over: on a machine whose load drifts,
    the ratio within each round compares engines under the same conditions."""
    runners = {}
    for name in variants:
        runners[name] = Runner(name, base, device, None)
        x = runners[name].prepare(chips)
        runners[name](x)
        runners[name].x = x
    ms = {name: [] for name in variants}
    loads = []
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        for name, r in runners.items():
            t = time.perf_counter()
            r(r.x)
            _sync(device)
            ms[name].append(1000 * (time.perf_counter() - t) / len(chips))
    first = variants[0]
    print(f"\nbatch {len(chips)}, {rounds} interleaved rounds, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', '(default)')}; "
          f"load average {min(loads):.1f}–{max(loads):.1f}\n")
    print(f"| engine | ms/face (median) | ms/face (best) | speed vs {first}, per round: median (quartiles) |")
    print("|---|---:|---:|---|")
    for name in variants:
        ratios = sorted(a / b for a, b in zip(ms[first], ms[name]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(f"| {name} | {statistics.median(ms[name]):.2f} | {min(ms[name]):.2f} | "
              f"{statistics.median(ratios):.3f}× ({q[0]:.3f}–{q[2]:.3f}) |")
    return 0


def positive_ints(text: str) -> list[int]:
    """``--batch-sizes``/``--spin-counts``: comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", type=positive_ints, default="1,16,64,256")
    ap.add_argument("--variants", help="comma-separated (default: all for the device)")
    ap.add_argument("--no-dlib", action="store_true", help="skip dlib (e.g. on a GPU machine)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch/ORT threads")
    ap.add_argument("--ghz", type=float, help="clock for the FMA peak (default: /proc/cpuinfo)")
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds per cell (default 3)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per cell at least (default 3)")
    ap.add_argument("--dlib-max-batch", type=int, default=256, help="largest batch dlib is timed at")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--threads-study", action="store_true",
                    help="only compare thread policies, idle and beside a busy core (batch: first of --batch-sizes)")
    ap.add_argument("--spin-counts", type=positive_ints, default="3000,10000,30000,100000",
                    help="--threads-study: GOMP_SPINCOUNT values to try with dlibbridge imported first")
    ap.add_argument("--import-orders", action="store_true",
                    help="only time the port from the Python API in fresh processes, torch or dlibbridge imported "
                         "first, without and with tune_cpu(), beside dlib-bin in the same rounds "
                         "(batch: first of --batch-sizes)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="--threads-study/--import-orders/--overlap rounds (default 3)")
    ap.add_argument("--overlap", metavar="PHOTOS_DIR", type=Path, nargs="?", const=SHARED / "data" / "celeba-dev",
                    help="only time `embed` and `evaluate` end to end, serial and overlapped, beside their stages, "
                         "on photos of identity folders (default celeba-dev) and their chips (batch: first of "
                         "--batch-sizes)")
    ap.add_argument("--photos", type=int, default=200, help="--overlap: photos aligned by evaluate (default 200)")
    ap.add_argument("--chips", type=int, default=1000, help="--overlap: chips of this many photos (default 1000)")
    ap.add_argument("--interleave", action="store_true",
                    help="only alternate calls of --variants at the first of --batch-sizes for --rounds rounds")
    args = ap.parse_args(argv)
    if args.interleave:
        threads.set_threads(args.threads)
        return interleaved_study(convert.to_torch(assets.face_model_path()),
                                 load_chips(args.batch_sizes[0]),
                                 args.variants.split(",") if args.variants else ["eager", "unfolded"],
                                 args.rounds, torch.device(args.device))
    if args.overlap:
        if __name__ == "__main__":
            # Spawned workers import the main script again: this one imports torch (~2 s per
            # worker).  Under a `-c` main they import only what their tasks need, as under the
            # `dlibbridge` command, whose import is torch-free.
            import subprocess
            return subprocess.call([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO / 'tools')!r}); "
                                    f"import bench_embed; sys.exit(bench_embed.main({list(argv or sys.argv[1:])!r}))"])
        threads.set_threads(args.threads)
        return overlap_study(args.overlap, args.photos, args.chips, args.batch_sizes[0], args.rounds,
                             args.device)
    if args.threads_study:
        return process_study(load_chips(args.batch_sizes[0]), args.rounds, args.min_time,
                             thread_configs(args.spin_counts), "spinning, all cores")
    if args.import_orders:
        return process_study(load_chips(args.batch_sizes[0]), args.rounds, args.min_time,
                             IMPORT_ORDER_CONFIGS, DLIB_BIN, busy_loops=(False,))

    device = torch.device(args.device)
    threads.set_threads(args.threads)     # chosen explicitly: tune_cpu's spinning-pool sizing stays out
    runtime.tune_cpu()                    # the heap: freed feature maps reused
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        # fp32 means IEEE fp32 (parity): compiled graphs do not see the port's own TF32 toggle.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    batch_sizes = args.batch_sizes
    variants = args.variants.split(",") if args.variants else list(
        CUDA_VARIANTS if device.type == "cuda" else CPU_VARIANTS)
    chips = load_chips(max(batch_sizes))
    base = convert.to_torch(assets.face_model_path())
    gflop = arch.gflops_per_face(base)
    load0 = os.getloadavg()
    cores = len(os.sched_getaffinity(0))
    peak_before = measured_core_peak(cores) if device.type == "cpu" else None    # and after the cells

    ref = None
    rows = []
    if not args.no_dlib:
        import dlib
        fr = dlib.face_recognition_model_v1(str(assets.face_model_path()))
        ref = np.array(fr.compute_face_descriptor(list(chips)))   # also dlib's warm-up
        for b in batch_sizes:
            if b > args.dlib_max_batch:
                continue
            batch = list(chips[:b])
            times, cpu = time_calls(lambda: fr.compute_face_descriptor(batch), args.min_time, 1, warmup=False)
            rows.append({"engine": "dlib", "batch": b, "best_fps": b / min(times), "cpu_s_per_face": cpu / b,
                         "median_fps": b / statistics.median(times), "calls": len(times), "max_abs_diff": 0.0})
            print(f"dlib         batch {b:4d}: {rows[-1]['best_fps']:8.1f} faces/s", flush=True)

    onnx_path = None
    if "onnxruntime" in variants:
        onnx_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_embed_{os.getpid()}.onnx"
        export.export_onnx(base, onnx_path)
    try:
        for name in variants:
            for b in batch_sizes:
                runner = Runner(name, base, device, onnx_path)   # fresh per batch size (compile shapes)
                x = runner.prepare(chips[:b])
                t = time.perf_counter()
                out = runner(x)                                   # first call: compile / prepack
                first_s = time.perf_counter() - t
                faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                times, cpu = time_calls(lambda: runner(x), args.min_time, args.reps,
                                        sync=lambda: _sync(device))
                faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / len(times)
                diff = float(np.abs(out.astype(np.float64) - ref[:b]).max()) if ref is not None else None
                rows.append({"engine": name, "batch": b, "best_fps": b / min(times), "cpu_s_per_face": cpu / b,
                             "median_fps": b / statistics.median(times), "calls": len(times),
                             "setup_s": runner.setup_s, "first_call_s": first_s, "max_abs_diff": diff,
                             "page_faults_per_call": faults})
                print(f"{name:12s} batch {b:4d}: {rows[-1]['best_fps']:8.1f} faces/s "
                      f"(median {rows[-1]['median_fps']:.1f}; first call {first_s:.1f}s; {faults:.0f} page faults/call; "
                      f"max|Δ| vs dlib {diff if diff is None else f'{diff:.2g}'})", flush=True)
    finally:
        if onnx_path is not None and onnx_path.exists():
            onnx_path.unlink()

    gemm = sgemm_gflops(device)
    load1 = os.getloadavg()
    info = {"device": str(device), "threads": args.threads, "gflop_per_face": gflop,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default: active)"),
            "heap": "freed memory reused (dlibbridge.port.heap)" if heap.in_effect()
                    else "glibc's default or the environment's",
            "sgemm_gflops": gemm, "loadavg_start": load0, "loadavg_end": load1,
            "torch": torch.__version__, "platform": platform.platform()}
    if device.type == "cpu":
        ghz = args.ghz or cpu_ghz()
        peaks = [p for p in (peak_before, measured_core_peak(cores)) if p is not None]
        core_peak = max(peaks) if peaks else None
        isa, lanes = vector_isa()
        fpc = flop_per_cycle(lanes)
        info.update(nominal_ghz=ghz, cores=cores, nominal_peak_gflops=cores * ghz * fpc,
                    measured_core_peak_gflops=core_peak, vector_isa=isa, flop_per_cycle=fpc)
        if core_peak is not None and not args.ghz:
            info.update(ghz=core_peak / fpc, fma_peak_gflops=cores * core_peak)
        else:
            info.update(ghz=ghz, fma_peak_gflops=info["nominal_peak_gflops"])
    else:
        info["gpu"] = torch.cuda.get_device_name(device)
    print_table(rows, info)
    if args.json:
        _io.write_json(args.json, {"info": info, "rows": rows}, indent=1)
    return 0


def fmt_gflops(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.1f}"


def print_table(rows: list[dict], info: dict) -> None:
    dlib_fps = {r["batch"]: r["best_fps"] for r in rows if r["engine"] == "dlib"}
    peak = info.get("fma_peak_gflops")
    print()
    print(f"device {info['device']}, {info['threads']} threads (OMP_WAIT_POLICY {info['omp_wait_policy']}), "
          f"torch {info['torch']}; "
          f"{info['gflop_per_face']:.3f} GFLOP/face; sgemm ceiling now {info['sgemm_gflops']:.1f} GFLOP/s"
          + (f"; fp32 FMA peak {peak:.1f} GFLOP/s ({info['cores']} cores × {info['ghz']:.3f} GHz × {info['flop_per_cycle']} "
             f"({info['vector_isa']}); measured FMA loop {fmt_gflops(info['measured_core_peak_gflops'])} GFLOP/s per core with all cores busy, nominal clock "
             f"{info['nominal_ghz']:.3f} GHz → {info['nominal_peak_gflops']:.1f})" if peak else "")
          + f"; heap: {info['heap']}"
          + f"; load average {info['loadavg_start'][0]:.1f} → {info['loadavg_end'][0]:.1f}")
    print()
    head = "| engine | batch | faces/s (best) | faces/s (median) | × dlib | GFLOP/s |"
    sep = "|---|---:|---:|---:|---:|---:|"
    if peak:
        # wall: share of the whole machine's peak; per CPU-s: work per core-second actually
        # received, against one core's peak (meaningful when other jobs share the cores).
        head += " % FMA peak (wall) | GFLOP per CPU-s | % core peak (CPU time) |"
        sep += "---:|---:|---:|"
    head += " max abs diff vs dlib |"
    sep += "---:|"
    print(head)
    print(sep)
    for r in rows:
        gf = r["best_fps"] * info["gflop_per_face"]
        # dlib's rate per face does not depend on the batch: above --dlib-max-batch, its largest
        # timed batch is the reference (marked ≈)
        timed = [b for b in dlib_fps if b <= r["batch"]]
        ref_b = max(timed) if timed else None
        ratio = "—" if ref_b is None else (("" if ref_b == r["batch"] else "≈")
                                            + f"{r['best_fps'] / dlib_fps[ref_b]:.1f}")
        line = (f"| {r['engine']} | {r['batch']} | {r['best_fps']:.1f} | {r['median_fps']:.1f} | "
                f"{ratio} | {gf:.1f} |")
        if peak:
            per_cpu = info["gflop_per_face"] / r["cpu_s_per_face"]
            line += f" {100 * gf / peak:.0f}% | {per_cpu:.1f} | {100 * per_cpu / (peak / info['cores']):.0f}% |"
        d = r["max_abs_diff"]
        line += f" {'n/a' if d is None else f'{d:.1e}'} |"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
