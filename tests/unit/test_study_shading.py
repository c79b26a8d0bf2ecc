"""The no-object study's position painting (tools/nonobject_study/data.shade_background): the ramp
colour of a pixel is a function of its position; with a halo only pixels near an object change."""
import numpy as np
from PIL import Image

from tools.nonobject_study.data import shade_background

BG = (242, 242, 238)


def _image(tmp_path, box):
    img = np.empty((40, 40, 3), np.uint8)
    img[:] = BG
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = (200, 30, 30)
    path = tmp_path / "images" / "train" / "0.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(img).save(path)
    return img, path


def test_full_ramp_paints_every_background_pixel_by_position(tmp_path):
    before, path = _image(tmp_path, (10, 10, 20, 20))
    assert shade_background(tmp_path, background=BG, strength=200) == 1
    after = np.asarray(Image.open(path))
    assert (after[10:20, 10:20] == before[10:20, 10:20]).all()  # the object is untouched
    assert after[0, 0].tolist() == [255, 255, 240] and after[39, 39].tolist() == [55, 55, 240]
    assert after[5, 30, 0] == round(255 - 200 * 30 / 39) and after[5, 30, 1] == round(255 - 200 * 5 / 39)


def test_halo_paints_only_near_objects(tmp_path):
    before, path = _image(tmp_path, (10, 10, 20, 20))
    shade_background(tmp_path, background=BG, strength=200, halo=3)
    after = np.asarray(Image.open(path))
    changed = np.any(after != before, axis=-1)
    expected = np.zeros((40, 40), bool)
    expected[7:23, 7:23] = True
    expected[10:20, 10:20] = False  # the object itself keeps its colour
    assert (changed == expected).all()
    assert after[8, 21, 0] == round(255 - 200 * 21 / 39)
