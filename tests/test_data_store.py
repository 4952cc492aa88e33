"""Image reading (every format and every kind of broken file), the chip store, the torch
Dataset and the identity-balanced sampler."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from dlibbridge.data.images import REASONS, ImageReadError, read_image

from dlibbridge.data.store import ChipDataset, ChipStore, PKBatchSampler, StoreError, pack
from image_zoo import build_zoo, face_crop


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, shared_dir):
    folder = tmp_path_factory.mktemp("zoo")
    return folder, build_zoo(folder, face_crop(shared_dir))


# ---- reading -------------------------------------------------------------------------------

def test_every_file_of_the_zoo_gives_its_pixels_or_its_reason(zoo):
    folder, expected = zoo
    assert {e.reason for e in expected.values() if e.reason} == set(REASONS), "the zoo covers every reason"
    for name, exp in sorted(expected.items()):
        if exp.reason:
            with pytest.raises(ImageReadError) as info:
                read_image(folder / name)
            assert info.value.reason == exp.reason, (name, str(info.value))
            assert info.value.detail and info.value.path == str(folder / name)
        else:
            photo = read_image(folder / name)
            assert photo.rgb.dtype == np.uint8 and photo.rgb.flags.c_contiguous, name
            np.testing.assert_array_equal(photo.rgb, exp.rgb, err_msg=name)
            assert exp.note in photo.note, (name, photo.note)


def test_truncation_is_found_whatever_pillows_process_flag_says(zoo, monkeypatch):
    """``import face_recognition`` sets Pillow's process-wide LOAD_TRUNCATED_IMAGES: a truncated
    photo must still be reported, and the flag left as the process had it."""
    from PIL import ImageFile
    folder, expected = zoo
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for name in (n for n, e in expected.items() if e.reason == "truncated"):
        with pytest.raises(ImageReadError, match="") as info:
            read_image(folder / name)
        assert info.value.reason == "truncated", name
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_jpeg_is_decoded_by_dlib_unless_pillow_is_asked(zoo):
    import dlib
    folder, _ = zoo
    path = folder / "photo.jpg"
    assert read_image(path).decoder == "dlib"
    pillow = read_image(path, decoder="pillow")
    assert pillow.decoder == "pillow"
    np.testing.assert_array_equal(pillow.rgb, np.asarray(Image.open(path).convert("RGB")))
    np.testing.assert_array_equal(read_image(path).rgb, dlib.load_rgb_image(str(path)))


def test_max_pixels_is_checked_before_decoding(zoo):
    folder, _ = zoo
    with pytest.raises(ImageReadError) as info:
        read_image(folder / "photo.png", max_pixels=180 * 180 - 1)
    assert info.value.reason == "too_large"
    assert read_image(folder / "photo.png", max_pixels=180 * 180).rgb.shape == (180, 180, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_exif_transpose(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    Image.fromarray(pixels).save(path, exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    photo = read_image(path)
    assert photo.orientation == orientation
    np.testing.assert_array_equal(photo.rgb, expected)


def test_a_directory_is_unreadable_not_a_crash(tmp_path):
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path)
    assert info.value.reason == "unreadable"


# ---- the chip store ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def johns_store(tmp_path_factory, johns_dir):
    return pack(johns_dir, tmp_path_factory.mktemp("st") / "johns.store", progress=False)


def test_pack_keeps_every_chip_its_label_and_path(johns_store, johns_dir):
    import dlib
    files = sorted(johns_dir.glob("*/*.jpg"))
    store = johns_store
    assert len(store) == len(files) == 55 and store.skipped == []
    assert store.identities == sorted({f.parent.name for f in files})
    assert store.chips.shape == (55, 150, 150, 3) and isinstance(store.chips, np.memmap)
    for i, rel in enumerate(store.paths):
        np.testing.assert_array_equal(store.chips[i], dlib.load_rgb_image(str(johns_dir / rel)))
        assert store.identities[store.labels[i]] == rel.split("/")[0]
    # identity-contiguous order
    assert list(store.labels) == sorted(store.labels)


def test_batch_is_a_slice_of_the_memory_map(johns_store):
    chips, labels = johns_store.batch(slice(10, 20))
    assert np.shares_memory(chips, johns_store.chips) and chips.shape == (10, 150, 150, 3)
    gathered, glabels = johns_store.batch([20, 3, 7])
    np.testing.assert_array_equal(gathered[1], johns_store.chips[3])
    assert list(glabels) == [johns_store.labels[i] for i in (20, 3, 7)]


def test_store_pickles_by_path(johns_store):
    import pickle
    blob = pickle.dumps(ChipDataset(johns_store))
    assert len(blob) < 10_000, "chips are not copied into the pickle"
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.store.chips[7], johns_store.chips[7])


def test_pack_is_resumable_and_atomic(tmp_path, johns_dir, johns_store, monkeypatch):
    from dlibbridge.data import store as data
    monkeypatch.setattr(data, "_FLUSH_EVERY", 8)
    store_path = tmp_path / "s.store"

    def stop_at_30(i):
        if i == 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack(johns_dir, store_path, progress=False, on_chip=stop_at_30)
    assert not store_path.exists(), "no store until it is complete"
    progress = json.loads((tmp_path / "s.store.partial" / "progress.json").read_text())
    assert progress["next"] == 31
    resumed_from = []
    store = pack(johns_dir, store_path, progress=False, on_chip=resumed_from.append)
    assert resumed_from[0] == 31, "the rerun continued where the first stopped"
    np.testing.assert_array_equal(store.chips, johns_store.chips)
    np.testing.assert_array_equal(store.labels, johns_store.labels)
    assert not (tmp_path / "s.store.partial").exists()
    with pytest.raises(StoreError, match="exists"):
        pack(johns_dir, store_path, progress=False)
    assert len(pack(johns_dir, store_path, overwrite=True, progress=False)) == 55


def test_pack_skips_files_that_are_not_chips_and_says_why(tmp_path, johns_dir):
    src = tmp_path / "chips"
    (src / "ann").mkdir(parents=True)
    for f in sorted((johns_dir / "John_Simm").glob("*.jpg"))[:3]:
        (src / "ann" / f.name).write_bytes(f.read_bytes())
    Image.new("RGB", (100, 150)).save(src / "ann" / "small.png")
    (src / "ann" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nxx")
    (src / "loose.png").write_bytes((src / "ann" / "small.png").read_bytes())
    store = pack(src, tmp_path / "st", progress=False)
    assert len(store) == 3 and store.identities == ["ann"]
    reasons = {s["path"]: s["reason"] for s in store.skipped}
    assert reasons == {"ann/small.png": "corrupt", "ann/broken.png": "corrupt", "loose.png": "corrupt"}
    assert "150x150" in next(s["detail"] for s in store.skipped if s["path"] == "ann/small.png")


def test_store_refuses_damaged_or_missing_files(tmp_path, johns_store):
    with pytest.raises(StoreError, match="not a chip store"):
        ChipStore(tmp_path)
    with pytest.raises(StoreError, match="no chips"):
        pack(tmp_path, tmp_path.parent / "x.store", progress=False)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in johns_store.path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    with open(copy / "chips.u8", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(StoreError, match="bytes, expected"):
        ChipStore(copy)


# ---- torch Dataset and the P×K sampler -----------------------------------------------------

def test_dataset_gives_chw_uint8_tensors_and_labels(johns_store):
    import torch
    ds = ChipDataset(johns_store, indices=range(5, 25))
    chip, label = ds[3]
    assert chip.dtype == torch.uint8 and tuple(chip.shape) == (3, 150, 150)
    np.testing.assert_array_equal(chip.permute(1, 2, 0).numpy(), johns_store.chips[8])
    assert label == johns_store.labels[8]
    assert list(ds.labels) == list(johns_store.labels[5:25])
    with pytest.raises(IndexError):
        ChipDataset(johns_store, indices=[55])


def test_dataloader_with_pk_sampler_gives_balanced_batches(johns_store):
    import torch
    from torch.utils.data import DataLoader
    sampler = PKBatchSampler(johns_store.labels, p=3, k=4, seed=1)
    ds = ChipDataset(johns_store)
    n = 0
    for (chips, labels), batch in zip(DataLoader(ds, batch_sampler=sampler, collate_fn=ChipDataset.collate),
                                      sampler):
        assert chips.shape == (12, 3, 150, 150) and chips.dtype == torch.uint8 and labels.dtype == torch.int64
        np.testing.assert_array_equal(chips.permute(0, 2, 3, 1).numpy(), johns_store.chips[batch])
        counts = np.unique(labels.numpy(), return_counts=True)[1]
        assert len(counts) == 3 and set(counts) == {4}
        n += 1
    assert n == len(sampler) == 55 // 12
    default = next(iter(DataLoader(ds, batch_sampler=sampler)))
    custom = next(iter(DataLoader(ds, batch_sampler=sampler, collate_fn=ChipDataset.collate)))
    assert torch.equal(default[0], custom[0]) and torch.equal(default[1], custom[1])


def test_pk_sampler_is_deterministic_balanced_and_fair(johns_store):
    labels = johns_store.labels
    a = list(PKBatchSampler(labels, p=2, k=3, seed=7, batches=50))
    assert a == list(PKBatchSampler(labels, p=2, k=3, seed=7, batches=50))
    s = PKBatchSampler(labels, p=2, k=3, seed=7, batches=50)
    s.set_epoch(1)
    assert list(s) != a
    seen = np.zeros(labels.max() + 1, int)
    for batch in a:
        ids, counts = np.unique(labels[batch], return_counts=True)
        assert len(ids) == 2 and set(counts) == {3}
        assert len(set(batch)) == 6, "distinct images when an identity has at least k"
        seen[ids] += 1
    assert seen.max() - seen.min() <= 1, "identities are visited in turn"


def test_pk_sampler_rules_for_small_identities():
    labels = np.array([0, 0, 1, 1, 1, 2, -1, -1])
    s = PKBatchSampler(labels, p=2, k=3, batches=20, seed=0)
    for batch in s:
        assert 5 not in batch and 6 not in batch and 7 not in batch, "singletons and unlabelled are left out"
        assert set(labels[batch]) <= {0, 1}
    with pytest.raises(ValueError, match="only 2 identities"):
        PKBatchSampler(labels, p=3, k=2)


def test_dataset_transform_gets_a_per_sample_generator(johns_store):
    def noise(chip, rng):
        return np.clip(chip.astype(int) + rng.integers(-3, 4, chip.shape), 0, 255).astype(np.uint8)
    ds = ChipDataset(johns_store, transform=noise, seed=3)
    first = ds[4][0]
    assert (first == ds[4][0]).all(), "same seed, epoch and index: same augmentation"
    assert (first == ds.__getitems__([9, 4])[1][0]).all(), "independent of batch composition"
    ds.set_epoch(1)
    assert not (first == ds[4][0]).all()


def test_pack_does_not_need_torch():
    import subprocess
    import sys
    code = ("import sys, dlibbridge.data as d; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def _tree_snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_pack_overwrite_never_replaces_what_is_not_a_store(tmp_path, johns_dir):
    photos = tmp_path / "photos"
    (photos / "ann").mkdir(parents=True)
    for f in sorted((johns_dir / "John_Simm").glob("*.jpg"))[:2]:
        (photos / "ann" / f.name).write_bytes(f.read_bytes())
    before = _tree_snapshot(photos)
    with pytest.raises(StoreError, match="not a chip store"):
        pack(johns_dir, photos, overwrite=True, progress=False)
    assert _tree_snapshot(photos) == before, "a folder of photos survives --overwrite untouched"

    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(StoreError, match="not a chip store"):
        pack(johns_dir, a_file, overwrite=True, progress=False)
    assert a_file.read_text() == "keep me" and not (tmp_path / "notes.txt.old").exists()

    # A store with a stranger's file inside is no longer verifiably ours.
    store = tmp_path / "s.store"
    pack(johns_dir, store, progress=False)
    (store / "mine.txt").write_text("x")
    with pytest.raises(StoreError, match="not a chip store"):
        pack(johns_dir, store, overwrite=True, progress=False)
    assert (store / "mine.txt").read_text() == "x"
    (store / "mine.txt").unlink()
    assert len(pack(johns_dir, store, overwrite=True, progress=False)) == 55


def test_pack_never_deletes_a_foreign_partial_or_old_folder(tmp_path, johns_dir):
    for suffix in (".partial", ".old"):
        foreign = tmp_path / ("s.store" + suffix)
        foreign.mkdir()
        (foreign / "photo.jpg").write_bytes(b"precious")
        with pytest.raises(StoreError, match="not written by pack"):
            pack(johns_dir, tmp_path / "s.store", progress=False)
        assert (foreign / "photo.jpg").read_bytes() == b"precious"
        (foreign / "photo.jpg").unlink()
        foreign.rmdir()


def test_cli_pack_overwrite_on_photos_is_one_line_exit_2(tmp_path, johns_dir, capsys):
    from dlibbridge.cli import main
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"precious")
    assert main(["pack", str(johns_dir), "-o", str(photos), "--overwrite", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a chip store" in err
    assert (photos / "a.jpg").read_bytes() == b"precious"
