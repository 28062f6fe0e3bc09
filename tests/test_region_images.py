import numpy as np
from PIL import Image

from hic.region_images import draw_box, fill


def test_box_in_original_pixels_is_drawn_on_the_resized_image():
    # Original 400x200 stored at 100x50: scale 4 per axis.
    stored = Image.new("RGB", (100, 50), (0, 0, 0))
    drawn = np.asarray(draw_box(stored, [40, 40, 200, 80], (4.0, 4.0), "red", 1))
    red = np.argwhere((drawn[..., 0] > 200) & (drawn[..., 1] < 60))
    (y0, x0), (y1, x1) = red.min(axis=0), red.max(axis=0)
    assert (x0, y0, x1, y1) == (10, 10, 60, 30)
    assert np.asarray(stored).max() == 0  # the input image is untouched


def test_fill_keeps_other_braces():
    assert fill('{label} as {"label": "x"}', label="dog") == 'dog as {"label": "x"}'
