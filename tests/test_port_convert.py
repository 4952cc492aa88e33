"""dlib file ⇄ torch: the named mapping, byte-identical round trips, both record forms,
newer version strings, exports (.dat reloaded by real dlib, ONNX via onnxruntime,
TorchScript), checkpoints, and the ``export``/``embed`` commands.

Tolerance for descriptors: 1e-5 per element, the issue's bar (measured figures are printed
with ``-s``).  Byte identity is asserted wherever weights are unchanged.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dlibbridge
from dlibbridge import cli
from dlibbridge.port import arch
from dlibbridge.codec import records
from dlibbridge.port import convert
from dlibbridge.codec.tree import Field
from parity import ATOL, dlib_embed, torch_embed, same_decisions

# ---------------------------------------------------------------------------------------
# structure and the named mapping


def test_bindings_name_every_record_with_dlibs_layer_numbers(face_model_path, frozen):
    b = convert.layer_bindings(frozen)
    assert [x.kind for x in b].count("con") == 29 and [x.kind for x in b].count("norm") == 29
    paths = {x.module: x.path for x in b}
    # dlib's own layer<i> numbering (../shared/docs/face-resnet-layers.md)
    assert paths["stem.unit.conv"] == "layer<130>" and paths["stem.unit.norm"] == "layer<129>"
    assert paths["level4.0.branch1.conv"] == "layer<125>" and paths["level3.0.branch1.conv"] == "layer<101>"
    assert paths["level0.0.branch1.conv"] == "layer<12>" and paths["level0.0.branch2.norm"] == "layer<8>"
    assert paths["fc"] == "layer<1>"
    assert len(b) == len({x.module for x in b}) == 60   # input + 29 + 29 + fc


def test_affine_layers_hook_the_inputs_dlib_affines_see(face_model_path, frozen):
    model = dlibbridge.load(face_model_path)
    by_path = {e.path: e for e in model.layers()}
    layers = convert.affine_layers(frozen)
    assert len(layers) == 29
    seen = []
    hooks = [frozen.get_submodule(name).register_forward_pre_hook(
        lambda m, inp, name=name: seen.append((name, tuple(inp[0].shape[1:])))) for name, _ in layers]
    try:
        torch_embed(frozen, np.zeros((1, 150, 150, 3), np.uint8))
    finally:
        for h in hooks:
            h.remove()
    assert [n for n, _ in seen] == [n for n, _ in layers]          # forward order
    for (name, path), (_, shape) in zip(layers, seen):
        d = by_path[path].details
        assert d.version == "affine_" and isinstance(frozen.get_submodule(name), arch.DlibAffine)
        assert shape[0] == d["gamma"][1]
    assert seen[0][1] == (32, 72, 72) and seen[-1][1] == (256, 1, 1)   # layer<129>, layer<8>


def test_weights_are_copied_not_approximated(face_model_path, frozen, trainable):
    model = dlibbridge.load(face_model_path)
    by_path = {e.path: e for e in model.layers()}
    conv = by_path["layer<101>"].details           # level3.0.branch1.conv: 64←32, 3×3, stride 2
    w = conv["params"].reshape(-1)
    np.testing.assert_array_equal(frozen.level3[0].branch1.conv.weight.detach().numpy().reshape(-1), w[:64 * 32 * 9])
    np.testing.assert_array_equal(frozen.level3[0].branch1.conv.bias.detach().numpy(), w[64 * 32 * 9:])
    fc = by_path["layer<1>"].details["params"].reshape(256, 128)
    np.testing.assert_array_equal(frozen.fc.weight.detach().numpy(), fc.T)   # stored inputs×outputs
    aff = by_path["layer<100>"].details["params"].reshape(-1)
    np.testing.assert_array_equal(frozen.level3[0].branch1.norm.scale.numpy(), aff[:64])
    bn = trainable.level3[0].branch1.norm
    np.testing.assert_array_equal(bn.weight.detach().numpy(), aff[:64])
    assert bn.eps == 1e-4 and bn.window == 100 and int(bn.num_batches_tracked) == 100
    np.testing.assert_array_equal(bn.running_var.numpy(), np.float32(1 - 1e-4))
    inp = model.input
    np.testing.assert_array_equal(frozen.input.mean.reshape(-1).numpy(),
                                  np.float32([inp["avg_red"], inp["avg_green"], inp["avg_blue"]]))


def test_unused_tensor_unfilled_parameter_and_shape_mismatch_fail_loudly(face_model_path):
    model = dlibbridge.load(face_model_path)
    struct = convert.parse_structure(model)
    cfg = dict(struct.config, trainable=False)

    rec = struct.records["level2.1.branch1.norm"].node.details
    rec.fields["stray"] = Field("tensor", np.ones((3, 1, 1, 1), np.float32))
    with pytest.raises(convert.ConversionError, match=r"layer<\d+> affine_: tensor field\(s\) \['stray'\]"):
        convert._load_weights(arch.FaceResNet(cfg), struct, False)
    del rec.fields["stray"]

    extra = arch.FaceResNet(cfg)
    extra.level0[0].register_buffer("stray", torch.zeros(2))
    with pytest.raises(convert.ConversionError, match=r"unfilled.*level0\.0\.stray"):
        convert._load_weights(extra, struct, False)

    with pytest.raises(convert.ConversionError, match=r"layer<1> fc_2: weight shaped \(128, 256\) but fc.weight is \(32, 256\)"):
        convert._load_weights(arch.FaceResNet(dict(cfg, embed_dim=32)), struct, False)


def test_fold_matches_the_reference_conversion():
    """bn → affine exactly as dlib's affine_(const bn_&) computes it (float32 throughout)."""
    import dlib_reference as ref
    rng = np.random.default_rng(0)
    c = 4096
    gamma, beta, mean = (rng.standard_normal(c).astype(np.float32) for _ in range(3))
    var = np.concatenate([[0.0, 1 - 1e-4, 1e-30], rng.uniform(0, 3, c - 3)]).astype(np.float32)
    g, b = records.fold(gamma, beta, mean, var, 1e-4)
    g_ref, b_ref = ref.affine_from_bn(gamma, beta, mean, var, 1e-4)
    assert g.dtype == b.dtype == np.float32
    assert g.tobytes() == g_ref.tobytes() and b.tobytes() == b_ref.tobytes()
    assert g[1] == gamma[1]   # the affine→bn recipe's variance gives invstd exactly 1


def _edited(face_model_path, path: str, edit) -> bytes:
    model = dlibbridge.load(face_model_path)
    entry = {e.path: e for e in model.layers()}[path]
    edit(entry.node.details)
    return dlibbridge.dumps(model)


@pytest.mark.parametrize("path,edit,message", [
    ("layer<130>", lambda d: d.__setitem__("params", d["params"][:-1]), r"layer<130> con_4: params holds 4735"),
    ("layer<1>", lambda d: d.__setitem__("bias_mode", 0), r"layer<1> fc_2: .*no bias"),
    ("layer<100>", lambda d: d.__setitem__("mode", 1), r"layer<100> affine_: FC_MODE"),
    ("layer<101>", lambda d: (d.__setitem__("stride_y", 1), d.__setitem__("stride_x", 1)), r"layer<101> con_4: expected a 3x3"),
    ("layer<94>", lambda d: d.__setitem__("padding_y", 1), r"layer<94> avg_pool_2: only square pooling"),
])
def test_files_that_are_not_the_face_resnet_are_refused(face_model_path, path, edit, message):
    # The face-ResNet port names what differs; the frozen form hands such files to the generic
    # converter instead (tests/test_port_generic.py), the trainable form refuses them.
    with pytest.raises(convert.ConversionError, match=message):
        convert.to_torch(_edited(face_model_path, path, edit), trainable=True)


def test_other_dlib_networks_are_refused_clearly(real_model_files):
    for name, data in real_model_files.items():
        if "resnet" in name:
            continue
        with pytest.raises(convert.ConversionError, match="not dlib's face ResNet|do not occur"):
            convert.to_torch(data, trainable=True)


def test_module_architecture_must_match_its_source(frozen):
    m = arch.FaceResNet(dict(frozen.config, embed_dim=64))
    m.dlib_source = frozen.dlib_source
    with pytest.raises(convert.ConversionError, match="differs from its dlib source"):
        convert.to_dlib_tree(m)


# ---------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("form", ["frozen", "trainable"])
def test_dat_torch_dat_is_byte_identical(form, request, face_model_bytes):
    module = request.getfixturevalue(form)
    assert dlibbridge.dumps(convert.to_dlib_tree(module)) == face_model_bytes




def test_bn_con_form_recipe_and_round_trips(frozen, face_model_bytes):
    bn_bytes = dlibbridge.dumps(convert.to_dlib_tree(frozen, trainable=True))
    model = dlibbridge.loads(bn_bytes)
    norms = [e.details for e in model.layers() if e.details is not None and e.details.layer_type == "bn_con"]
    assert len(norms) == 29 and all(d.version == "bn_con2" for d in norms)
    d = norms[0]   # dlib-format.md §6.7: gamma=g, beta=b, mean 0, var float32(1-eps), window full
    assert d["eps"] == 1e-4 and d["num_updates"] == d["running_stats_window_size"] == 100
    np.testing.assert_array_equal(d["running_variances"], np.float32(1 - 1e-4))
    assert d["means"].shape == d["invstds"].shape == (1, 32, 1, 1)   # never empty (§4.3)
    for trainable in (False, True):   # bn → torch → bn, either torch form, byte for byte
        assert dlibbridge.dumps(convert.to_dlib_tree(convert.to_torch(bn_bytes, trainable), True)) == bn_bytes
        assert dlibbridge.dumps(convert.to_dlib_tree(convert.to_torch(bn_bytes, trainable))) == face_model_bytes


def _upgrade_versions(model, bn: bool = False):
    """Rewrite records as current dlib writes them (con_6, affine_2, relu_2, fc_3)."""
    for e in model.layers():
        d = e.details
        if d is None:
            continue
        if d.version == "con_4":
            d.version = "con_6"
            d.fields["use_bias"] = Field("bool", True)
            d.fields["use_relu"] = Field("bool", False)
        elif d.version == "affine_":
            d.version = "affine_2"
            d.fields["disabled"] = Field("bool", False)
        elif d.version == "relu_":
            d.version = "relu_2"
            d.fields["disabled"] = Field("bool", False)
        elif d.version == "fc_2":
            d.version = "fc_3"
            d.fields["use_bias"] = Field("bool", True)
    return model


def test_newer_version_strings_and_trainer_form(face_model_path, face_chips, frozen, tmp_path):
    new = dlibbridge.dumps(_upgrade_versions(dlibbridge.load(face_model_path)))
    m = convert.to_torch(new)
    for a, b in zip(m.state_dict().values(), frozen.state_dict().values()):
        assert torch.equal(a, b)
    assert dlibbridge.dumps(convert.to_dlib_tree(m)) == new
    # what dlib's trainer writes: bn_con2 + con_6/relu_2/fc_3
    trainer = dlibbridge.dumps(_upgrade_versions(dlibbridge.loads(
        dlibbridge.dumps(convert.to_dlib_tree(frozen, trainable=True)))))
    t = convert.to_torch(trainer, trainable=True)
    assert dlibbridge.dumps(convert.to_dlib_tree(t, trainable=True)) == trainer
    (tmp_path / "new.dat").write_bytes(new)
    np.testing.assert_array_equal(dlib_embed(tmp_path / "new.dat", face_chips[:2]),
                                  dlib_embed(face_model_path, face_chips[:2]))
    with pytest.raises(convert.ConversionError, match="disabled relu"):
        convert.parse_structure(dlibbridge.loads(
            _edited_bytes(new, "layer<3>", lambda d: d.__setitem__("disabled", True))))


def _edited_bytes(data: bytes, path: str, edit) -> bytes:
    model = dlibbridge.loads(data)
    edit({e.path: e for e in model.layers()}[path].node.details)
    return dlibbridge.dumps(model)


def test_module_without_source_gets_a_fresh_tree_dlib_loads(frozen, face_chips, dlib_descriptors, tmp_path):
    fresh = arch.FaceResNet()
    fresh.load_state_dict(frozen.state_dict())
    assert fresh.dlib_source is None
    convert.to_dlib(fresh, tmp_path / "fresh.dat")
    got = dlib_embed(tmp_path / "fresh.dat", face_chips[:3])
    np.testing.assert_array_equal(got, dlib_descriptors[:3])   # same weights → dlib's exact numbers
    assert [b.path for b in convert.layer_bindings(fresh)] == [b.path for b in convert.layer_bindings(frozen)]


# ---------------------------------------------------------------------------------------
# exports of changed weights, reloaded by real dlib


@pytest.fixture(scope="module")
def finetuned(face_model_path, johns_chips):
    """The trainable form after one SGD step in train mode: batch-norm statistics and every
    weight moved, as after real fine-tuning."""
    torch.manual_seed(0)
    m = convert.to_torch(face_model_path, trainable=True).train()
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    chips, labels = johns_chips[2], johns_chips[1]
    idx = np.r_[0:4, 11:15]
    e = m(torch.from_numpy(chips[idx]))
    loss = torch.cdist(e[:4], e[4:]).neg().mean() + torch.cdist(e[:4], e[:4]).mean()
    loss.backward()
    opt.step()
    assert labels[0] != labels[11]
    return m.eval()


def _export_parity(module, tmp_path, chips, trainable: bool) -> float:
    out = tmp_path / ("bn.dat" if trainable else "deployed.dat")
    convert.to_dlib(module, out, trainable=trainable)
    got = dlib_embed(out, chips)
    want = torch_embed(module, chips)
    assert same_decisions(got, want)
    return float(np.abs(got - want).max())


def test_finetuned_export_matches_dlib(finetuned, face_chips, dlib_descriptors, tmp_path):
    """Deployed (affine, BN folded as dlib folds) and trainable (bn_con2, dlib folds on
    load) exports of changed weights, reloaded by dlib, on 7 chips (all chips: the slow test below)."""
    chips = face_chips[::20]
    assert np.abs(torch_embed(finetuned, chips) - dlib_descriptors[::20]).max() > 1e-3   # it did change
    for trainable in (False, True):
        diff = _export_parity(finetuned, tmp_path, chips, trainable)
        print(f"fine-tuned, {'bn_con2' if trainable else 'affine'} export in dlib: max |Δ| = {diff:.3g}")
        assert diff <= ATOL
    # the frozen port of the bn file folds exactly like dlib: same numbers as dlib on it
    folded = convert.to_torch(tmp_path / "bn.dat")
    assert np.abs(torch_embed(folded, chips) - dlib_embed(tmp_path / "bn.dat", chips)).max() <= ATOL


@pytest.mark.slow
def test_finetuned_deployed_export_matches_dlib_on_all_chips(finetuned, face_chips, tmp_path):
    diff = _export_parity(finetuned, tmp_path, face_chips, trainable=False)
    print(f"fine-tuned deployed export, {len(face_chips)} chips: max |Δ| vs dlib = {diff:.3g}")
    assert diff <= ATOL


def test_checked_export_keeps_the_old_file_when_the_check_fails(frozen, tmp_path):
    out = tmp_path / "out.dat"      # (a passing check is exercised by the CLI test)
    out.write_bytes(b"previous export")
    with pytest.raises(convert.ExportCheckError):
        convert.to_dlib(frozen, out, check=True, atol=-1.0)   # an impossible bar: the check runs
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["out.dat"]   # no temporary file left behind


# ---------------------------------------------------------------------------------------
# ONNX / TorchScript








# ---------------------------------------------------------------------------------------
# command line


def test_cli_export_round_trip_and_refusals(tmp_path, face_model_path, face_model_bytes, capsys):
    out, bn, back = tmp_path / "out.dat", tmp_path / "bn.dat", tmp_path / "back.dat"
    assert cli.main(["export", str(face_model_path), "-o", str(out), "--checkpoint", str(tmp_path / "c.pt")]) == 0
    assert out.read_bytes() == face_model_bytes
    assert cli.main(["export", str(tmp_path / "c.pt"), "-o", str(bn), "--trainable"]) == 0
    assert cli.main(["export", str(bn), "-o", str(back)]) == 0
    assert back.read_bytes() == face_model_bytes
    assert "max |diff|" in capsys.readouterr().out
    assert cli.main(["export", str(out), "-o", str(out)]) == 2                      # never over the input
    assert cli.main(["export", str(out)]) == 2                                      # no output named
    from dlibbridge import assets
    # Other networks export through the generic port, byte for byte when unchanged.
    assert cli.main(["export", str(assets.cnn_face_detector_path()), "-o", str(tmp_path / "x.dat")]) == 0
    assert (tmp_path / "x.dat").read_bytes() == assets.cnn_face_detector_path().read_bytes()










