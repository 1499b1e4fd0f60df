"""DICOM I/O: physical values, bad inputs, derived files (checked with dciodvfy/dcmdump), series geometry."""

import hashlib
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fixtures import make_ct_dataset, make_projection_dataset, write_ct_series
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from pydicom.uid import ExplicitVRLittleEndian

from common import UserError, dicom_io, nifti_io

needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None or shutil.which("dcmdump") is None,
    reason="dciodvfy/dcmdump not on PATH (apt-get install -y dcmtk dicom3tools)",
)


def real(name: str) -> Path:
    """A real file from pydicom's test data or the pydicom-data package (never downloaded)."""
    return Path(get_testdata_file(name, download=False))


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dciodvfy_errors(path: Path) -> set[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, timeout=60)
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    return {line.strip() for line in text.splitlines() if line.startswith("Error")}


def assert_valid_dicom(path: Path, allowed_errors: set[str] = frozenset()) -> None:
    new_errors = dciodvfy_errors(path) - set(allowed_errors)
    assert not new_errors, f"dciodvfy errors in {path.name}: {sorted(new_errors)}"
    dump = subprocess.run(["dcmdump", str(path)], capture_output=True, timeout=60)
    assert dump.returncode == 0, dump.stderr.decode(errors="replace")


def ct_hu(shape=(24, 20), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 3000, shape).astype(np.float32)


# --- fixtures and reading ---


def test_ct_fixture_round_trips_exact_hu_with_realistic_header(tmp_path):
    hu = ct_hu()
    ds = make_ct_dataset(hu, pixel_spacing_mm=(0.6, 0.8), position_mm=(1, 2, 3), patient_id="P7")
    path = dicom_io.write_dataset(ds, tmp_path / "ct.dcm")
    values, back = dicom_io.read_dicom(path)
    assert values.dtype == np.float32 and values.shape == hu.shape
    np.testing.assert_array_equal(values, hu)
    assert back.SOPClassUID == pydicom.uid.CTImageStorage and back.Modality == "CT" and back.PatientID == "P7"
    assert (back.PixelRepresentation, float(back.RescaleSlope), float(back.RescaleIntercept)) == (
        1,
        1.0,
        -1024.0,
    )
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert dicom_io.pixel_spacing_mm(back) == (0.6, 0.8)


@needs_dciodvfy
def test_fixture_writers_pass_dciodvfy(tmp_path):
    stored = np.random.default_rng(1).integers(0, 1 << 14, (40, 30)).astype(np.uint16)
    paths = [
        dicom_io.write_dataset(make_ct_dataset(ct_hu()), tmp_path / "ct.dcm"),
        dicom_io.write_dataset(make_projection_dataset(stored), tmp_path / "mg.dcm"),
        dicom_io.write_dataset(
            make_projection_dataset(stored, modality="DX", monochrome1=True), tmp_path / "dx.dcm"
        ),
        *write_ct_series(np.stack([ct_hu(seed=s) for s in range(2)]), tmp_path / "series", (2.0, 0.7, 0.7)),
    ]
    for path in paths:
        assert_valid_dicom(path)
    assert pydicom.dcmread(paths[1]).SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2"


def test_bits_stored_masks_high_bits_and_sign_extends(tmp_path):
    # Bits above BitsStored hold garbage (as overlays did in old files); they must not change the value.
    stored_12bit = np.array([[-5, 0, 2047, -2048]], dtype=np.int64)
    garbage = np.array([[0xA, 0x5, 0xF, 0x1]], dtype=np.int64) << 12
    raw = ((stored_12bit & 0xFFF) | garbage).astype(np.uint16)
    for signed, expected in ((1, stored_12bit), (0, stored_12bit & 0xFFF)):
        ds = make_ct_dataset(np.zeros((1, 4)))
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = signed, 12, 11
        ds.RescaleSlope, ds.RescaleIntercept = 2, -10
        ds.PixelData = raw.astype("<u2").tobytes()
        values, _ = dicom_io.read_dicom(dicom_io.write_dataset(ds, tmp_path / f"s{signed}.dcm"))
        np.testing.assert_array_equal(values, expected * 2.0 - 10)


def test_monochrome1_is_never_inverted_and_is_copied(tmp_path):
    stored = np.random.default_rng(2).integers(0, 1 << 12, (16, 12)).astype(np.uint16)
    ds = make_projection_dataset(stored, modality="DX", bits_stored=12, monochrome1=True)
    values, template = dicom_io.read_dicom(dicom_io.write_dataset(ds, tmp_path / "in.dcm"))
    np.testing.assert_array_equal(values, stored)
    out = dicom_io.write_derived_dicom(template, values, tmp_path / "out.dcm", description="identity")
    again, derived = dicom_io.read_dicom(out)
    np.testing.assert_array_equal(again, stored)
    assert derived.PhotometricInterpretation == "MONOCHROME1" and derived.PresentationLUTShape == "INVERSE"


def test_real_monochrome1_cr_and_invalid_zero_spacing():
    values, ds = dicom_io.read_dicom(real("RG1_UNCI.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and values.shape == (1955, 1841)
    np.testing.assert_array_equal(values, ds.pixel_array)  # no inversion, no rescale in this file
    assert dicom_io.pixel_spacing_mm(ds) is None  # PixelSpacing 0.000\0.000 is invalid: never invented
    assert dicom_io.stored_range(ds) == (0.0, 32767.0)


def test_modality_lut_gives_its_output_values():
    values, ds = dicom_io.read_dicom(real("mlut_18.dcm"))
    lut = ds.ModalityLUTSequence[0]
    first, bits = int(lut.LUTDescriptor[1]), int(lut.LUTDescriptor[2])
    table = np.frombuffer(lut.LUTData, "<u2") if isinstance(lut.LUTData, bytes) else np.asarray(lut.LUTData)
    stored = ds.pixel_array.astype(np.int64)
    np.testing.assert_array_equal(values, table[np.clip(stored - first, 0, len(table) - 1)])
    assert bits == 16 and values.max() > stored.max()  # not the stored values


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = dicom_io.write_dataset(make_ct_dataset(ct_hu((64, 64))), tmp_path / "good.dcm")
    raw = good.read_bytes()
    cases = {"truncated": (raw[: len(raw) - 3000], "truncated"), "header_only": (raw[:200], "")}
    files = {name: (tmp_path / f"{name}.dcm", word) for name, (_, word) in cases.items()}
    for name, (data, _) in cases.items():
        files[name][0].write_bytes(data)
    (tmp_path / "notes.dcm").write_text("not an image\n")
    files["not_dicom"] = (tmp_path / "notes.dcm", "not a DICOM")
    ds = pydicom.dcmread(good)
    del ds.PixelData
    files["no_pixels"] = (dicom_io.write_dataset(ds, tmp_path / "no_pixels.dcm"), "no PixelData")
    ds = pydicom.dcmread(good)
    ds.RescaleSlope = "1e308"  # finite in the header, overflows float32 physical values
    files["inf"] = (dicom_io.write_dataset(ds, tmp_path / "inf.dcm"), "NaN/Inf")
    files["rgb"] = (real("SC_rgb.dcm"), "RGB")
    files["ybr"] = (real("SC_ybr_full_uncompressed.dcm"), "YBR_FULL")
    files["palette"] = (real("OBXXXX1A.dcm"), "PALETTE")
    files["multiframe"] = (real("emri_small.dcm"), "multi-frame")
    return files


def test_bad_inputs_raise_one_line_user_error_naming_the_file(tmp_path):
    for name, (path, word) in _bad_files(tmp_path).items():
        with pytest.raises(UserError) as err:
            dicom_io.read_dicom(path)
        message = str(err.value)
        assert "\n" not in message and str(path) in message and word in message, (name, message)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=6))
def test_corrupted_bytes_only_ever_raise_user_error(edits):
    with tempfile.TemporaryDirectory() as tmp:
        path = dicom_io.write_dataset(make_ct_dataset(ct_hu((16, 16))), Path(tmp) / "ct.dcm")
        raw = bytearray(path.read_bytes())
        for offset, byte in edits:
            raw[offset % len(raw)] = byte
        path.write_bytes(bytes(raw))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about odd values; only exceptions matter here
            try:
                values, _ = dicom_io.read_dicom(path)
            except UserError as e:
                assert "\n" not in str(e)
            else:
                assert np.isfinite(values).all()


def test_compressed_syntax_decodes_with_decoder():
    lossless, _ = dicom_io.read_dicom(real("693_J2KR.dcm"))
    uncompressed, ds = dicom_io.read_dicom(real("693_UNCR.dcm"))
    np.testing.assert_array_equal(lossless, uncompressed)
    assert ds.BitsStored == 14 and ds.PixelRepresentation == 1


def test_compressed_syntax_without_decoder_names_the_packages(monkeypatch):
    path = real("693_J2KR.dcm")
    decoder = get_decoder(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    monkeypatch.setattr(
        decoder, "_available", {}
    )  # as if neither pylibjpeg nor pillow/openjpeg were installed
    with pytest.raises(UserError, match="pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg") as err:
        dicom_io.read_dicom(path)
    assert str(path) in str(err.value) and "JPEG 2000" in str(err.value)


def test_stored_range_padding_mask_and_spacing():
    values, ds = dicom_io.read_dicom(real("693_UNCI.dcm"))
    assert dicom_io.stored_range(ds) == (-8192 - 1024.0, 8191 - 1024.0)  # 14-bit signed, intercept -1024
    mask = dicom_io.padding_mask(values, ds)
    np.testing.assert_array_equal(mask, ds.pixel_array == -2000)
    assert 0 < mask.sum() < mask.size
    ds.PixelPaddingRangeLimit = -1990
    np.testing.assert_array_equal(
        dicom_io.padding_mask(values, ds), (ds.pixel_array >= -2000) & (ds.pixel_array <= -1990)
    )
    assert dicom_io.pixel_spacing_mm(ds) == (0.478516, 0.478516)
    mg = make_projection_dataset(np.zeros((4, 4), np.uint16), imager_pixel_spacing_mm=(0.05, 0.06))
    assert (
        dicom_io.pixel_spacing_mm(mg) == (0.05, 0.06) and dicom_io.padding_mask(np.zeros((4, 4)), mg) is None
    )
    assert dicom_io.stored_range(mg) == (0.0, 16383.0)
    del mg.ImagerPixelSpacing
    assert dicom_io.pixel_spacing_mm(mg) is None


# --- derived files ---

REAL_FILES = [
    *("CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm"),
    *("693_UNCI.dcm", "693_J2KR.dcm", "MR2_UNCI.dcm", "RG1_UNCI.dcm", "mlut_18.dcm"),
]


@pytest.mark.parametrize("name", REAL_FILES)
def test_derived_round_trip_on_real_files(tmp_path, name):
    source = real(name)
    before = sha(source)
    values, template = dicom_io.read_dicom(source)
    out = dicom_io.write_derived_dicom(template, values, tmp_path / "out.dcm", description="round trip test")
    again, derived = dicom_io.read_dicom(out)
    np.testing.assert_array_equal(again, values)  # exact: every file here has integer stored values
    assert derived.PatientID == template.PatientID and derived.StudyInstanceUID == template.StudyInstanceUID
    assert derived.SOPInstanceUID != template.SOPInstanceUID
    assert derived.SeriesInstanceUID != template.SeriesInstanceUID
    assert list(derived.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert derived.DerivationDescription == "round trip test"
    assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == template.SOPInstanceUID
    assert derived.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert derived.file_meta.MediaStorageSOPInstanceUID == derived.SOPInstanceUID
    assert derived.PhotometricInterpretation == template.PhotometricInterpretation
    assert derived.HighBit == derived.BitsStored - 1 and derived.BitsAllocated == 16
    assert "LargestImagePixelValue" not in derived and "SmallestImagePixelValue" not in derived
    assert sha(source) == before
    if shutil.which("dciodvfy") and shutil.which("dcmdump"):
        assert_valid_dicom(out, allowed_errors=dciodvfy_errors(source))


def test_derived_from_raw_file_equals_derived_from_array(tmp_path):
    """A RawImage (float32 rows in a file, for outputs too big to hold) encodes exactly like the array, with
    600 rows so the 256-row blocks meet a partial one; no temporary file left beside the output; NaN fails."""
    values = np.random.default_rng(5).normal(40, 300, size=(600, 70)).astype(np.float32)
    template = make_ct_dataset(np.zeros((8, 8)))
    from_array = dicom_io.write_derived_dicom(template, values, tmp_path / "array" / "a.dcm", description="a")
    with tempfile.TemporaryFile() as f:
        f.write(values.astype("<f4").tobytes())
        raw = dicom_io.RawImage(f, values.shape)
        np.testing.assert_array_equal(raw.rows(255, 513), values[255:513])
        from_raw = dicom_io.write_derived_dicom(template, raw, tmp_path / "raw" / "r.dcm", description="a")
        values[599, 3] = np.nan
        f.seek(0)
        f.write(values.astype("<f4").tobytes())
        with pytest.raises(UserError, match="NaN/Inf; nothing written"):
            dicom_io.write_derived_dicom(template, raw, tmp_path / "raw" / "nan.dcm", description="a")
    a, b = pydicom.dcmread(from_array), pydicom.dcmread(from_raw)
    assert a.PixelData == b.PixelData and (a.RescaleSlope, a.RescaleIntercept) == (
        b.RescaleSlope,
        b.RescaleIntercept,
    )
    half_step = float(a.RescaleSlope) / 2 + 1e-3
    np.testing.assert_allclose(dicom_io.read_dicom(from_raw)[0][:599], values[:599], atol=half_step)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["r.dcm"]


@pytest.mark.parametrize("name", ["CT_small.dcm", "RG1_UNCI.dcm"])
def test_derived_x2_resample_updates_geometry(tmp_path, name):
    values, template = dicom_io.read_dicom(real(name))
    upsampled = np.kron(values, np.ones((2, 2), np.float32))
    out = dicom_io.write_derived_dicom(
        template, upsampled, tmp_path / "x2.dcm", description="x2 nearest", spacing_scale=(0.5, 0.5)
    )
    again, derived = dicom_io.read_dicom(out)
    np.testing.assert_array_equal(again, upsampled)
    assert (derived.Rows, derived.Columns) == (2 * template.Rows, 2 * template.Columns)
    old = dicom_io.pixel_spacing_mm(template)
    if old is None:  # the CR's 0.000 spacing stays invalid rather than becoming a made-up number
        assert dicom_io.pixel_spacing_mm(derived) is None
    else:
        np.testing.assert_allclose(dicom_io.pixel_spacing_mm(derived), np.array(old) / 2)
    if shutil.which("dciodvfy") and shutil.which("dcmdump"):
        assert_valid_dicom(out, allowed_errors=dciodvfy_errors(real(name)))


def test_derived_projection_updates_imager_pixel_spacing_and_clips_to_fixed_rescale(tmp_path):
    stored = np.random.default_rng(3).integers(0, 1 << 14, (20, 16)).astype(np.uint16)
    template = make_projection_dataset(stored, imager_pixel_spacing_mm=(0.1, 0.1))
    values = np.kron(stored.astype(np.float64), np.ones((2, 2)))
    values[0, 0], values[0, 1] = (
        -50.0,
        70000.0,
    )  # outside any unsigned 16-bit range: the MG IOD fixes the rescale
    out = dicom_io.write_derived_dicom(
        template, values, tmp_path / "mg.dcm", description="x2", spacing_scale=(0.5, 0.5)
    )
    again, derived = dicom_io.read_dicom(out)
    assert dicom_io.pixel_spacing_mm(derived) == (0.05, 0.05) and "PixelSpacing" not in derived
    assert (float(derived.RescaleSlope), float(derived.RescaleIntercept)) == (1.0, 0.0)
    assert again[0, 0] == 0 and again[0, 1] == 65535
    np.testing.assert_array_equal(again[1:], values[1:])
    if shutil.which("dciodvfy") and shutil.which("dcmdump"):
        assert_valid_dicom(out)


def test_derived_rescales_when_values_do_not_fit_and_drops_stale_padding(tmp_path):
    values, template = dicom_io.read_dicom(real("693_UNCI.dcm"))
    assert "PixelPaddingValue" in template
    kept = dicom_io.write_derived_dicom(template, values, tmp_path / "kept.dcm", description="same range")
    assert pydicom.dcmread(kept).PixelPaddingValue == -2000  # still valid: same slope/intercept and range
    wide = values.astype(np.float64) * 37.3 + 0.123  # range ~ 215,000: needs a new slope
    out = dicom_io.write_derived_dicom(template, wide, tmp_path / "wide.dcm", description="wide")
    again, derived = dicom_io.read_dicom(out)
    slope = float(derived.RescaleSlope)
    assert slope > 1 and "PixelPaddingValue" not in derived
    assert np.abs(again - wide).max() <= 0.5 * slope + 1e-6 * np.abs(wide).max()


def test_derived_refuses_to_overwrite_input_and_is_atomic(tmp_path, monkeypatch):
    source = dicom_io.write_dataset(make_ct_dataset(ct_hu()), tmp_path / "in.dcm")
    before = sha(source)
    values, template = dicom_io.read_dicom(source)
    with pytest.raises(UserError, match="overwrite"):
        dicom_io.write_derived_dicom(template, values, source, description="x")
    assert sha(source) == before

    def broken_save(self, *args, **kwargs):
        Path(args[0]).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pydicom.Dataset, "save_as", broken_save)
    with pytest.raises(OSError):
        dicom_io.write_derived_dicom(template, values, tmp_path / "out.dcm", description="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.dcm"]  # no output, no temp file left


def test_derived_refuses_non_finite_values(tmp_path):
    _, template = dicom_io.read_dicom(real("CT_small.dcm"))
    values = np.zeros((8, 8))
    values[2, 3] = np.nan
    with pytest.raises(UserError, match="NaN"):
        dicom_io.write_derived_dicom(template, values, tmp_path / "out.dcm", description="x")
    assert not (tmp_path / "out.dcm").exists()


_template = make_ct_dataset(np.zeros((2, 2)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hnp.arrays(np.int16, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6)))
def test_any_int16_hu_round_trips_exactly(hu):
    with tempfile.TemporaryDirectory() as tmp:
        out = dicom_io.write_derived_dicom(_template, hu, Path(tmp) / "x.dcm", description="property")
        values, _ = dicom_io.read_dicom(out)
    np.testing.assert_array_equal(values, hu.astype(np.float32))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
        elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    )
)
def test_any_float_array_round_trips_within_half_a_stored_unit(values):
    with tempfile.TemporaryDirectory() as tmp:
        out = dicom_io.write_derived_dicom(_template, values, Path(tmp) / "x.dcm", description="property")
        again, ds = dicom_io.read_dicom(out)
    float32_error = np.abs(values) * 2.0**-23  # read_dicom returns float32
    assert (np.abs(again - values) <= 0.5 * float(ds.RescaleSlope) + float32_error + 1e-9).all()


# --- series ---


def test_series_is_sorted_by_position_not_name_with_ras_affine(tmp_path):
    hu = np.stack([ct_hu((6, 5), seed=s) for s in range(5)])
    paths = write_ct_series(hu, tmp_path, (2.5, 0.6, 0.8), shuffle_names=True)
    assert [p.name for p in paths] != sorted(p.name for p in paths)
    (tmp_path / "README.txt").write_text("not DICOM, ignored")
    volume = dicom_io.read_dicom_series(tmp_path)
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.spacing_mm == pytest.approx((2.5, 0.6, 0.8))
    first = np.array([float(v) for v in pydicom.dcmread(paths[0]).ImagePositionPatient])
    expected = np.diag([-0.8, -0.6, 2.5, 1.0])
    expected[:3, 3] = first * [-1, -1, 1]  # LPS -> RAS
    np.testing.assert_allclose(volume.affine, expected, atol=1e-9)
    assert len(volume.meta["datasets"]) == 5 and all("PixelData" not in d for d in volume.meta["datasets"])
    assert [int(d.InstanceNumber) for d in volume.meta["datasets"]] == [1, 2, 3, 4, 5]


def _oblique_series(
    folder: Path, positions_along: list[float], thickness=3.0, tilt=0.0
) -> tuple[np.ndarray, list]:
    angle = np.deg2rad(20)
    row, col = (
        np.array([np.cos(angle), np.sin(angle), 0.0]),
        np.array([0.0, 0.0, -1.0]),
    )  # sagittal-ish oblique
    normal = np.cross(row, col)
    hu = np.stack([ct_hu((4, 7), seed=i) for i in range(len(positions_along))])
    study, series, positions = pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), []
    for i, along in enumerate(positions_along):
        position = np.array([10.0, -20.0, 30.0]) + along * normal + along * tilt * col  # tilt: gantry shear
        ds = make_ct_dataset(
            hu[i],
            pixel_spacing_mm=(0.9, 0.7),
            slice_thickness_mm=thickness,
            study_uid=study,
            series_uid=series,
        )
        ds.ImageOrientationPatient = [*row, *col]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        dicom_io.write_dataset(ds, folder / f"{len(positions_along) - i:03d}.dcm")
        positions.append(position)
    return hu, positions


def test_oblique_series_affine_matches_dicom_geometry_and_simpleitk(tmp_path):
    hu, positions = _oblique_series(tmp_path, [0.0, 2.0, 4.0, 6.0], thickness=3.0)
    volume = dicom_io.read_dicom_series(tmp_path)
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.spacing_mm == pytest.approx((2.0, 0.9, 0.7))  # spacing from positions, not SliceThickness 3
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    for k, position in enumerate(positions):
        np.testing.assert_allclose(lps @ [0, 0, k, 1], [*position, 1], atol=1e-5)
    # DICOM: P(row r, col c) = IPP + c * col_spacing * row_cosine + r * row_spacing * col_cosine.
    expected = (
        positions[0]
        + 3 * 0.7 * np.array([np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20)), 0])
        + 2 * 0.9 * np.array([0, 0, -1.0])
    )
    np.testing.assert_allclose((lps @ [3, 2, 0, 1])[:3], expected, atol=1e-5)
    sitk = pytest.importorskip("SimpleITK")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    np.testing.assert_allclose(image.GetOrigin(), lps[:3, 3], atol=1e-4)
    np.testing.assert_allclose(
        np.array(image.GetDirection()).reshape(3, 3) * image.GetSpacing(), lps[:3, :3], atol=1e-4
    )


def test_gantry_tilted_series_keeps_every_slice_position(tmp_path):
    hu, positions = _oblique_series(tmp_path, [0.0, 1.5, 3.0], tilt=0.2)
    volume = dicom_io.read_dicom_series(tmp_path)
    np.testing.assert_array_equal(volume.hu, hu)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    for k, position in enumerate(positions):
        np.testing.assert_allclose((lps @ [0, 0, k, 1])[:3], position, atol=1e-5)
    assert volume.spacing_mm[0] == pytest.approx(1.5 * np.hypot(1.0, 0.2))


def test_series_refuses_mixed_series_and_duplicates(tmp_path):
    hu = np.stack([ct_hu((4, 4), seed=s) for s in range(2)])
    write_ct_series(hu, tmp_path / "a", (1.0, 0.7, 0.7))
    write_ct_series(hu, tmp_path / "b", (1.0, 0.7, 0.7))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    uids = set()
    for sub in ("a", "b"):
        for f in (tmp_path / sub).iterdir():
            uids.add(str(pydicom.dcmread(f).SeriesInstanceUID))
            shutil.copy(f, mixed / f"{sub}_{f.name}")
    with pytest.raises(UserError) as err:
        dicom_io.read_dicom_series(mixed)
    assert (
        "2 series" in str(err.value)
        and all(uid in str(err.value) for uid in uids)
        and "\n" not in str(err.value)
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no DICOM images"):
        dicom_io.read_dicom_series(tmp_path / "empty")
    with pytest.raises(UserError, match="not a folder"):
        dicom_io.read_dicom_series(next((tmp_path / "a").iterdir()))
    (tmp_path / "repeated").mkdir()
    _oblique_series(tmp_path / "repeated", [0.0, 2.0, 2.0])
    with pytest.raises(UserError, match="share a position"):
        dicom_io.read_dicom_series(tmp_path / "repeated")


def test_series_warns_on_uneven_gaps(tmp_path):
    _oblique_series(tmp_path, [0.0, 2.0, 4.0, 7.0])
    with pytest.warns(UserWarning, match="uneven slice gaps"):
        volume = dicom_io.read_dicom_series(tmp_path)
    assert volume.hu.shape[0] == 4


def test_write_dicom_series_round_trip_and_z_upsampled(tmp_path):
    hu = np.stack([ct_hu((6, 5), seed=s) for s in range(4)])
    write_ct_series(hu, tmp_path / "in", (2.0, 0.6, 0.8), shuffle_names=True)
    volume = dicom_io.read_dicom_series(tmp_path / "in")
    paths = dicom_io.write_dicom_series(volume, volume.meta["datasets"], tmp_path / "out", description="copy")
    again = dicom_io.read_dicom_series(tmp_path / "out")
    np.testing.assert_array_equal(again.hu, hu)
    np.testing.assert_allclose(again.affine, volume.affine, atol=1e-6)
    derived = [pydicom.dcmread(p) for p in paths]
    assert len({d.SeriesInstanceUID for d in derived}) == 1
    assert derived[0].SeriesInstanceUID != volume.meta["datasets"][0].SeriesInstanceUID
    assert derived[0].StudyInstanceUID == volume.meta["datasets"][0].StudyInstanceUID
    # Through-plane x2: 7 slices at half the spacing, same first slice; templates are reused.
    affine = volume.affine @ np.diag([1.0, 1.0, 0.5, 1.0])  # the slice axis (k) at half the spacing
    fine = nifti_io.Volume(np.repeat(hu, 2, axis=0)[:7], affine, {})
    dicom_io.write_dicom_series(fine, volume.meta["datasets"], tmp_path / "fine", description="z x2")
    back = dicom_io.read_dicom_series(tmp_path / "fine")
    assert back.spacing_mm == pytest.approx((1.0, 0.6, 0.8)) and back.hu.shape == (7, 6, 5)
    np.testing.assert_allclose(back.affine, fine.affine, atol=1e-6)
    first = pydicom.dcmread(tmp_path / "fine" / "0001.dcm")
    assert float(first.SliceThickness) == 1.0 and float(first.SpacingBetweenSlices) == 1.0
    if shutil.which("dciodvfy") and shutil.which("dcmdump"):
        assert_valid_dicom(tmp_path / "fine" / "0004.dcm")


# --- anonymised sources: empty type-1 identifiers ---


def _anonymised_series(
    folder: Path, name: str, n: int = 3, modality: str | None = None, keep_meta=False
) -> Path:
    """`n` slices of a real file, as an anonymiser leaves them: SOPClassUID and the Study/Series/SOP Instance
    UIDs empty, FrameOfReferenceUID removed (and, unless `keep_meta`, the file meta's class emptied too)."""
    folder.mkdir(parents=True)
    for k in range(n):
        ds = pydicom.dcmread(real(name))
        ds.SOPClassUID = ds.SOPInstanceUID = ds.StudyInstanceUID = ds.SeriesInstanceUID = ""
        ds.pop("FrameOfReferenceUID", None)
        if not keep_meta:
            ds.file_meta.MediaStorageSOPClassUID = ds.file_meta.MediaStorageSOPInstanceUID = ""
        if modality is not None:
            ds.Modality = modality
        ds.ImagePositionPatient = [0, 0, 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = k + 1
        ds.save_as(folder / f"slice{k}.dcm")
    return folder


@pytest.mark.parametrize(
    "name, modality, keep_meta, sop_class",
    [
        ("CT_small.dcm", None, False, "CT Image Storage"),
        ("CT_small.dcm", None, True, "CT Image Storage"),
        ("MR_small.dcm", None, False, "MR Image Storage"),
        ("CT_small.dcm", "", False, "Secondary Capture Image Storage"),
    ],
)
def test_derived_from_source_with_empty_uids(tmp_path, name, modality, keep_meta, sop_class):
    source = _anonymised_series(tmp_path / "in", name, modality=modality, keep_meta=keep_meta)
    volume = dicom_io.read_dicom_series(source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = dicom_io.write_dicom_series(
            volume, volume.meta["datasets"], tmp_path / "out", description="x"
        )
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "\n" not in messages[0], messages  # one line for the series, not per slice
    assert str(source) in messages[0] and "SOPClassUID" in messages[0] and "StudyInstanceUID" in messages[0]
    assert ("file meta" in messages[0]) == keep_meta
    derived = [pydicom.dcmread(p) for p in paths]
    assert {d.SOPClassUID.name for d in derived} == {sop_class}
    assert {d.file_meta.MediaStorageSOPClassUID for d in derived} == {derived[0].SOPClassUID}
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "SeriesInstanceUID"):
        uids = {str(d[keyword].value) for d in derived}
        assert len(uids) == 1 and pydicom.uid.UID(uids.pop()).is_valid, keyword
    assert len({d.SOPInstanceUID for d in derived}) == len(paths)
    assert "SourceImageSequence" not in derived[0]  # nothing to reference: the source has no instance UID
    np.testing.assert_array_equal(dicom_io.read_dicom_series(tmp_path / "out").hu, volume.hu)
    if shutil.which("dciodvfy") and shutil.which("dcmdump"):
        for path in paths:
            assert_valid_dicom(path, allowed_errors=dciodvfy_errors(real(name)))


def test_slice_by_slice_derived_files_share_one_generated_study(tmp_path):
    """The scripts write a series one write_derived_dicom call per slice: the generated Study and Frame of
    Reference must still be one per source series, and differ between two series."""
    studies = []
    for series in ("a", "b"):
        source = _anonymised_series(tmp_path / series, "CT_small.dcm")
        derived, series_uid = [], pydicom.uid.generate_uid()
        with pytest.warns(UserWarning, match="empty or missing identifiers"):
            for k, path in enumerate(sorted(source.iterdir())):
                values, template = dicom_io.read_dicom(path)
                out = tmp_path / f"out_{series}" / f"{k}.dcm"
                dicom_io.write_derived_dicom(template, values, out, description="x", series_uid=series_uid)
                derived.append(pydicom.dcmread(out))
        assert len({(d.StudyInstanceUID, d.FrameOfReferenceUID) for d in derived}) == 1
        studies.append(derived[0].StudyInstanceUID)
    assert studies[0] != studies[1]
