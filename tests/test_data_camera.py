"""Camera profiles: each estimator recovers parameters that were applied on purpose, the range
syntax of --degrade, the sampler reproduces the profile, and the CLI refuses bad input."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from conftest import SHARED
from dlibbridge import cli
from dlibbridge.data import augment, camera
from dlibbridge.data.augment import Degradations, parse_degradations

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"../shared data not found at {SHARED}")


def _write(path, rgb, quality=None):
    ext = {".jpg": [cv2.IMWRITE_JPEG_QUALITY, quality or 95], ".png": []}[path.suffix]
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), ext)


# ---- JPEG quality --------------------------------------------------------------------------

@pytest.mark.parametrize("quality", [5, 10, 20, 35, 50, 65, 75, 85, 95, 100])
def test_jpeg_quality_is_read_from_the_quantisation_table(quality):
    """libjpeg's tables at every quality come back exactly (the test asks for ±5)."""
    img = np.random.default_rng(quality).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert camera.jpeg_quality(buf.tobytes()) == quality


@needs_shared
def test_dqt_parser_agrees_with_pillow():
    """Our zig-zag reading of the DQT segments gives Pillow's (natural-order) tables."""
    from PIL import Image
    for f in sorted((SHARED / "data" / "faces").glob("*.jpg")):
        ours = camera._dqt_tables(f.read_bytes())
        theirs = Image.open(f).quantization
        assert {k: list(v) for k, v in ours.items()} == {k: list(v) for k, v in theirs.items()}, f.name


def test_jpeg_quality_of_non_jpeg_is_none():
    ok, buf = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    assert camera.jpeg_quality(buf.tobytes()) is None
    assert camera.jpeg_quality(b"\xff\xd8\xff\xdb\x00") is None          # truncated


# ---- photos: face size, grayscale, quality -------------------------------------------------

@pytest.fixture(scope="module")
def pasted_photos(tmp_path_factory, johns_chips):
    """Photos whose face size is known by construction: a johns chip (150 px across the chip
    region) shrunk to SIDE pixels and pasted in a larger grey frame, so dlib's chip region in
    the photo is SIDE pixels wide.  Half are grayscale, saved as JPEG at quality 30 + i."""
    folder = tmp_path_factory.mktemp("pasted")
    truth = {}
    for i, chip in enumerate(johns_chips[2][::6]):
        side = (40, 60, 90, 130, 200)[i % 5]
        small = cv2.resize(chip, (side, side), interpolation=cv2.INTER_AREA if side < 150 else cv2.INTER_LINEAR)
        frame = np.full((side * 3, side * 3, 3), 120, np.uint8)
        frame[side:2 * side, side:2 * side] = small
        gray = i % 2 == 1
        if gray:
            frame = augment.to_grayscale(frame)
        name = f"p{i}.jpg"
        _write(folder / name, frame, quality=30 + i)
        truth[name] = (side, gray, 30 + i)
    return folder, truth


@needs_shared
def test_photos_give_face_size_gray_and_quality(pasted_photos):
    folder, truth = pasted_photos
    profile = camera.measure_folder(folder)
    assert profile.source["faces"] == len(truth) and profile.source["photos"] == len(truth)
    got = sorted(profile.records, key=lambda r: r["jpeg_quality"])
    for (name, (side, gray, q)), r in zip(sorted(truth.items(), key=lambda t: t[1][2]), got):
        assert r["jpeg_quality"] == pytest.approx(q, abs=5), name
        print(f"{name}: face_px {r['face_px']} for {side}, quality {r['jpeg_quality']} for {q}")
        assert r["face_px"] == pytest.approx(side, rel=0.15), name
        assert (r["channels"] == "gray") == gray, name


@needs_shared
def test_downscaled_photos_scale_face_size(tmp_path, shared_dir):
    """A real photo shrunk by 2 has faces half as many pixels across (±15 %)."""
    src = shared_dir / "data" / "faces" / "2008_002470.jpg"
    import dlib
    img = dlib.load_rgb_image(str(src))
    (tmp_path / "full").mkdir()
    (tmp_path / "half").mkdir()
    _write(tmp_path / "full" / "a.png", img)
    _write(tmp_path / "half" / "a.png", cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2),
                                                   interpolation=cv2.INTER_AREA))
    full = np.median(camera.measure_folder(tmp_path / "full").values("face_px"))
    half = np.median(camera.measure_folder(tmp_path / "half").values("face_px"))
    assert half == pytest.approx(full / 2, rel=0.15)


@needs_shared
def test_photo_noise_is_measured_in_source_pixels(tmp_path, johns_chips):
    """Sensor noise of 4 grey levels added to photos (lossless PNG) comes back within ±20 %."""
    rng = np.random.default_rng(0)
    for i, chip in enumerate(johns_chips[2][::11]):
        frame = np.full((360, 360, 3), 120, np.uint8)
        frame[90:270, 90:270] = cv2.resize(chip, (180, 180), interpolation=cv2.INTER_LINEAR)
        _write(tmp_path / f"n{i}.png", augment.add_noise(frame, 4.0, rng))
    profile = camera.measure_folder(tmp_path)
    assert np.median(profile.values("noise")) == pytest.approx(4.0, rel=0.2)


@pytest.fixture(scope="module")
def sharp_photo_chips(photo_chips):
    """The photo chips in which no resolution cutoff is found: many faces in these photos are
    themselves smaller than the sides tested."""
    sharp = [c for c in photo_chips[1] if camera.measure_chip(c)["effective_px"] >= camera.CHIP]
    assert len(sharp) >= 15
    return sharp


@needs_shared
@pytest.mark.parametrize("sigma, face_px", [(1.0, 300), (2.0, 300), (1.0, 80), (2.0, 80)])
def test_blur_beyond_the_face_size(sharp_photo_chips, sigma, face_px):
    """Chips blurred by sigma (chip pixels) and, for face_px < 150, shrunk to it: the median
    blur_sigma is within ±25 % (the 10-90 % spread of single chips is printed)."""
    est = np.array([camera.measure_chip(augment.down_up(augment.blur(c, sigma), face_px), face_px=face_px)["blur_sigma"]
                    for c in sharp_photo_chips])
    print(f"sigma {sigma} face {face_px}: median {np.median(est):.2f}, 10-90 % "
          f"{np.percentile(est, 10):.2f}-{np.percentile(est, 90):.2f}")
    assert np.median(est) == pytest.approx(sigma, rel=0.25)
    clean = [camera.measure_chip(augment.down_up(c, face_px), face_px=face_px)["blur_sigma"] for c in sharp_photo_chips]
    assert np.median(clean) < 0.3


# ---- chips: effective resolution, grayscale -----------------------------------------------

@needs_shared
@pytest.mark.parametrize("side", [32, 48, 72])
def test_chip_resolution_from_content(sharp_photo_chips, side):
    """Chips of photos (not the johns the spectrum was calibrated on) shrunk by down_up to a
    known side: the profile's median effective_px is within ±15 %.  Single chips scatter
    more (the spread is printed)."""
    est = np.array([camera.measure_chip(augment.down_up(c, side))["effective_px"] for c in sharp_photo_chips])
    print(f"side {side}: median {np.median(est):.1f}, 10-90 % {np.percentile(est, 10):.1f}-"
          f"{np.percentile(est, 90):.1f}")
    assert np.median(est) == pytest.approx(side, rel=0.15)


@needs_shared
def test_quality_of_lossless_chips_from_their_jpeg_grid(tmp_path, sharp_photo_chips):
    """Chips shrunk to 48 px and JPEG-compressed at chip resolution, then saved as PNG (what
    a degraded chip store holds): the quality comes back (±5 asked); none for chips that were
    never compressed on their grid."""
    for i, c in enumerate(sharp_photo_chips[:12]):
        q = 20 + 6 * i
        _write(tmp_path / f"c{q:03d}.png", augment.jpeg(augment.down_up(c, 48), q))
    got = [r["jpeg_quality"] for r in camera.measure_folder(tmp_path).records]
    print("ghost qualities", got)
    assert got == pytest.approx([20 + 6 * i for i in range(12)], abs=5)
    assert {camera.jpeg_ghost_quality(c) for c in sharp_photo_chips[:12]} == {None}


@needs_shared
def test_chips_gray_exactly_and_noise(tmp_path, photo_chips):
    chips = photo_chips[1][:12]
    for i, c in enumerate(chips):
        _write(tmp_path / f"g{i:02d}.png", augment.to_grayscale(c) if i % 3 == 0 else c)
    profile = camera.measure_folder(tmp_path)
    assert profile.source["chips"] == len(chips)
    gray = {r["channels"] for i, r in enumerate(profile.records) if i % 3 == 0}
    colour = {r["channels"] for i, r in enumerate(profile.records) if i % 3}
    assert gray == {"gray"} and colour == {"color"}
    tinted = augment.to_grayscale(chips[0]).astype(np.int16) + np.array([2, 0, 3])
    assert camera.channel_kind(np.clip(tinted, 0, 255).astype(np.uint8)) == "ir_like"
    assert camera.channel_kind(chips[0][..., 0], "L") == "gray"
    rng = np.random.default_rng(0)
    noisy = [camera.measure_chip(augment.add_noise(c, 5.0, rng))["noise"] for c in chips]
    assert np.median(noisy) == pytest.approx(5.0, rel=0.2)


@needs_shared
@pytest.mark.parametrize("gray, quality, sigma", [(False, 30, 10.0), (True, 50, 6.0), (False, 75, 6.0),
                                                  (False, 90, 16.0), (False, 40, 0.0)])
def test_noise_under_jpeg_in_lossless_chips(tmp_path, photo_chips, gray, quality, sigma):
    """Chips taken by the package's own camera sampler — noise, then JPEG on the chip's grid —
    and saved as PNG: the JPEG's quality comes back within ±3 and the noise (which JPEG smooths
    away from a second-difference kernel: before, 0 for these) within ±30 % (σ = 0: at most 1
    grey level).  The residual table is calibrated on the johns; these are other faces."""
    sample = camera.CameraSample(side=None, gray=gray, blur_sigma=0.0, noise=sigma, brightness=120.0, contrast=40.0,
                                 jpeg_quality=quality, at_source=False)
    for i, c in enumerate(photo_chips[1][:20]):
        _write(tmp_path / f"{i:02d}.png", sample.apply(c, np.random.default_rng(i)))
    profile = camera.measure_folder(tmp_path)
    assert np.median(profile.values("jpeg_quality")) == pytest.approx(quality, abs=3)
    noise = np.median(profile.values("noise"))
    print("noise", sigma, noise)
    assert noise <= 1.0 if sigma == 0 else noise == pytest.approx(sigma, rel=0.3)


# ---- the sampler -----------------------------------------------------------------------------

def _profile(n=400, seed=0):
    rng = np.random.default_rng(seed)
    recs = [{"face_px": float(rng.uniform(24, 64)), "effective_px": 60.0, "blur_sigma": float(rng.uniform(0, 2)),
             "jpeg_quality": int(rng.integers(20, 41)), "noise": float(rng.uniform(0, 6)),
             "brightness": float(rng.uniform(40, 90)), "contrast": float(rng.uniform(10, 30)),
             "channels": "gray" if rng.random() < 0.3 else "color"} for _ in range(n)]
    return camera.CameraProfile(recs, {"faces": n})


def test_sampler_reproduces_the_profile_distributions():
    profile = _profile()
    rng = np.random.default_rng(1)
    samples = [profile.sample(rng) for _ in range(4000)]
    for name, got in (("face_px", [s.side for s in samples]), ("jpeg_quality", [s.jpeg_quality for s in samples]),
                      ("noise", [s.noise for s in samples]), ("brightness", [s.brightness for s in samples])):
        want = profile.values(name)
        for q in (0.1, 0.5, 0.9):
            assert np.quantile(got, q) == pytest.approx(np.quantile(want, q), rel=0.08, abs=0.3), (name, q)
    assert np.mean([s.gray for s in samples]) == pytest.approx(profile.channel_fractions()["gray"], abs=0.03)


@needs_shared
def test_camera_degradation_reproduces_measured_statistics(photo_chips):
    """Chips degraded by the sampler, measured again, show the profile's brightness, contrast
    and gray fraction; resolution (a 40-pixel camera) within ±15 %."""
    recs = [dict(face_px=40.0, effective_px=40.0, blur_sigma=0.0, jpeg_quality=None, noise=0.0,
                 brightness=60.0, contrast=12.0, channels="gray")]
    deg = camera.CameraProfile(recs).degradations()
    rng = np.random.default_rng(0)
    out = [camera.measure_chip(deg(c, rng)) for c in photo_chips[1]]
    assert {r["channels"] for r in out} == {"gray"}
    assert np.median([r["brightness"] for r in out]) == pytest.approx(60, abs=3)
    assert np.median([r["contrast"] for r in out]) == pytest.approx(12, rel=0.15)
    assert np.median([r["effective_px"] for r in out]) == pytest.approx(40, rel=0.15)


@needs_shared
@pytest.mark.parametrize("camera_kind", ["gray_lowres_jpeg", "noisy_dark"])
def test_profile_of_degraded_chips_drives_a_matching_degradation(tmp_path, sharp_photo_chips, johns_chips, camera_kind):
    """End to end as the fine-tune uses it: chips of a simulated camera (photo chips) → profile
    → the profile's degradation applied to other clean chips (the johns) → measured again: the
    same gray fraction, JPEG quality (±5), resolution, noise and brightness (±15 %)."""
    rng = np.random.default_rng(0)
    for i, c in enumerate(sharp_photo_chips):
        if camera_kind == "gray_lowres_jpeg":
            d = augment.degrade(c, gray=True, lowres_side=32, jpeg_quality=30)
        else:
            d = augment.add_noise(augment.brightness_contrast(c, gain=0.5, mean_from=0, mean_to=0), 4.0, rng)
        _write(tmp_path / f"{i:03d}.png", d)
    profile = camera.measure_folder(tmp_path)
    deg = profile.degradations()
    again = camera.CameraProfile([camera.measure_chip(deg(c, rng)) for c in johns_chips[2]])
    assert again.channel_fractions() == pytest.approx(profile.channel_fractions(), abs=0.05)
    for name in ("effective_px", "noise", "brightness", "jpeg_quality"):
        a, b = again.values(name), profile.values(name)
        assert (len(a) > 0) == (len(b) > 0), name
        if len(b):
            assert np.median(a) == pytest.approx(np.median(b), rel=0.15, abs=5 if name == "jpeg_quality" else 0.3), name


def test_camera_degradations_describe_and_augment():
    deg = _profile().degradations(prob=0.5)
    aug = augment.Augment(jitter=None, degradations=deg)
    chip = np.random.default_rng(0).integers(0, 255, (150, 150, 3), dtype=np.uint8)
    a, b = aug(chip, np.random.default_rng([3, 4])), aug(chip, np.random.default_rng([3, 4]))
    assert np.array_equal(a, b) and a.shape == chip.shape and a.dtype == np.uint8
    d = json.loads(json.dumps(aug.describe()))
    assert d["degradations"]["camera"]["prob"] == 0.5
    assert d["degradations"]["camera"]["fields"]["face_px"]["quantiles"]["p50"] > 24


def test_profile_json_round_trip(tmp_path):
    profile = _profile(50)
    out, png = camera.write_camera(profile, tmp_path / "cam.json")
    assert png.read_bytes()[:4] == b"\x89PNG"
    back = camera.load_camera(out)
    assert back.records == profile.records
    obj = json.loads(out.read_text())
    assert obj["format"] == "dlibbridge-camera" and obj["version"] == 1
    obj["version"] = 99
    (tmp_path / "v99.json").write_text(json.dumps(obj))
    with pytest.raises(camera.CameraError, match="version 99"):
        camera.load_camera(tmp_path / "v99.json")
    obj["version"] = 1
    obj["records"][3]["noise"] = "loud"
    (tmp_path / "bad.json").write_text(json.dumps(obj))
    with pytest.raises(camera.CameraError, match="record 3 is not a face record"):
        camera.load_camera(tmp_path / "bad.json")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(camera.CameraError, match="not a readable camera profile"):
        camera.load_camera(tmp_path / "x.json")


# ---- --degrade ranges ------------------------------------------------------------------------

def test_parse_degradation_ranges():
    d = parse_degradations("lowres=0.7:24-48,jpeg=0.5:20-40,blur=0.3:0.5-2,gray=0.5,noise=0.3:2-8")
    assert d == Degradations(gray=0.5, blur=0.3, lowres=0.7, jpeg=0.5, noise=0.3, blur_sigma=(0.5, 2.0),
                             lowres_side=(24, 48), jpeg_quality=(20, 40), noise_sigma=(2.0, 8.0))
    assert parse_degradations("exposure=1:0.4-0.6").exposure_gain == (0.4, 0.6)
    assert parse_degradations("lowres=0.2:32").lowres_side == (32, 32)
    assert parse_degradations("gray, lowres=0.25") == Degradations(gray=0.5, lowres=0.25)   # old form


@pytest.mark.parametrize("spec, message", [
    ("gray=0.5:1-2", "takes no range"), ("lowres=0.5:48-24", "LO <= HI"), ("jpeg=0.5:0-40", "1 <= LO"),
    ("lowres=0.5:2.5-30", "int values"), ("noise=0.5:a-b", "not LO-HI"), ("blur=1.5:1-2", "outside")])
def test_parse_degradation_ranges_refuses(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_degradations(spec)


def test_new_degradations_leave_old_draws_alone():
    """Adding noise/exposure to the spec does not change what the old four do to a chip that
    neither noise nor exposure touches (their numbers are drawn after)."""
    chip = np.random.default_rng(0).integers(0, 255, (150, 150, 3), dtype=np.uint8)
    old = parse_degradations("gray=1,lowres=1,jpeg=1")(chip, np.random.default_rng(5))
    new = parse_degradations("gray=1,lowres=1,jpeg=1,noise=0")(chip, np.random.default_rng(5))
    assert np.array_equal(old, new)
    dark = parse_degradations("exposure=1:0.5-0.5")(chip, np.random.default_rng(5))
    assert dark.mean() == pytest.approx(chip.mean() * 0.5, abs=1)


# ---- CLI -------------------------------------------------------------------------------------

def _cli(capsys, *argv):
    rc = cli.main(["camera", *map(str, argv), "-q"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = _cli(capsys, tmp_path / "empty", "-o", tmp_path / "c.json")
    assert rc == 2 and "no images found" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _cli(capsys, tmp_path / "nope", "-o", tmp_path / "c.json")
    assert rc == 2 and "no such folder" in err
    (tmp_path / "empty" / "x.jpg").write_bytes(b"not a jpeg")
    rc, _, err = _cli(capsys, tmp_path / "empty", "-o", tmp_path / "c.json")
    assert rc == 2 and "no face measured" in err
    rc, _, err = _cli(capsys, tmp_path / "empty", "-o", tmp_path / "empty" / "c.json")
    assert rc == 2 and "inside the photos folder" in err
    rc, _, err = _cli(capsys, tmp_path / "empty", "-o", tmp_path / "c.png")
    assert rc == 2 and "profile is JSON" in err
    rc, _, err = _cli(capsys, tmp_path / "empty", "-o", tmp_path / "no" / "c.json")
    assert rc == 2 and "no such folder" in err
    assert cli.main(["camera", str(tmp_path / "empty"), "-o", str(tmp_path / "c.json"), "--max-images", "0"]) == 2
    assert not (tmp_path / "c.json").exists()


@needs_shared
def test_cli_writes_and_overwrites_only_its_profiles(tmp_path, capsys, johns_dir):
    out = tmp_path / "cam.json"
    rc, printed, _ = _cli(capsys, johns_dir, "-o", out)
    assert rc == 0 and "55 faces" in printed and out.with_suffix(".png").is_file()
    rc, _, err = _cli(capsys, johns_dir, "-o", out)
    assert rc == 2 and "--overwrite" in err
    assert _cli(capsys, johns_dir, "-o", out, "--overwrite")[0] == 0
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    rc, _, err = _cli(capsys, johns_dir, "-o", foreign, "--overwrite")
    assert rc == 2 and "not a camera profile" in err and foreign.read_text() == '{"mine": 1}'
    out.unlink()
    out.with_suffix(".png").write_bytes(b"\x89PNG someone else's")
    rc, _, err = _cli(capsys, johns_dir, "-o", out, "--overwrite")
    assert rc == 2 and "not a camera profile's plot" in err and not out.exists()


# ---- detection settings ---------------------------------------------------------------------

def _trial(detector, upsample, with_face, seconds, complete=True):
    return {"detector": detector, "upsample": upsample, "photos": 10, "photos_with_face": with_face,
            "faces": with_face, "seconds_per_photo": seconds, "photos_per_s": 1 / seconds, "complete": complete}


def test_choose_detection_rule():
    """The cheapest setting within the budget that finds (nearly) the most; none when none finds."""
    trials = [_trial("hog", 0, 0, 0.01), _trial("hog", 1, 6, 0.05), _trial("hog", 2, 9, 0.2),
              _trial("cnn", 1, 2, 0.3), _trial("cnn", 2, 10, 0.9), _trial("cnn", 3, 10, 3.0, complete=False)]
    assert camera.choose_detection(trials, budget=1.0) == {"detector": "cnn", "upsample": 2}
    assert camera.choose_detection(trials, budget=0.5) == {"detector": "hog", "upsample": 2}
    trials[2]["photos_with_face"] = 10          # as many as the CNN, and cheaper
    assert camera.choose_detection(trials, budget=1.0) == {"detector": "hog", "upsample": 2}
    assert camera.choose_detection([_trial("hog", 0, 0, 0.01)], budget=1.0) is None
    with pytest.raises(camera.CameraError, match="detect_budget"):
        camera.DetectionSearch(detect_budget=0)


@pytest.fixture(scope="module")
def small_camera_photos(tmp_path_factory, shared_dir):
    """Four celeba-dev photos (250×250, faces ~110 px across the chip region) as a small gray
    JPEG camera gives them: shrunk to 70×70 (faces ~31 px), gray, quality 50."""
    import dlib
    folder = tmp_path_factory.mktemp("small_camera")
    for i, f in enumerate(sorted((shared_dir / "data" / "celeba-dev").glob("*/*.jpg"))[::60][:4]):
        small = cv2.resize(dlib.load_rgb_image(str(f)), (70, 70), interpolation=cv2.INTER_AREA)
        _write(folder / f"{i}.jpg", augment.to_grayscale(small), quality=50)
    return folder


def test_detection_setting_found_on_small_faces(small_camera_photos, tmp_path, capsys):
    """Faces of ~31 px: neither detector finds them at upsampling 0 (HOG's smallest are ~80 px,
    the CNN's ~40), so the profile records a setting that upsamples, its faces' sizes are those
    found at it, and ``align --camera`` detects with it."""
    from dlibbridge.port.mmod import cnn_face_detector
    profile = camera.measure_folder(small_camera_photos, cnn_factory=cnn_face_detector,
                                    search=camera.DetectionSearch(detect_photos=4, detect_budget=5.0))
    trials = {(t["detector"], t["upsample"]): t for t in profile.detection["trials"]}
    assert trials["hog", 0]["photos_with_face"] == 0 and trials["cnn", 0]["photos_with_face"] == 0
    chosen = profile.detection["setting"]
    assert chosen["upsample"] >= 1
    assert trials[chosen["detector"], chosen["upsample"]]["photos_with_face"] == 4
    assert profile.source["faces"] == trials[chosen["detector"], chosen["upsample"]]["faces"]
    assert np.median(profile.values("face_px")) == pytest.approx(31, rel=0.2)
    assert "chosen" in profile.summary()

    out, _ = camera.write_camera(profile, tmp_path / "cam.json")
    assert camera.load_camera(out).detection == json.loads(json.dumps(profile.detection))
    from dlibbridge.data.align import AlignSettings
    assert (AlignSettings.for_camera(out).detector, AlignSettings.for_camera(out).upsample) == (
        chosen["detector"], chosen["upsample"])
    assert AlignSettings.for_camera(out, upsample=3).upsample == 3
    rc = cli.main(["align", str(small_camera_photos), str(tmp_path / "chips"), "--camera", str(out), "-q", "--jobs", "1"])
    summary = json.loads((tmp_path / "chips" / "summary.json").read_text())
    assert rc == 0 and summary["photos_with_chips"] == 4
    assert summary["settings"]["detector"] == chosen["detector"] and summary["settings"]["upsample"] == chosen["upsample"]


def test_align_camera_without_detection_setting(tmp_path, capsys):
    out, _ = camera.write_camera(_profile(20), tmp_path / "cam.json")
    (tmp_path / "raw").mkdir()
    assert cli.main(["align", str(tmp_path / "raw"), str(tmp_path / "chips"), "--camera", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no detection setting" in err and len(err.strip().splitlines()) == 1
