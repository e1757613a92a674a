"""What the training pipeline decides from measurements (offered/default levels, novelty), and the
parts of the corpus tooling that need no download (Qt resource reader, people paste)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from palettelink.train.levels import calibrate_novelty, choose_levels, novelty_of


def _lv(ap: float, extra: float = 0.0) -> dict[str, float]:
    return {"ap50": ap, "extra_per_image": extra}


def test_a_fine_level_worse_than_a_coarser_one_is_not_offered() -> None:
    # the first trained codec: level 0 kept 0.45, level 5 0.95 (same-site eval)
    per_level = [_lv(0.45), _lv(0.51), _lv(0.56), _lv(0.87), _lv(0.90), _lv(0.95), _lv(0.82), _lv(0.38)]
    offered, default, held = choose_levels(per_level, avif_extra_per_image=1.0)
    assert offered == [5, 6, 7] and held
    assert default == 5
    aps = [per_level[lv]["ap50"] for lv in offered]
    assert all(a >= b - 0.02 for a, b in zip(aps, aps[1:], strict=False))  # finer never loses > 0.02


def test_the_default_is_the_coarsest_level_within_tolerance_of_the_best() -> None:
    per_level = [_lv(0.97), _lv(0.965), _lv(0.94), _lv(0.90), _lv(0.70)]
    offered, default, _ = choose_levels(per_level, avif_extra_per_image=1.0)
    assert offered == [0, 1, 2, 3, 4]
    assert default == 1  # 0.965 ≥ 0.97 − 0.02; level 2 (0.94) is not


def test_levels_that_fire_more_than_avif_q0_are_not_offered() -> None:
    per_level = [_lv(0.96, extra=0.2), _lv(0.95, extra=3.0), _lv(0.9, extra=0.1)]
    offered, _, held = choose_levels(per_level, avif_extra_per_image=0.5)
    assert offered == [0, 2] and held


def test_when_no_two_levels_keep_avifs_false_box_rate_accuracy_alone_chooses_and_says_so() -> None:
    per_level = [_lv(0.55, 0.34), _lv(0.53, 0.35), _lv(0.44, 0.35), _lv(0.18, 0.3)]
    offered, default, held = choose_levels(per_level, avif_extra_per_image=0.24)
    assert offered == [0, 1, 2, 3] and default == 1 and not held


def _tables(rng: np.random.Generator, groups: tuple[int, ...] = (0, 2, 4)) -> dict[str, np.ndarray]:
    t: dict[str, np.ndarray] = {"groups": np.asarray(groups)}
    for g in range(len(groups) - 1):
        t[f"g{g}_search"] = rng.normal(size=(8, groups[g + 1] - groups[g])).astype(np.float32)
    return t


def test_novelty_is_zero_on_palette_entries_and_grows_away_from_them() -> None:
    rng = np.random.default_rng(0)
    t = _tables(rng)
    z = np.zeros((2, 4, 3, 3), np.float32)
    z[0, 0:2] = t["g0_search"][3][:, None, None]  # every position on an entry
    z[0, 2:4] = t["g1_search"][5][:, None, None]
    z[1] = z[0] + 10.0
    nov = novelty_of(z, t)
    assert nov[0] == pytest.approx(0.0, abs=1e-9) and nov[1] > 10.0
    cal = calibrate_novelty(np.concatenate([z[:1]] * 9 + [z[1:]]), t)
    assert cal["p50"] == pytest.approx(0.0, abs=1e-9) and cal["threshold"] <= cal["max"]


def _rcc(files: dict[str, bytes], compress: set[str]) -> bytes:
    """A minimal version-1 Qt resource file: root → one folder "img" → the files."""
    names = b""
    name_off = {}
    for n in ["img", *files]:
        name_off[n] = len(names)
        u = n.encode("utf-16-be")
        names += struct.pack(">HI", len(n), 0) + u
    data = b""
    data_off = {}
    for n, blob in files.items():
        data_off[n] = len(data)
        payload = struct.pack(">I", len(blob)) + zlib.compress(blob) if n in compress else blob
        data += struct.pack(">I", len(payload)) + payload
    nodes = [struct.pack(">IHII", 0, 2, 1, 1),  # root: a directory with one child at index 1
             struct.pack(">IHII", name_off["img"], 2, len(files), 2)]
    for n in files:
        nodes.append(struct.pack(">IHHHI", name_off[n], 1 if n in compress else 0, 0, 0, data_off[n]))
    tree = b"".join(nodes)
    header = 20
    return b"qres" + struct.pack(">IIII", 1, header, header + len(tree), header + len(tree) + len(data)) \
        + tree + data + names


def test_the_rcc_reader_gets_plain_and_zlib_files_out(tmp_path: Path) -> None:
    from palettelink.train.rcc import RccError, iter_files

    f = tmp_path / "a.rcc"
    f.write_bytes(_rcc({"cat.webp": b"RIFF-cat" * 50, "dog.jpg": b"\xff\xd8dog" * 20}, {"cat.webp"}))
    assert dict(iter_files(f)) == {"/img/cat.webp": b"RIFF-cat" * 50, "/img/dog.jpg": b"\xff\xd8dog" * 20}
    (tmp_path / "bad.rcc").write_bytes(b"not a resource")
    with pytest.raises(RccError):
        list(iter_files(tmp_path / "bad.rcc"))


def test_paste_people_puts_crops_in_and_is_reproducible() -> None:
    from palettelink.train.augment import paste_people

    x = np.full((1, 3, 64, 64), 0.5, np.float32)
    crop = np.zeros((40, 20, 4), np.uint8)
    crop[..., 0] = 255
    crop[..., 3] = 255
    a = paste_people(x, [crop], np.random.default_rng(1))
    b = paste_people(x, [crop], np.random.default_rng(1))
    assert a.shape == x.shape and np.array_equal(a, b)
    assert (a[0, 0] > 0.9).any() and np.array_equal(x, np.full_like(x, 0.5))  # input untouched
    assert paste_people(x, [], np.random.default_rng(1)) is x
    assert np.array_equal(paste_people(x, [crop], np.random.default_rng(1), lying=0.0), a)  # 0 draws nothing


def test_lying_pastes_turn_people_a_quarter_turn() -> None:
    """``lying=1``: every pasted person lies on the ground: red blocks wider than tall (the crop is 2:1
    upright), where the upright pastes are taller than wide."""
    from palettelink.train.augment import paste_people

    x = np.zeros((1, 3, 64, 64), np.float32)
    crop = np.zeros((40, 20, 4), np.uint8)
    crop[..., 0] = 255
    crop[..., 3] = 255

    def extents(y: np.ndarray) -> tuple[int, int]:
        rows, cols = np.nonzero(y[0, 0] > 0.5)
        return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)

    for seed in range(8):
        if int(np.random.default_rng((seed, 5)).integers(1, 7)) != 1:
            continue  # one paste per view keeps the extents readable
        upright = paste_people(x, [crop], np.random.default_rng((seed, 5)))
        lying = paste_people(x, [crop], np.random.default_rng((seed, 5)), lying=1.0)
        if not (upright[0, 0] > 0.5).any():
            continue  # the drawn height was too small to paste
        (uh, uw), (lh, lw) = extents(upright), extents(lying)
        assert uh > uw and lw > lh and (lh, lw) == (uw, uh)
        break
    else:
        pytest.fail("no seed gave a single paste")


def _jpeg(size: tuple[int, int]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 150)).save(buf, "JPEG")
    return buf.getvalue()


def test_the_people_photo_extractors_take_the_photos_and_leave_the_rest(tmp_path: Path) -> None:
    """face-recognition's sdist: its test JPEGs of at least MIN_SIDE pixels, not the PNG copy nor the
    package's docs images; insightface's wheel: the group photo only."""
    import io
    import tarfile
    import zipfile

    from palettelink.train import corpus

    members = {"fr/tests/test_images/obama.jpg": _jpeg((320, 400)),
               "fr/tests/test_images/tiny.jpg": _jpeg((120, 90)),
               "fr/tests/test_images/32bit.png": _jpeg((320, 400)),
               "fr/docs/_static/plus.jpg": _jpeg((400, 400))}
    sdist = tmp_path / "fr.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    assert [n for n, _ in corpus._extractor("facerec")(sdist)] == ["obama.jpg"]

    wheel = tmp_path / "insightface.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("insightface/data/images/t1.jpg", _jpeg((640, 440)))
        z.writestr("insightface/data/images/mask_blue.jpg", _jpeg((709, 354)))
    got = list(corpus._extractor("insightface")(wheel))
    assert [n for n, _ in got] == ["t1.jpg"] and got[0][1][:2] == b"\xff\xd8"
    assert {s.role for s in corpus.SOURCES if s.select in ("facerec", "insightface")} == {"train"}
