import numpy as np
import pytest

from chestdx.data.transforms import (CLAHE, Compose, Normalize, RandomAffine, RandomDownscale, RandomHorizontalFlip,
                                     RandomJPEG, Resize, ZScore, build_pipeline, tta_views)


def square_image(h=60, w=120):
    img = np.zeros((h, w), np.float32)
    img[20:40, 10:30] = 1.0
    return img


def test_resize_keep_aspect_pads_and_centres():
    out = Resize(64, keep_aspect=True)(square_image())
    assert out.shape == (64, 64)
    # 120 wide -> 64, 60 high -> 32, padded 16 rows top and bottom with the border value 0.
    assert np.all(out[:16] == 0) and np.all(out[-16:] == 0)
    assert out[16 + 16, int(20 * 64 / 120)] > 0.5  # the square moved with the scaling


def test_resize_plain_stretches():
    out = Resize(64, keep_aspect=False)(square_image())
    assert out.shape == (64, 64) and out[32, 10] > 0.5


def test_clahe_raises_local_contrast():
    rng = np.random.default_rng(0)
    img = (0.45 + 0.05 * rng.random((64, 64))).astype(np.float32)  # low-contrast texture
    out = CLAHE(4.0, 4)(img)
    assert out.std() > 3 * img.std()
    assert 0 <= out.min() and out.max() <= 1


def test_zscore_is_whole_image():
    img = np.tile(np.linspace(0, 1, 50, dtype=np.float32), (20, 1))
    out = ZScore()(img)
    assert out.mean() == pytest.approx(0, abs=1e-5) and out.std() == pytest.approx(1, abs=1e-4)
    # A per-column z-score would flatten each column to zero; the whole-image one keeps the ramp.
    assert out[0, -1] > out[0, 0]


def test_normalize():
    out = Normalize(0.5, 0.5)(np.array([[0.0, 1.0]], np.float32))
    np.testing.assert_allclose(out, [[-1.0, 1.0]])


def test_flip_mirrors_and_is_seeded():
    img = square_image()
    out = RandomHorizontalFlip(p=1.0)(img, np.random.default_rng(0))
    np.testing.assert_array_equal(out, img[:, ::-1])
    assert RandomHorizontalFlip(p=0.0)(img, np.random.default_rng(0)) is img


def test_affine_scale_and_shear_within_range_and_seeded():
    img = np.zeros((101, 101), np.float32)
    img[40:61, 40:61] = 1.0
    aff = RandomAffine(shear=0.2, scale=(0.8, 1.2))
    a = aff(img, np.random.default_rng(5))
    b = aff(img, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    area = (a > 0.5).sum() / (img > 0.5).sum()
    assert 0.8**2 * 0.9 < area < 1.2**2 * 1.1  # area scales with s^2 (shear keeps it close)
    ys, xs = np.nonzero(a > 0.5)
    assert abs(ys.mean() - 50) < 2 and abs(xs.mean() - 50) < 2  # transformed about the centre


def test_affine_translate_shifts_and_zero_replays_the_paper_stream():
    img = np.zeros((101, 101), np.float32)
    img[40:61, 40:61] = 1.0
    # translate 0 draws only the paper's numbers (p, scale, two shears), so old seeds replay exactly
    used, reference = np.random.default_rng(7), np.random.default_rng(7)
    RandomAffine(shear=0.2, scale=(0.8, 1.2))(img, used)
    reference.random(), reference.uniform(0.8, 1.2), reference.uniform(-0.2, 0.2, size=2)
    assert used.random() == reference.random()
    shifts = []
    for seed in range(30):
        out = RandomAffine(shear=0.0, scale=(1.0, 1.0), translate=0.2)(img, np.random.default_rng(seed))
        ys, xs = np.nonzero(out > 0.5)
        assert abs((out > 0.5).sum() - 21 * 21) <= 2 * 21 + 1  # a pure shift keeps the area
        shifts.append((ys.mean() - 50, xs.mean() - 50))
    shifts = np.abs(np.array(shifts))
    assert shifts.max() <= 0.2 * 101 + 1  # within +-20% of the side
    assert shifts.max() > 0.1 * 101 and np.median(shifts) > 2  # and really moved


def test_affine_probability_from_the_config():
    img = np.zeros((64, 64), np.float32)
    img[10:30, 20:50] = 1.0
    _, never = build_pipeline({"size": 64, "mean": 0.0, "std": 1.0}, train=True, aug={"affine": 0.0, "hflip": 0.0})
    np.testing.assert_array_equal(never(img, np.random.default_rng(3)), img)  # 0: no affine step at all
    _, half = build_pipeline({"size": 64, "mean": 0.0, "std": 1.0}, train=True, aug={"affine": 0.5, "hflip": 0.0})
    untouched = [np.array_equal(half(img, np.random.default_rng(seed)), img) for seed in range(200)]
    assert 0.35 < np.mean(untouched) < 0.65  # about half the images pass through unresampled
    _, always = build_pipeline({"size": 64, "mean": 0.0, "std": 1.0}, train=True, aug={"affine": True, "hflip": 0.0})
    assert not any(np.array_equal(always(img, np.random.default_rng(seed)), img) for seed in range(20))


def test_tta_views_scale_about_the_centre_and_mirror():
    import torch

    img = torch.zeros(1, 1, 64, 64)
    img[..., 16:48, 8:40] = 1.0  # a 32 x 32 square, off-centre to the left
    views = tta_views(img, hflip=True, scales=[1.0, 0.5])
    assert len(views) == 4
    torch.testing.assert_close(views[0], img)  # scale 1 is the image itself, not resampled
    torch.testing.assert_close(views[1], img.flip(-1))
    half = views[2][0, 0] > 0.5
    assert abs(int(half.sum()) - 16 * 16) <= 16 * 4  # side halved: a quarter of the area
    ys, xs = torch.nonzero(half, as_tuple=True)
    # shrunk towards the centre (31.5): the square's centre (31.5, 23.5) moves to (31.5, 27.5)
    assert abs(ys.float().mean().item() - 31.5) < 1 and abs(xs.float().mean().item() - 27.5) < 1
    torch.testing.assert_close(views[3], views[2].flip(-1))
    assert len(tta_views(img, hflip=False, scales=[1.0])) == 1


def test_jpeg_recompression_adds_blocking_but_keeps_content():
    rng = np.random.default_rng(0)
    img = np.clip(square_image(64, 64) + 0.05 * rng.standard_normal((64, 64)), 0, 1).astype(np.float32)
    out = RandomJPEG(quality=(20, 20), p=1.0)(img, rng)
    assert not np.allclose(out, img, atol=1e-3)
    assert np.corrcoef(out.ravel(), img.ravel())[0, 1] > 0.9


def test_downscale_looks_like_a_small_original_through_resize():
    import cv2

    rng = np.random.default_rng(0)
    img = rng.random((64, 64)).astype(np.float32)
    small_original = cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA)
    out = RandomDownscale(factor=(0.5, 0.5), p=1.0)(img, rng)
    np.testing.assert_allclose(out, Resize(64)(small_original), atol=1e-6)  # what Resize does to a 32 px image
    checker = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)  # the finest detail there is
    np.testing.assert_allclose(RandomDownscale(factor=(0.5, 0.5), p=1.0)(checker, rng), 0.5, atol=1e-6)
    _, never = build_pipeline({"size": 64, "mean": 0.0, "std": 1.0}, train=True,
                              aug={"affine": 0.0, "hflip": 0.0, "downscale": 0.0})
    np.testing.assert_array_equal(never(checker, rng), checker)  # off unless the config asks
    _, half = build_pipeline({"size": 64, "mean": 0.0, "std": 1.0}, train=True,
                             aug={"affine": 0.0, "hflip": 0.0, "downscale": 0.5})
    untouched = [np.array_equal(half(checker, np.random.default_rng(seed)), checker) for seed in range(200)]
    assert 0.35 < np.mean(untouched) < 0.65


def test_pipeline_is_reproducible_per_seed():
    load, sample = build_pipeline({"size": 64, "mean": 0.5, "std": 0.5}, train=True, aug={"jpeg": 0.5})
    img = load(square_image())
    a = sample(img, np.random.default_rng([0, 1, 2]))
    b = sample(img, np.random.default_rng([0, 1, 2]))
    c = sample(img, np.random.default_rng([0, 2, 2]))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert isinstance(load, Compose)
    _, plain = build_pipeline({"size": 64, "mean": 0.5, "std": 0.5}, train=False)
    np.testing.assert_allclose(plain(img, np.random.default_rng(1)), (img - 0.5) / 0.5)
