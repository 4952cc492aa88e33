"""Codec speed on the 22 MB face ResNet, against dlib loading the same file in the same run.

    python tools/bench_codec.py [--repeat 15] [--json OUT]

Reports medians: our `loads` (C++ parse + numpy tensors), `dumps`, the raw C++ parse, and
`dlib.face_recognition_model_v1(path)`; the ratio dlib/ours; and the tensor payload
throughput (raw float bytes / load time).  The machine is shared and noisy, so the ratio
taken in one run is the number to quote, not the absolute times.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import dlib

import dlibbridge
from dlibbridge import _codec, assets


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    path = str(assets.face_model_path())
    data = open(path, "rb").read()
    model = dlibbridge.loads(data)
    payload = sum(e.details["params"].nbytes for e in model.layers()
                  if e.details is not None and "params" in e.details)
    assert dlibbridge.dumps(model) == data

    t_dlib = median_time(lambda: dlib.face_recognition_model_v1(path), max(3, args.repeat // 3))
    t_read = median_time(lambda: open(path, "rb").read(), args.repeat)
    t_parse = median_time(lambda: _codec.parse(data), args.repeat)
    t_loads = median_time(lambda: dlibbridge.loads(data), args.repeat)
    t_load = median_time(lambda: dlibbridge.load(path), args.repeat)
    t_dumps = median_time(lambda: dlibbridge.dumps(model), args.repeat)
    res = {
        "file_bytes": len(data), "tensor_payload_bytes": payload,
        "dlib_load_s": t_dlib, "read_file_s": t_read, "cpp_parse_s": t_parse, "loads_s": t_loads,
        "load_path_s": t_load, "dumps_s": t_dumps,
        "speedup_load_vs_dlib": t_dlib / t_load,
        "payload_GBps_load": payload / t_load / 1e9, "payload_GBps_loads": payload / t_loads / 1e9,
        "payload_GBps_dumps": payload / t_dumps / 1e9,
    }
    print(f"file {len(data):,} bytes, tensor payload {payload:,} bytes, median of {args.repeat}")
    print(f"dlib.face_recognition_model_v1(path) {t_dlib * 1e3:9.1f} ms")
    print(f"dlibbridge.load(path)                {t_load * 1e3:9.1f} ms   {t_dlib / t_load:5.1f}x faster than dlib, "
          f"{res['payload_GBps_load']:.2f} GB/s payload")
    print(f"  of which read the file             {t_read * 1e3:9.1f} ms")
    print(f"dlibbridge.loads(bytes)              {t_loads * 1e3:9.1f} ms   {res['payload_GBps_loads']:.2f} GB/s payload")
    print(f"  C++ parse only (_codec.parse)      {t_parse * 1e3:9.1f} ms")
    print(f"dlibbridge.dumps(model)              {t_dumps * 1e3:9.1f} ms   {res['payload_GBps_dumps']:.2f} GB/s payload")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
