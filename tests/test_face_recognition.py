"""dlibbridge.face_recognition: the face_recognition package's own API (face_encodings,
compare_faces) run with a fine-tuned model gives dlib's encodings with that model, at the
run's threshold, and everything is restored afterwards."""
from __future__ import annotations

import numpy as np
import pytest

from dlibbridge import assets

face_recognition = pytest.importorskip("face_recognition", reason="face_recognition not installed (the test extra)")

from dlibbridge.face_recognition import use_model          # noqa: E402
from conftest import TUNED_THRESHOLD as RUN_THRESHOLD      # noqa: E402


def _dlib_encodings(model, image) -> list[np.ndarray]:
    """What face_recognition.face_encodings computes, written with dlib directly: HOG (upsample
    1), 5-point landmarks, compute_face_descriptor(img, shape, 1)."""
    import dlib
    net = dlib.face_recognition_model_v1(str(model))
    sp = dlib.shape_predictor(str(assets.landmarks5_path()))
    return [np.array(net.compute_face_descriptor(image, sp(image, d), 1))
            for d in dlib.get_frontal_face_detector()(image, 1)]


@pytest.mark.parametrize("name", ["model.dat", "model.pt", "."])
def test_face_recognition_runs_a_fine_tuned_model(tuned_run, shared_dir, name):
    image = face_recognition.load_image_file(str(shared_dir / "data" / "faces" / "2008_002470.jpg"))
    before = face_recognition.face_encodings(image)
    encoder, compare = face_recognition.api.face_encoder, face_recognition.compare_faces
    with use_model(tuned_run / name) as model:
        assert model.threshold == RUN_THRESHOLD
        got = face_recognition.face_encodings(image)
        want = _dlib_encodings(tuned_run / "model.dat", image)
        assert len(got) == len(want) == 6
        # the .dat is used as is; the checkpoint through its dlib export (float rounding only)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=0, atol=0 if name != "model.pt" else 1e-6)
        dist = face_recognition.face_distance(got[1:], got[0])
        assert face_recognition.compare_faces(got[1:], got[0]) == list(dist <= RUN_THRESHOLD)
        assert face_recognition.api.compare_faces(got[1:], got[0], tolerance=0.0) == [False] * 5
        assert np.abs(np.array(got) - np.array(before)).max() > 1e-3        # a different model
    assert face_recognition.api.face_encoder is encoder and face_recognition.compare_faces is compare
    np.testing.assert_array_equal(face_recognition.face_encodings(image), before)
    np.testing.assert_array_equal(before, _dlib_encodings(assets.face_model_path(), image))


def test_given_threshold_and_default_model(shared_dir):
    image = face_recognition.load_image_file(str(shared_dir / "data" / "faces" / "Tom_Cruise_avp_2014_4.jpg"))
    with use_model(threshold=0.5) as model:
        assert model.threshold == 0.5 and model.dat == assets.face_model_path()
        enc = face_recognition.face_encodings(image)
        assert face_recognition.compare_faces(enc, enc[0] + 0.49 / np.sqrt(128)) == [True]
        assert face_recognition.compare_faces(enc, enc[0] + 0.51 / np.sqrt(128)) == [False]
