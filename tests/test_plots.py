"""Tests for tfcal.plots: the files are valid PNGs of the stated size and the data is right."""

import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="plots need the [plots] extra (matplotlib)")
PIL = pytest.importorskip("PIL.Image", reason="pillow is needed to read the PNG back")

from tfcal import metrics, plots, thresholds  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def _matplotlib_started(tmp_path_factory):
    """Pays matplotlib's one-off start-up (font cache) once, outside the timed tests."""
    plots.plot_threshold_curves([0.5], [1.0], [1.0], tmp_path_factory.mktemp("warm") / "w.png")


def _check_png(path, size):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with PIL.open(path) as im:
        im.verify()
    with PIL.open(path) as im:
        assert im.format == "PNG" and im.size == size


def test_reliability_diagram(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.random(400)
    y = (rng.random(400) < p ** 2).astype(int)
    after = p ** 2
    out = plots.plot_reliability_diagram(p, y, tmp_path / "sub" / "rel.png", probs_after=after,
                                         num_bins=5, title="test")
    _check_png(out["path"], out["size"])
    assert out["size"] == (640, 640)
    ref = metrics.reliability_curve(p, y, num_bins=5)
    np.testing.assert_array_equal(out["before"].count, ref.count)
    np.testing.assert_allclose(out["before"].accuracy, ref.accuracy)
    assert out["before"].count.sum() == 400 and out["after"].count.sum() == 400
    assert out["ece_before"] == pytest.approx(metrics.expected_calibration_error(p, y, num_bins=5))
    assert out["ece_after"] < out["ece_before"]  # labels were drawn from p**2
    # no temporary files left next to the PNG
    assert [f.name for f in (tmp_path / "sub").iterdir()] == ["rel.png"]


def test_reliability_diagram_before_only(tmp_path):
    out = plots.plot_reliability_diagram([0.1, 0.9], [0, 1], tmp_path / "r.png")
    _check_png(out["path"], out["size"])
    assert out["after"] is None and out["ece_after"] is None


def test_threshold_curves_marks_chosen_point(tmp_path):
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, 1, 0, 1, 0])
    curve = thresholds.precision_recall_at_thresholds(scores, labels)
    chosen = thresholds.select_threshold(scores, labels, "f1")
    out = plots.plot_threshold_curves(curve.thresholds, curve.precision, curve.recall,
                                      tmp_path / "pr.png", chosen=chosen)
    _check_png(out["path"], out["size"])
    assert out["size"] == (640, 480)
    np.testing.assert_allclose(out["threshold"], scores[::-1])  # plotted ascending
    np.testing.assert_allclose(out["f1"], [6 / 8, 6 / 7, 4 / 6, 4 / 5, 2 / 4])
    assert out["chosen"] == pytest.approx({"threshold": 0.6, "precision": 0.75, "recall": 1.0,
                                           "f1": 6 / 7})
    # a bare float marks the nearest curve point
    out = plots.plot_threshold_curves(curve.thresholds, curve.precision, curve.recall,
                                      tmp_path / "pr2.png", chosen=0.79)
    assert out["chosen"]["precision"] == 1.0 and out["chosen"]["recall"] == pytest.approx(2 / 3)


def test_iou_tradeoff(tmp_path):
    grid = [{"nms_iou": 0.7, "f1": 0.5, "note": "x"}, {"nms_iou": 0.5, "f1": 0.6, "note": "y"}]
    out = plots.plot_iou_tradeoff(grid, tmp_path / "iou.png")
    _check_png(out["path"], out["size"])
    np.testing.assert_allclose(out["nms_iou"], [0.5, 0.7])
    assert list(out["series"]) == ["f1"]
    np.testing.assert_allclose(out["series"]["f1"], [0.6, 0.5])


def test_missing_matplotlib_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'tfcal\[plots\]'"):
        plots.plot_reliability_diagram([0.5], [1], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_bad_curve_shapes(tmp_path):
    with pytest.raises(ValueError, match="equal non-empty 1-D"):
        plots.plot_threshold_curves([0.1, 0.2], [1.0], [0.5, 0.4], tmp_path / "x.png")


def test_reliability_by_size(tmp_path):
    # Curves as report.json holds them (summary.localization.*.reliability_by_size).
    from tfcal.localization_metrics import curve_dict, reliability_by_size

    rng = np.random.default_rng(2)
    p = rng.random(300)
    y = (rng.random(300) < p).astype(int)
    area = np.where(np.arange(300) < 150, 500.0, 5000.0)  # small and medium only
    before = {k: curve_dict(v) for k, v in reliability_by_size(p, y, area).items()}
    after = {k: curve_dict(v) for k, v in reliability_by_size(p ** 2, y, area).items()}
    out = plots.plot_reliability_by_size(before, after, tmp_path / "size.png", title="t")
    _check_png(out["path"], out["size"])
    assert out["buckets"] == ["small", "medium"] and before["large"] is None
