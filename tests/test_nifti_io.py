"""NIfTI I/O: exact affine, codes and values through round trips; bad inputs; read_volume."""

import ast
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fixtures import write_ct_series
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common import UserError, nifti_io


def oblique_affine() -> np.ndarray:
    rotation = np.array([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * [0.75, 0.8, 2.5]
    affine[:3, 3] = [-90.5, 110.25, -40.0]
    return affine.astype(np.float32).astype(np.float64)  # what a NIfTI file can hold exactly


def save(
    path: Path, data_xyz: np.ndarray, affine: np.ndarray, sform_code=2, qform_code=1, slope=None
) -> Path:
    image = nib.Nifti1Image(data_xyz, affine)
    image.set_sform(affine, code=sform_code)
    image.set_qform(affine, code=qform_code)
    if slope is not None:
        image.header.set_slope_inter(slope, -1024.0)
    nib.save(image, path)
    return path


def test_read_follows_nibabel_axes_and_round_trips_exactly(tmp_path):
    data = np.random.default_rng(0).integers(-1024, 3000, (7, 6, 5)).astype(np.int16)  # (x, y, z)
    source = save(tmp_path / "in.nii.gz", data, oblique_affine(), sform_code=2, qform_code=1)
    volume = nifti_io.read_nifti(source)
    assert volume.hu.shape == (5, 6, 7) and volume.hu.dtype == np.float32
    np.testing.assert_array_equal(volume.hu, np.asarray(nib.load(source).get_fdata()).transpose(2, 1, 0))
    np.testing.assert_array_equal(volume.affine, oblique_affine())
    assert volume.spacing_mm == pytest.approx((2.5, 0.8, 0.75))
    for name in ("out.nii.gz", "out.nii"):
        out = nifti_io.write_nifti(tmp_path / name, volume)
        again = nifti_io.read_nifti(out)
        np.testing.assert_array_equal(again.affine, volume.affine)
        np.testing.assert_array_equal(again.hu, volume.hu)
        assert again.spacing_mm == volume.spacing_mm
        header = nib.load(out).header
        assert (int(header["sform_code"]), int(header["qform_code"])) == (2, 1)
        assert header.get_data_dtype() == np.int16  # integer HU in range: stored as int16
        np.testing.assert_array_equal(header.get_qform(), nib.load(source).header.get_qform())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.nii.gz",
        "out.nii",
        "out.nii.gz",
    ]  # no temp files


def test_qform_only_file_keeps_codes_and_float_values_stay_float32(tmp_path):
    data = np.random.default_rng(1).normal(0, 100, (4, 5, 3)).astype(np.float32)
    source = save(tmp_path / "q.nii", data, oblique_affine(), sform_code=0, qform_code=1)
    volume = nifti_io.read_nifti(source)
    out = nifti_io.write_nifti(tmp_path / "out.nii", volume)
    header = nib.load(out).header
    assert (int(header["sform_code"]), int(header["qform_code"])) == (0, 1)
    assert header.get_data_dtype() == np.float32
    again = nifti_io.read_nifti(out)
    np.testing.assert_array_equal(again.affine, volume.affine)
    np.testing.assert_array_equal(again.hu, volume.hu)


def test_nifti2_stays_nifti2_and_input_is_never_overwritten(tmp_path):
    image = nib.Nifti2Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), oblique_affine())
    image.set_sform(oblique_affine(), code=2)
    nib.save(image, tmp_path / "in.nii")
    volume = nifti_io.read_nifti(tmp_path / "in.nii")
    out = nifti_io.write_nifti(tmp_path / "out.nii", volume)
    assert isinstance(nib.load(out), nib.Nifti2Image)
    np.testing.assert_array_equal(nifti_io.read_nifti(out).affine, volume.affine)
    before = (tmp_path / "in.nii").read_bytes()
    with pytest.raises(UserError, match="overwrite"):
        nifti_io.write_nifti(tmp_path / "in.nii", volume)
    assert (tmp_path / "in.nii").read_bytes() == before
    volume.hu[0, 0, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        nifti_io.write_nifti(tmp_path / "nan.nii", volume)
    assert not (tmp_path / "nan.nii").exists()


def test_scaled_input_gives_physical_values_and_writes_them_back(tmp_path):
    data = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    volume = nifti_io.read_nifti(save(tmp_path / "s.nii", data, np.eye(4), slope=2.0))
    np.testing.assert_array_equal(volume.hu, (data * 2.0 - 1024).transpose(2, 1, 0))
    again = nifti_io.read_nifti(nifti_io.write_nifti(tmp_path / "out.nii", volume))
    np.testing.assert_array_equal(again.hu, volume.hu)


def test_changed_affine_is_written_with_the_original_codes(tmp_path):
    volume = nifti_io.read_nifti(
        save(tmp_path / "in.nii", np.zeros((4, 4, 3), np.int16), oblique_affine(), 1, 1)
    )
    affine = volume.affine.copy()  # through-plane x2: half the slice spacing, origin a quarter slice back
    affine[:3, 3] -= 0.25 * affine[:3, 2]
    affine[:3, 2] *= 0.5
    fine = nifti_io.Volume(np.zeros((5, 4, 4), np.float32), affine, volume.meta)
    again = nifti_io.read_nifti(nifti_io.write_nifti(tmp_path / "fine.nii.gz", fine))
    np.testing.assert_allclose(again.affine, fine.affine, rtol=0, atol=1e-5)  # the file stores float32
    assert again.spacing_mm == pytest.approx((1.25, 0.8, 0.75), abs=1e-6)
    header = nib.load(tmp_path / "fine.nii.gz").header
    assert (int(header["sform_code"]), int(header["qform_code"])) == (1, 1)
    assert header.get_zooms() == pytest.approx((0.75, 0.8, 1.25))


def test_dicom_volume_writes_scanner_codes_and_read_volume_dispatches(tmp_path):
    hu = np.random.default_rng(2).integers(-1000, 2000, (3, 6, 5)).astype(np.float32)
    write_ct_series(hu, tmp_path / "series", (2.0, 0.5, 0.625), shuffle_names=True)
    volume = nifti_io.read_volume(tmp_path / "series")
    np.testing.assert_array_equal(volume.hu, hu)
    out = nifti_io.write_nifti(tmp_path / "ct.nii.gz", volume)
    header = nib.load(out).header
    assert (int(header["sform_code"]), int(header["qform_code"])) == (1, 1)
    again = nifti_io.read_volume(out)
    np.testing.assert_array_equal(again.hu, hu)
    np.testing.assert_allclose(again.affine, volume.affine, atol=1e-5)
    assert np.sign(again.affine[0, 0]) == -1  # LPS x (to the patient's left) is RAS -x
    with pytest.raises(UserError, match="no such file"):
        nifti_io.read_volume(tmp_path / "missing.nii.gz")
    with pytest.raises(UserError, match="expected a .nii"):
        nifti_io.read_volume(next((tmp_path / "series").iterdir()))


def test_four_d_singleton_is_accepted(tmp_path):
    data = np.ones((3, 4, 5, 1), np.int16)
    volume = nifti_io.read_nifti(save(tmp_path / "t.nii", data, np.eye(4)))
    assert volume.hu.shape == (5, 4, 3)


def test_bad_inputs_raise_one_line_user_error(tmp_path):
    nan = np.zeros((3, 3, 3), np.float32)
    nan[1, 1, 1] = np.nan
    inf = np.zeros((3, 3, 3), np.float32)
    inf[0, 0, 0] = np.inf
    (tmp_path / "text.nii").write_text("this is not an image")
    truncated = save(tmp_path / "full.nii", np.zeros((8, 8, 8), np.int16), np.eye(4))
    (tmp_path / "truncated.nii").write_bytes(truncated.read_bytes()[:600])
    cases = {
        save(tmp_path / "nan.nii", nan, np.eye(4)): "NaN/Inf",
        save(tmp_path / "inf.nii.gz", inf, np.eye(4)): "NaN/Inf",
        save(tmp_path / "4d.nii", np.zeros((3, 3, 3, 2), np.int16), np.eye(4)): "3-D",
        save(tmp_path / "2d.nii", np.zeros((3, 3), np.int16), np.eye(4)): "3-D",
        tmp_path / "text.nii": "unreadable",
        tmp_path / "truncated.nii": "unreadable",
    }
    for path, word in cases.items():
        with pytest.raises(UserError) as err:
            nifti_io.read_nifti(path)
        assert str(path) in str(err.value) and word in str(err.value) and "\n" not in str(err.value), path


finite = st.floats(-3000, 3000, allow_nan=False, width=32)


@settings(max_examples=25, deadline=None)
@given(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=5), elements=finite),
    st.tuples(*[st.floats(0.125, 5.0, width=32)] * 3),
    st.tuples(*[st.floats(-200, 200, width=32)] * 3),
    st.booleans(),
)
def test_any_volume_and_affine_round_trip(hu, spacing, origin, integer):
    hu = np.rint(hu) if integer else hu
    affine = np.diag([*spacing, 1.0]).astype(np.float64)
    affine[:3, 3] = origin
    source = nifti_io.Volume(hu, affine, {})
    with tempfile.TemporaryDirectory() as tmp:
        first = nifti_io.read_nifti(nifti_io.write_nifti(Path(tmp) / "a.nii.gz", source))
        second = nifti_io.read_nifti(nifti_io.write_nifti(Path(tmp) / "b.nii.gz", first))
        on_disk = nib.load(Path(tmp) / "a.nii.gz").get_data_dtype()
    np.testing.assert_array_equal(first.hu, hu)
    np.testing.assert_array_equal(first.affine, affine)  # float32-representable values are stored exactly
    np.testing.assert_array_equal(second.affine, first.affine)
    assert on_disk == (np.int16 if np.array_equal(hu, np.rint(hu)) else np.float32)


def test_io_modules_import_without_torch(root):
    """Reading and writing images needs no deep-learning stack: with torch blocked, the I/O modules (and the
    metrics and panels a report uses) still import, and one of them is not imported by the other's reader."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import common.dicom_io, common.nifti_io, common.files, common.metrics, common.viz\n"
        "assert 'common.runtime' not in sys.modules, 'runtime (torch) was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _common_imports(path: Path) -> set[str]:
    """The common.* modules a file imports, anywhere in it (a function-level import is still a cycle)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "common":
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("common."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("common.")}
    return names


def test_common_has_no_import_cycle(root):
    graph = {
        p.stem: _common_imports(p) & {q.stem for q in (root / "common").glob("*.py")}
        for p in (root / "common").glob("*.py")
    }

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(
            n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph.get(start, ())
        )

    cycles = sorted(m for m in graph if reaches(m, m, {m}))
    assert not cycles, f"import cycles through {cycles}: {graph}"
    assert "nifti_io" not in graph["dicom_io"]
