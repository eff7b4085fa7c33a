import numpy as np

from legion.gallery import GalleryItem, Table, colour, highlight_phrases, overlay_masks, plot_curves, write_report
from legion.record import PredictionRecord
from tests.browser import open_page


def test_highlight_phrases_in_order_and_escaped():
    out = highlight_phrases("a <b> ear: bad. ear again", ["ear", "ear", "nose"])
    assert out.count("<mark") == 3  # two in the text, one listed as "also grounded"
    assert "&lt;b&gt;" in out
    r, g, b = colour(1)
    assert f"rgb({r},{g},{b})" in out
    assert out.index(f"rgb({colour(0)[0]}") < out.index(f"rgb({r},{g},{b})")


def test_overlay_colours_only_masked_pixels():
    img = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 1
    out = overlay_masks(img, [mask])
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[2, 2].tolist() == list(colour(0))  # outline in full colour
    assert (out[3:5, 3:5] > 0).any(axis=-1).all()


def test_report_renders_in_browser(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
    mask = np.zeros((32, 48), np.uint8)
    mask[4:12, 5:20] = 1
    items = [
        GalleryItem(
            img,
            PredictionRecord(
                image="a.png", verdict="fake", fake_prob=0.9, explanation="The cup: warped.", phrases=["The cup"]
            ),
            [mask],
            mask,
            "a.png",
        ),
        GalleryItem(img, PredictionRecord(image="b.png", verdict="real", fake_prob=0.1), [], None, "b.png"),
    ]
    rows = [{"step": s, "loss": 2.0 / (s + 1), "ce_loss": 1.0 / (s + 1)} for s in range(10)]
    curve = plot_curves(rows, ["loss", "ce_loss"], tmp_path / "report_assets" / "loss_curve.png")
    html_path, md_path = write_report(
        tmp_path, "Test report", [Table("m", [{"run": "x", "miou": 50.0}])], items, figures=[("Training loss", curve)]
    )
    assert "| run | miou |" in md_path.read_text()
    result = open_page(html_path)
    assert result["title"] == "Test report"
    assert len(result["images"]) == 1 + 3 + 2  # curve + (input, pred, gt) + (input, pred)
    assert result["broken"] == [] and result["errors"] == []
