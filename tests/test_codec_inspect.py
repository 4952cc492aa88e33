"""`dlibbridge inspect`: listing, shapes and the JSON schema, on the real files."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from dlibbridge.codec import inspect as describe
from dlibbridge.cli import main as cli_main


def test_face_resnet_shapes_and_params_match_dlibs_layer_table(shared_dir, face_model_path):
    """docs/face-resnet-layers.md was derived from dlib's own layer<i> listing."""
    ref = {}
    for line in (shared_dir / "docs" / "face-resnet-layers.md").read_text().splitlines():
        m = re.match(r"\| (\d+) \| ([^|]+)\| ([^|]*)\| (\d+) \|", line)
        if m:
            ref[int(m.group(1))] = (m.group(3).strip(), int(m.group(4)))
    info = describe.describe(face_model_path)
    assert info["architecture"].startswith(describe.FACE_RESNET)
    # dlib lists the input layer as its own layer<131>; in the file it is part of layer<130>'s record
    assert len(info["layers"]) == 131 and len(ref) == 132 and ref[131] == ("3x150x150", 0)
    assert info["layers"][-1]["input"]["record"] == "input_rgb_image_sized"
    for x in info["layers"]:
        shape, params = ref[x["index"]]
        assert x["params"] == params, x["path"]
        if x["index"] == 0:
            assert x["output_shape"] is None  # the loss has no output tensor
            continue
        k, h, w = x["output_shape"]
        assert shape in (f"{k}x{h}x{w}", str(k) if (h, w) == (1, 1) else None), x["path"]
    assert info["total_params"] == 5_614_592
    assert info["size"] == 22_466_066
    assert info["sha256"] == "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"


def test_every_real_file_is_recognised(tmp_path, real_model_files):
    names = {}
    for name, data in real_model_files.items():
        p = tmp_path / name.replace("/", "_")
        p.write_bytes(data)
        names[name] = describe.describe(p)["architecture"]
    assert names["mmod_human_face_detector.dat"] == "dlib MMOD CNN object detector (1 detector window)"
    assert names["mmod_front_and_rear_end_vehicle_detector.dat"].endswith("(6 detector windows)")
    assert names["dnn_gender_classifier_v1.dat"] == "dlib 2-class image classifier (32x32 RGB input)"
    assert names["face_recognition_densenet_model_v1.dat"].startswith("dlib DenseNet")
    assert all(names.values())


def test_json_output_is_stable_and_documented(capsys, face_model_path):
    assert cli_main(["inspect", str(face_model_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["schema"] == "dlibbridge.inspect/1"
    assert set(info) == {"schema", "file", "size", "sha256", "architecture", "total_params", "input_size",
                         "input_size_fixed", "versions", "wrappers", "layers", "trailers"}
    assert set(info["layers"][1]) == {"index", "path", "wrapper", "record", "summary", "fields", "params",
                                      "output_shape"}
    assert info["versions"]["affine_"] == 29 and info["wrappers"]["TagOrSkip"] == 22
    doc = (describe.Path(__file__).resolve().parents[1] / "docs" / "inspect-json.md").read_text()
    for key in info:
        assert f"`{key}`" in doc


def test_default_file_is_the_installed_face_model():
    out = subprocess.run([sys.executable, "-m", "dlibbridge", "inspect"], capture_output=True, text=True, check=True)
    assert "dlib_face_recognition_resnet_model_v1.dat" in out.stdout
    assert "parameters:   5,614,592" in out.stdout
    assert re.search(r"layer<130>\s+con_4\s+32x72x72\s+4,736", out.stdout)


@pytest.mark.parametrize("content,reason", [(b"", "not a dlib DNN model|truncated"),
                                            (b"\x01\x01garbage", "invalid dlib file")])
def test_bad_file_gives_a_clear_error_and_exit_code_2(tmp_path, content, reason):
    p = tmp_path / "bad.dat"
    p.write_bytes(content)
    r = subprocess.run([sys.executable, "-m", "dlibbridge", "inspect", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and re.search(reason, r.stderr)
    r = subprocess.run([sys.executable, "-m", "dlibbridge", "inspect", str(tmp_path / "missing.dat")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "No such file" in r.stderr


def test_every_real_file_gets_output_shapes_for_a_stated_input(tmp_path, real_model_files, capsys):
    """Networks of any input size get shapes for 150x150 unless --input-size says otherwise;
    a sized network refuses another size in one line."""
    for name, data in real_model_files.items():
        p = tmp_path / name.replace("/", "_")
        p.write_bytes(data)
        info = describe.describe(p)
        assert info["input_size"] and all(x["output_shape"] for x in info["layers"]
                                          if x["wrapper"] not in ("Loss", "Repeat")), name
    det = tmp_path / "mmod_human_face_detector.dat"
    assert cli_main(["inspect", str(det), "--input-size", "240x320"]) == 0
    out = capsys.readouterr().out
    assert "shapes for:   a 3x240x320 input" in out and re.search(r"layer<1>\s+con_4\s+1x27x37", out)
    assert cli_main(["inspect", str(tmp_path / "dnn_gender_classifier_v1.dat"), "--input-size", "64x64"]) == 2
    assert "takes 32x32 images only" in capsys.readouterr().err
