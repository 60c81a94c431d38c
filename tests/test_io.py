"""Finding, pairing, decoding and atomically writing image files."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from tiny import fundus_like

from retina_batch.io import (
    InputError,
    count_images,
    decode,
    discover,
    index_by_key,
    jpeg_header,
    jpeg_size,
    list_images,
    pair_key,
    read_image,
    read_mask,
    reduction_for,
    write_atomic,
)


def touch_image(path: Path, size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", np.zeros((size[1], size[0], 3), np.uint8))
    path.write_bytes(buf.tobytes())
    return path


def test_discover_walks_tree_in_stable_order_and_mirrors_it(tmp_path):
    src = tmp_path / "in"
    for name in ["b.PNG", "a.jpg", "sub/z/c.TIFF", "sub/d.bmp", ".hidden.png", ".cache/e.png",
                 "notes.txt", "sub/f.Jpeg", "g.ppm", "h.pgm", "i.gif", "j.tif"]:
        touch_image(src / name)
    found = [(p.relative_to(src).as_posix(), rel.as_posix()) for p, rel in discover(src)]
    # Sorted by name at every level, depth first; hidden files/folders and non-images skipped.
    assert [rel for _, rel in found] == [
        "a.jpg", "b.PNG", "g.ppm", "h.pgm", "i.gif", "j.tif", "sub/d.bmp", "sub/f.Jpeg",
        "sub/z/c.TIFF"]
    assert all(p == rel for p, rel in found)
    assert count_images(src) == 9


def test_discover_skips_output_folders_inside_the_input(tmp_path):
    src = tmp_path / "in"
    touch_image(src / "a.png")
    touch_image(src / "masks" / "a.png")
    touch_image(src / "maps" / "x" / "a.png")
    rels = [rel.as_posix() for _, rel in discover(src, exclude=[src / "masks", src / "maps"])]
    assert rels == ["a.png"]
    assert count_images(src) == 3 and count_images(src, exclude=[src / "masks"]) == 2


def test_discover_skips_nested_output_folders(tmp_path):
    src = tmp_path / "in"
    touch_image(src / "site" / "a.png")
    touch_image(src / "site" / "run" / "masks" / "a.png")
    rels = [rel.as_posix() for _, rel in discover(src, exclude=[src / "site" / "run"])]
    assert rels == ["site/a.png"]


def test_list_images_is_the_sorted_visible_images_of_one_folder(tmp_path):
    for name in ["b.png", "a.TIF", ".hidden.png", "notes.txt", "sub/c.png"]:
        touch_image(tmp_path / name)
    (tmp_path / "folder.png").mkdir()  # a folder named like an image
    assert [p.name for p in list_images(tmp_path)] == ["a.TIF", "b.png"]


@pytest.mark.parametrize("names", [
    ("21_manual1.gif", "21_training_mask.gif"),  # DRIVE: the vessels sort first
    ("21_mask.png", "21_vessels.png"),  # the FOV mask sorts first
    ("21_manual1.gif", "21_manual2.gif", "21_training_mask.gif"),  # first observer wins
])
def test_index_by_key_prefers_vessels_for_truth_and_masks_for_fov(tmp_path, names):
    for name in names:
        touch_image(tmp_path / name)
    vessels = next(n for n in names if "mask" not in n)
    fov = next(n for n in names if "mask" in n)
    assert {k: p.name for k, p in index_by_key(tmp_path).items()} == {"21": vessels}
    assert {k: p.name for k, p in index_by_key(tmp_path, fov=True).items()} == {"21": fov}
    assert index_by_key(None) == {}


def test_discover_single_image_and_list_files(tmp_path):
    a = touch_image(tmp_path / "data" / "eye" / "a.png")
    b = touch_image(tmp_path / "elsewhere" / "b.png")
    assert [(p, rel) for p, rel in discover(a)] == [(a, Path("a.png"))]

    txt = tmp_path / "data" / "list.txt"
    txt.write_text(f"# screening batch 7\neye/a.png\n\n{b}\n")
    found = list(discover(txt))
    assert [p for p, _ in found] == [a, b]
    assert found[0][1] == Path("eye/a.png")
    # An entry outside the list's folder keeps its absolute path below OUT (no collisions).
    assert found[1][1] == Path(*b.resolve().parts[1:])

    csv_file = tmp_path / "data" / "list.csv"
    csv_file.write_text("patient,path\n17,eye/a.png\n18,missing.png\n19\n")  # 19: no path
    assert [(p.name, rel.as_posix()) for p, rel in discover(csv_file)] == [
        ("a.png", "eye/a.png"), ("missing.png", "missing.png")]


def test_discover_rejects_unusable_input(tmp_path):
    with pytest.raises(InputError, match="not found"):
        discover(tmp_path / "nope")
    notes = tmp_path / "notes.doc"
    notes.write_text("x")
    with pytest.raises(InputError, match="not a folder, an image"):
        discover(notes)


@pytest.mark.parametrize("image, truth", [
    ("21_training.tif", "21_manual1.gif"),
    ("Image_01L.jpg", "Image_01L_1stHO.png"),
    ("im0001.ppm", "im0001.ah.ppm"),
    ("01_h.JPG", "01_h.tif"),
    ("21_training.tif", "21_training_mask.gif"),
])
def test_pair_key_matches_annotation_names(image, truth):
    assert pair_key(image) == pair_key(truth)


def test_pair_key_is_the_lower_case_stem_without_markers():
    assert pair_key("eyes/Image_01L_1stHO.PNG") == "image_01l"
    assert pair_key("21_manual1") == "21"  # no extension: nothing else is cut


def test_pair_key_keeps_distinct_images_apart():
    assert len({pair_key(n) for n in ["1.png", "11.png", "1_test.png", "a_seg_b.png"]}) == 3


def test_reduced_jpeg_decoding_keeps_the_original_size(tmp_path):
    big = cv2.resize(fundus_like(350, 233), (3504, 2336), interpolation=cv2.INTER_LINEAR)
    path = tmp_path / "big.JPG"
    assert cv2.imwrite(str(path), big)
    data = np.fromfile(str(path), np.uint8)
    assert jpeg_size(data) == (3504, 2336)
    img, size, factor = decode(path, working_size=512)
    assert size == (3504, 2336) and factor == reduction_for(size, 512) == 4
    assert img.shape == (584, 876, 3)
    img, size, factor = decode(path, working_size=64)
    assert factor == 8 and img.shape == (292, 438, 3) and size == (3504, 2336)
    # Small JPEGs and other formats are decoded at full size.
    img, size, factor = decode(path, working_size=4000)
    assert factor == 1 and img.shape == (2336, 3504, 3)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"this is not an image", "not a readable image"),
])
def test_decode_errors_say_why(tmp_path, content, reason):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=reason):
        decode(path, 64)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".tif", ".bmp"])
def test_truncated_files_are_not_decoded_as_images(tmp_path, ext):
    ok, buf = cv2.imencode(ext, fundus_like(400, 300))
    path = tmp_path / f"cut{ext}"
    path.write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(ValueError):
        decode(path, 64)


def test_read_mask_thresholds_any_depth(tmp_path):
    mask = np.zeros((5, 7), np.uint8)
    mask[1, 2] = 255
    mask[3, 4] = 100  # at or below 127: background
    mask[0, 0], mask[4, 6] = 127, 128  # the edge: 127 is background, 128 vessel
    assert cv2.imwrite(str(tmp_path / "m.png"), mask)
    assert cv2.imwrite(str(tmp_path / "m16.png"), mask.astype(np.uint16) * 257)
    assert cv2.imwrite(str(tmp_path / "m3.bmp"), cv2.merge([mask, mask, mask]))
    for name in ("m.png", "m16.png", "m3.bmp"):
        got = read_mask(tmp_path / name)
        assert got.shape == (5, 7) and got.dtype == bool
        assert np.argwhere(got).tolist() == [[1, 2], [4, 6]]


def test_write_atomic_replaces_without_leaving_temporaries(tmp_path):
    target = tmp_path / "deep" / "er" / "mask.png"
    write_atomic(target, b"first")
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["mask.png"]


# --- EXIF orientation in the JPEG header (the rule itself is tested in test_geometry.py) ------

def exif_jpeg(orientation: int | None, order: str = "MM", ifd: int = 8, others: int = 1,
              tail: bool = True, marker: bytes = b"Exif\0\0") -> np.ndarray:
    """A small JPEG whose APP1 EXIF block has IFD0 at offset `ifd`, `others` entries before
    and after an Orientation entry (none when orientation is None), as cameras write them in
    either byte order; `tail=False` ends the block right after the last entry."""
    o = {"MM": "big", "II": "little"}[order]

    def entry(tag: int, kind: int, value: bytes) -> bytes:
        return tag.to_bytes(2, o) + kind.to_bytes(2, o) + (1).to_bytes(4, o) + value

    entries = [entry(0x010F, 2, (400).to_bytes(4, o))] * others  # Make, stored elsewhere
    if orientation is not None:
        entries.append(entry(0x0112, 3, orientation.to_bytes(2, o) + b"\0\0"))
    entries += [entry(0x011A, 5, (500).to_bytes(4, o))] * others  # XResolution
    tiff = (order.encode() + (42).to_bytes(2, o) + ifd.to_bytes(4, o) + b"\0" * (ifd - 8)
            + len(entries).to_bytes(2, o) + b"".join(entries) + (b"\0" * 4 if tail else b""))
    payload = marker + tiff
    ok, buf = cv2.imencode(".jpg", np.zeros((30, 40, 3), np.uint8))
    data = buf.tobytes()
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    return np.frombuffer(data[:2] + app1 + data[2:], np.uint8)


@pytest.mark.parametrize("order, ifd, orientation", [
    ("MM", 8, 6), ("II", 8, 8), ("II", 20, 3), ("MM", 26, 7), ("II", 8, 2), ("MM", 8, 1)])
def test_jpeg_header_reads_the_exif_orientation(order, ifd, orientation):
    assert jpeg_size(exif_jpeg(orientation, order, ifd)) == (40, 30)  # as stored
    assert jpeg_header(exif_jpeg(orientation, order, ifd))[:2] == ((40, 30), orientation)
    # The Orientation entry alone, and last in a block that ends right after it.
    assert jpeg_header(exif_jpeg(orientation, order, ifd, others=0, tail=False))[1] == \
        orientation


@pytest.mark.parametrize("orientation", [None, 0, 9])  # absent, or values EXIF does not define
def test_jpeg_header_without_a_usable_orientation_means_as_stored(orientation):
    assert jpeg_header(exif_jpeg(orientation))[:2] == ((40, 30), 1)
    assert jpeg_header(exif_jpeg(orientation, "II", 20))[:2] == ((40, 30), 1)


def test_read_image_turns_a_jpeg_as_its_exif_says(tmp_path):
    path = tmp_path / "sideways.jpg"
    path.write_bytes(exif_jpeg(6).tobytes())  # stored 40 x 30, shown turned by 90 degrees
    assert read_image(path).shape == (40, 30, 3)
    path.write_bytes(exif_jpeg(3).tobytes())
    assert read_image(path).shape == (30, 40, 3)


def test_jpeg_header_reads_ifd0_only():
    """The thumbnail's IFD (IFD1) may follow IFD0 with an Orientation of its own: the
    picture's is IFD0's (here absent, so 1), whatever lies beyond IFD0's entries."""
    o = "little"
    make = (0x010F).to_bytes(2, o) + (2).to_bytes(2, o) + (1).to_bytes(4, o) + b"\0" * 4
    turned = (0x0112).to_bytes(2, o) + (3).to_bytes(2, o) + (1).to_bytes(4, o) \
        + (6).to_bytes(2, o) + b"\0\0"
    ifd1 = 8 + 2 + 3 * 12 + 4 + 6  # aligned with IFD0's entries, as a careless walk reads them
    tiff = (b"II" + (42).to_bytes(2, o) + (8).to_bytes(4, o) + (3).to_bytes(2, o) + make * 3
            + ifd1.to_bytes(4, o) + b"\0" * 6 + (1).to_bytes(2, o) + turned + b"\0" * 4)
    payload = b"Exif\0\0" + tiff
    ok, buf = cv2.imencode(".jpg", np.zeros((30, 40, 3), np.uint8))
    data = buf.tobytes()
    jpeg = data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]
    assert jpeg_header(np.frombuffer(jpeg, np.uint8))[:2] == ((40, 30), 1)


def test_jpeg_header_ignores_what_is_not_an_exif_orientation():
    # A block whose byte-order mark is neither II nor MM is not read.
    odd = bytearray(exif_jpeg(6).tobytes())
    at = odd.index(b"Exif\0\0MM") + 6
    odd[at:at + 2] = b"XX"
    assert jpeg_header(np.frombuffer(bytes(odd), np.uint8))[:2] == ((40, 30), 1)
    png = np.frombuffer(b"\x89PNG\r\n\x1a\n" + b"\0" * 64, np.uint8)
    assert jpeg_header(png) is None and jpeg_size(png) is None
    # An APP1 block of another kind (XMP) holding the same bytes is not EXIF.
    xmp = exif_jpeg(6, marker=b"http://ns.adobe.com/xap/1.0/\0")
    assert jpeg_header(xmp)[:2] == ((40, 30), 1)
    # IFD0 claiming more entries than the block holds: read what is there, no crash.
    cut = bytearray(exif_jpeg(6, others=3).tobytes())
    count_at = cut.index(b"Exif\0\0") + 6 + 8  # IFD0's entry count, big-endian
    cut[count_at:count_at + 2] = (60).to_bytes(2, "big")
    assert jpeg_header(np.frombuffer(bytes(cut), np.uint8))[:2] == ((40, 30), 6)


def test_jpeg_header_walks_past_fill_bytes_standalone_markers_and_long_segments():
    """Between segments a JPEG may hold fill bytes (0xFF runs) and markers without a length
    (SOI, TEM, RST0-7); segments may be longer than 255 bytes. None of them hides the frame
    size or the orientation."""
    jpeg = exif_jpeg(6).tobytes()
    soi, rest = jpeg[:2], jpeg[2:]
    app1 = rest[:2 + int.from_bytes(rest[2:4], "big")]  # marker + its length's bytes
    comment = b"\xff\xfe" + (2 + 300).to_bytes(2, "big") + b"c" * 300  # a 300-byte COM
    odd = b"\xff\xff\xff\xd8\xff\x01\xff\xd0\xff\xd7\x00"  # fill, SOI, TEM, RST0, RST7, junk
    walked = soi + odd + app1 + odd + comment + rest[len(app1):]
    assert jpeg_header(np.frombuffer(walked, np.uint8))[:2] == ((40, 30), 6)
    # Cut before its frame header: not a size, and no exception.
    assert jpeg_header(np.frombuffer(walked[:200], np.uint8)) is None


def test_decode_turns_and_sizes_an_exif_jpeg_on_both_paths(tmp_path):
    """Stored 40 x 30, tagged 'turn 90 degrees clockwise': shown 30 wide, 40 high, whether
    decoded whole or at 1/2 size (40 / 2 = 20 >= 1.2 x 10). Pixels: test_geometry.py."""
    path = tmp_path / "sideways.jpg"
    path.write_bytes(exif_jpeg(6).tobytes())
    img, size, factor = decode(path)
    assert (img.shape[:2], size, factor) == ((40, 30), (30, 40), 1)
    img, size, factor = decode(path, 10)
    assert (img.shape[:2], size, factor) == ((20, 15), (30, 40), 2)
    path.write_bytes(exif_jpeg(1).tobytes())
    img, size, factor = decode(path, 10)
    assert (img.shape[:2], size, factor) == ((15, 20), (40, 30), 2)
    assert reduction_for((48, 30), 20) == 2  # 48 / 2 == 1.2 x 20: the boundary is inclusive


def test_decode_keeps_only_the_jpegs_a_device_decoder_takes(tmp_path):
    """keep_jpeg (the GPU-resident flow): a JPEG comes back undecoded only when nvJPEG would
    decode it as the host does (Huffman baseline/progressive, grey or colour, stored upright)
    and the host would decode it at full size; everything else is decoded here as before."""
    from retina_batch.io import EncodedJpeg

    def saved(name: str, data: bytes) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    colour = np.random.default_rng(0).integers(0, 255, (30, 40, 3), np.uint8)
    plain = saved("plain.jpg", cv2.imencode(".jpg", colour)[1].tobytes())
    grey = saved("grey.jpg", cv2.imencode(".jpg", colour[..., 0])[1].tobytes())
    progressive = saved("p.jpg", cv2.imencode(".jpg", colour,
                                             [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes())
    for path in (plain, grey, progressive):
        kept, size, factor = decode(path, keep_jpeg=True)
        assert isinstance(kept, EncodedJpeg) and size == kept.size == (40, 30) and factor == 1
        assert np.array_equal(kept.decode(), decode(path)[0])  # the host fallback: the same
        assert not isinstance(decode(path)[0], EncodedJpeg)  # only when asked for
    turned = saved("turned.jpg", exif_jpeg(6).tobytes())
    upright = saved("upright.jpg", exif_jpeg(1).tobytes())
    assert isinstance(decode(upright, keep_jpeg=True)[0], EncodedJpeg)
    image, size, _ = decode(turned, keep_jpeg=True)  # EXIF-turned: the host turns it
    assert isinstance(image, np.ndarray) and image.shape[:2] == (40, 30) and size == (30, 40)
    big = saved("big.jpg", cv2.imencode(".jpg", np.zeros((1200, 1600, 3), np.uint8))[1].tobytes())
    image, size, factor = decode(big, 512, keep_jpeg=True)  # reduced decode stays on the host
    assert isinstance(image, np.ndarray) and factor == 2 and size == (1600, 1200)
    assert isinstance(decode(big, 1400, keep_jpeg=True)[0], EncodedJpeg)  # needs full size
    png = saved("a.png", cv2.imencode(".png", colour)[1].tobytes())
    assert isinstance(decode(png, keep_jpeg=True)[0], np.ndarray)
