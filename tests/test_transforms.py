import numpy as np
import pytest

from chestdx.data.transforms import (CLAHE, Compose, Normalize, RandomAffine, RandomBrightnessContrast, RandomDownscale,
                                     RandomFlip, RandomHorizontalFlip, RandomJPEG, Resize, Window, ZScore,
                                     build_pipeline, tta_views)
from chestdx.errors import ChestDxError


def square_image(h=60, w=120):
    img = np.zeros((h, w), np.float32)
    img[20:40, 10:30] = 1.0
    return img


def s2(img, **extra):
    """A one-channel 2D sample."""
    return {"image": img[None], **extra}


def blob_volume(shape=(21, 21, 21), at=(12, 10, 7), half=1):
    img = np.zeros((1, *shape), np.float32)
    img[(0, *[slice(c - half, c + half + 1) for c in at])] = 1.0
    return img, (img > 0.5).astype(np.uint8)


def centroid(x):
    return np.argwhere(x > 0.5).mean(0)


def test_resize_keep_aspect_pads_and_centres():
    out = Resize(64, keep_aspect=True)(s2(square_image()))["image"]
    assert out.shape == (1, 64, 64)
    out = out[0]
    # 120 wide -> 64, 60 high -> 32, padded 16 rows top and bottom with the border value 0.
    assert np.all(out[:16] == 0) and np.all(out[-16:] == 0)
    assert out[16 + 16, int(20 * 64 / 120)] > 0.5  # the square moved with the scaling


def test_resize_plain_stretches():
    out = Resize(64, keep_aspect=False)(s2(square_image()))["image"]
    assert out.shape == (1, 64, 64) and out[0, 32, 10] > 0.5


def test_resize_moves_the_mask_by_nearest_neighbour_and_keeps_other_keys():
    img = square_image()
    sample = s2(img + 0.3, mask=(img > 0.5).astype(np.uint8)[None], target=1)
    out = Resize(64)(sample)
    assert out["mask"].shape == (1, 64, 64) and out["mask"].dtype == np.uint8
    assert set(np.unique(out["mask"])) == {0, 1}
    assert np.all(out["mask"][0, :16] == 0)  # padding is background, not the image's border value
    agree = out["mask"][0].astype(bool) == (out["image"][0] > 0.8)
    assert agree.mean() > 0.99  # in register with the image
    assert out["target"] == 1 and sample["image"].shape == (1, 60, 120)  # the input dict is not changed
    soft = Resize(64)(s2(img, mask=(img > 0.5).astype(np.float32)[None]))["mask"]
    assert soft.dtype == np.float32 and set(np.unique(soft)) == {0.0, 1.0}  # nearest, so still binary
    body = Resize(64)(s2(img, mask=np.ones((1, 60, 120), np.uint8)))["mask"][0]
    assert np.all(body[:16] == 0) and np.all(body[-16:] == 0) and np.all(body[16:48] == 1)  # padding is outside


def test_resize_3d_keep_aspect_pads_depth_and_moves_the_mask():
    img, mask = blob_volume((20, 40, 40), at=(10, 20, 10), half=2)
    out = Resize(32, spatial_dims=3)({"image": img, "mask": mask})
    soft = Resize(32, spatial_dims=3)({"image": img, "mask": mask.astype(np.float32)})["mask"]
    assert set(np.unique(soft)) == {0.0, 1.0}  # nearest, not trilinear
    np.testing.assert_array_equal(soft, out["mask"])
    assert out["image"].shape == (1, 32, 32, 32) and out["mask"].shape == (1, 32, 32, 32)
    # scale 32/40 = 0.8: depth 20 -> 16, padded 8 before and 8 after with the border value 0
    assert np.all(out["image"][0, :8] == 0) and np.all(out["image"][0, -8:] == 0)
    assert out["mask"].dtype == np.uint8 and set(np.unique(out["mask"])) == {0, 1}
    # blob centre (10, 20, 10) -> 8 + (10.5 * 0.8 - 0.5), (20.5 * 0.8 - 0.5), (10.5 * 0.8 - 0.5)
    expected = [8 + 7.9, 15.9, 7.9]
    np.testing.assert_allclose(centroid(out["mask"][0]), expected, atol=0.6)
    np.testing.assert_allclose(centroid(out["image"][0]), expected, atol=0.6)
    stretched = Resize((10, 20, 30), keep_aspect=False, spatial_dims=3)({"image": img})["image"]
    assert stretched.shape == (1, 10, 20, 30)


def test_clahe_raises_local_contrast():
    rng = np.random.default_rng(0)
    img = (0.45 + 0.05 * rng.random((64, 64))).astype(np.float32)  # low-contrast texture
    out = CLAHE(4.0, 4)(s2(img))["image"]
    assert out.std() > 3 * img.std()
    assert 0 <= out.min() and out.max() <= 1


def test_2d_only_steps_refuse_3d():
    for make in (lambda: CLAHE(4.0, 4, spatial_dims=3), lambda: RandomJPEG(spatial_dims=3),
                 lambda: RandomDownscale(spatial_dims=3)):
        with pytest.raises(ChestDxError, match="2D-only"):
            make()
    with pytest.raises(ChestDxError, match="CLAHE is 2D-only"):
        build_pipeline({"size": 32, "clahe": True}, train=False, spatial_dims=3)
    with pytest.raises(ChestDxError, match="RandomJPEG is 2D-only"):
        build_pipeline({"size": 32}, train=True, aug={"jpeg": 0.5}, spatial_dims=3)


def test_steps_refuse_a_bare_array_or_the_wrong_dims():
    with pytest.raises(ChestDxError, match="dict"):
        Resize(32)(square_image())
    with pytest.raises(ChestDxError, match="spatial_dims=3"):
        RandomFlip(spatial_dims=3)({"image": square_image()[None]}, np.random.default_rng(0))
    with pytest.raises(ChestDxError, match="spatial shape"):
        RandomAffine()(s2(square_image(), mask=np.zeros((1, 10, 10), np.uint8)), np.random.default_rng(0))


def test_zscore_is_whole_image():
    img = np.tile(np.linspace(0, 1, 50, dtype=np.float32), (20, 1))
    out = ZScore()(s2(img))["image"][0]
    assert out.mean() == pytest.approx(0, abs=1e-5) and out.std() == pytest.approx(1, abs=1e-4)
    # A per-column z-score would flatten each column to zero; the whole-image one keeps the ramp.
    assert out[0, -1] > out[0, 0]


def test_normalize():
    out = Normalize(0.5, 0.5)({"image": np.array([[[0.0, 1.0]]], np.float32)})["image"]
    np.testing.assert_allclose(out, [[[-1.0, 1.0]]])


def test_intensity_steps_leave_the_mask_alone():
    mask = np.full((1, 4, 4), 3, np.uint8)
    sample = {"image": np.full((1, 4, 4), 0.5, np.float32), "mask": mask}
    for step in (Normalize(0.1, 0.2), ZScore(), RandomBrightnessContrast(p=1.0), Window(0, 1)):
        assert step(sample, np.random.default_rng(0))["mask"] is mask


def test_window_maps_the_lung_window_to_unit_range_and_clips():
    hu = np.array([[[-2000.0, -1350.0, -600.0, 150.0, 3000.0]]], np.float32)
    out = Window(-600, 1500)({"image": hu})["image"]
    np.testing.assert_allclose(out, [[[0.0, 0.0, 0.5, 1.0, 1.0]]], atol=1e-6)
    assert out.dtype == np.float32
    vol = Window(-600, 1500)({"image": np.full((1, 2, 3, 4), -975.0, np.float32)})["image"]
    np.testing.assert_allclose(vol, 0.25)  # any dims
    load, _ = build_pipeline({"size": 4, "window": [-600, 1500]}, train=False)
    assert type(load.steps[0]) is Window
    np.testing.assert_allclose(load({"image": np.full((1, 8, 8), 150.0, np.float32)})["image"], 1.0)


def test_flip_mirrors_and_is_seeded():
    img = square_image()
    sample = s2(img)
    out = RandomHorizontalFlip(p=1.0)(sample, np.random.default_rng(0))
    np.testing.assert_array_equal(out["image"][0], img[:, ::-1])
    assert RandomHorizontalFlip(p=0.0)(sample, np.random.default_rng(0))["image"] is sample["image"]


def test_flip_3d_moves_image_and_mask_together():
    img, mask = blob_volume((8, 10, 12), at=(2, 5, 7), half=0)
    sample = {"image": img, "mask": mask}
    lr = RandomHorizontalFlip(p=1.0, spatial_dims=3)(sample, np.random.default_rng(0))
    assert [tuple(v) for v in np.argwhere(lr["image"][0] > 0)] == [(2, 5, 4)]  # x 7 -> 11 - 7
    assert [tuple(v) for v in np.argwhere(lr["mask"][0] > 0)] == [(2, 5, 4)]
    deep = RandomFlip(axis=0, p=1.0, spatial_dims=3)(sample, np.random.default_rng(0))
    assert [tuple(v) for v in np.argwhere(deep["image"][0] > 0)] == [(5, 5, 7)]  # z 2 -> 7 - 2
    assert [tuple(v) for v in np.argwhere(deep["mask"][0] > 0)] == [(5, 5, 7)]
    assert deep["mask"].dtype == np.uint8


def test_affine_scale_and_shear_within_range_and_seeded():
    img = np.zeros((101, 101), np.float32)
    img[40:61, 40:61] = 1.0
    aff = RandomAffine(shear=0.2, scale=(0.8, 1.2))
    a = aff(s2(img), np.random.default_rng(5))["image"][0]
    b = aff(s2(img), np.random.default_rng(5))["image"][0]
    np.testing.assert_array_equal(a, b)
    area = (a > 0.5).sum() / (img > 0.5).sum()
    assert 0.8**2 * 0.9 < area < 1.2**2 * 1.1  # area scales with s^2 (shear keeps it close)
    ys, xs = np.nonzero(a > 0.5)
    assert abs(ys.mean() - 50) < 2 and abs(xs.mean() - 50) < 2  # transformed about the centre


def test_affine_2d_moves_image_and_mask_together():
    img = np.zeros((101, 101), np.float32)
    img[20:45, 55:80] = 1.0  # off-centre, so shear, scale and shift all move it
    aff = RandomAffine(shear=0.2, scale=(0.8, 1.3), translate=0.15)
    for seed, dtype in enumerate([np.uint8, np.float32, np.uint8, np.float32, bool]):
        sample = s2(img, mask=(img > 0.5).astype(dtype)[None])
        out = aff(sample, np.random.default_rng(seed))
        image, mask = out["image"][0], out["mask"][0]
        assert mask.dtype == dtype and set(np.unique(mask)) == {0, 1}  # float masks too: nearest, not linear
        assert abs(int(mask.sum()) - int((image > 0.5).sum())) <= 0.05 * mask.sum()
        assert not np.array_equal(mask, sample["mask"][0])  # it moved
        inter = np.logical_and(mask, image > 0.5).sum()
        assert inter / np.logical_or(mask, image > 0.5).sum() > 0.9  # and the image moved with it
        np.testing.assert_allclose(centroid(mask), centroid(image), atol=0.5)


def test_affine_3d_known_scale_moves_image_and_mask_to_the_predicted_place():
    img, mask = blob_volume(at=(12, 10, 7), half=1)
    out = RandomAffine(shear=0.0, scale=(2.0, 2.0), spatial_dims=3)({"image": img, "mask": mask},
                                                                     np.random.default_rng(0))
    # about the centre (10, 10, 10): offset (2, 0, -3) doubles to (4, 0, -6)
    np.testing.assert_allclose(centroid(out["mask"][0]), [14, 10, 4], atol=0.5)
    np.testing.assert_allclose(centroid(out["image"][0]), [14, 10, 4], atol=0.5)
    assert out["mask"].dtype == np.uint8 and set(np.unique(out["mask"])) == {0, 1}
    assert 5 ** 3 <= out["mask"].sum() <= 7 ** 3  # the 3-voxel cube became about 6 voxels a side


def test_affine_3d_translation_follows_the_drawn_shift():
    img, mask = blob_volume(at=(12, 10, 7), half=1)
    float_mask = mask.astype(np.float32)
    aff = RandomAffine(shear=0.0, scale=(1.0, 1.0), translate=0.2, spatial_dims=3)
    out = aff({"image": img, "mask": float_mask}, np.random.default_rng(1))
    replay = np.random.default_rng(1)  # the documented order: p, scale, 6 shears, 3 shifts
    replay.random(), replay.uniform(1.0, 1.0), replay.uniform(0.0, 0.0, size=6)
    shift = replay.uniform(-0.2, 0.2, size=3) * 21
    assert np.abs(shift).max() > 2  # a shift worth testing
    expected = np.array([12, 10, 7]) + np.round(shift)
    np.testing.assert_allclose(centroid(out["mask"][0]), expected, atol=0.01)
    np.testing.assert_allclose(centroid(out["image"][0]), np.array([12, 10, 7]) + shift, atol=0.5)
    assert out["mask"].dtype == np.float32 and set(np.unique(out["mask"])) == {0.0, 1.0}


def test_affine_3d_rotation_keeps_the_mask_binary_and_in_register():
    img, mask = blob_volume((32, 32, 32), at=(16, 10, 20), half=3)
    aff = RandomAffine(shear=0.1, scale=(0.9, 1.1), translate=0.1, rotate=20, spatial_dims=3)
    out = aff({"image": img, "mask": mask}, np.random.default_rng(4))
    assert set(np.unique(out["mask"])) == {0, 1}
    assert not np.array_equal(out["mask"], mask)
    np.testing.assert_allclose(centroid(out["mask"][0]), centroid(out["image"][0]), atol=0.5)


def test_affine_translate_shifts_and_zero_replays_the_paper_stream():
    img = np.zeros((101, 101), np.float32)
    img[40:61, 40:61] = 1.0
    # translate 0 draws only the paper's numbers (p, scale, two shears), so old seeds replay exactly
    used, reference = np.random.default_rng(7), np.random.default_rng(7)
    RandomAffine(shear=0.2, scale=(0.8, 1.2))(s2(img), used)
    reference.random(), reference.uniform(0.8, 1.2), reference.uniform(-0.2, 0.2, size=2)
    assert used.random() == reference.random()
    shifts = []
    for seed in range(30):
        out = RandomAffine(shear=0.0, scale=(1.0, 1.0), translate=0.2)(s2(img), np.random.default_rng(seed))
        out = out["image"][0]
        ys, xs = np.nonzero(out > 0.5)
        assert abs((out > 0.5).sum() - 21 * 21) <= 2 * 21 + 1  # a pure shift keeps the area
        shifts.append((ys.mean() - 50, xs.mean() - 50))
    shifts = np.abs(np.array(shifts))
    assert shifts.max() <= 0.2 * 101 + 1  # within +-20% of the side
    assert shifts.max() > 0.1 * 101 and np.median(shifts) > 2  # and really moved


def test_affine_probability_from_the_config():
    img = np.zeros((64, 64), np.float32)
    img[10:30, 20:50] = 1.0
    pre = {"size": 64, "mean": 0.0, "std": 1.0}

    def run(steps, seed):
        return steps(s2(img), np.random.default_rng(seed))["image"][0]

    _, never = build_pipeline(pre, train=True, aug={"affine": 0.0, "hflip": 0.0})
    np.testing.assert_array_equal(run(never, 3), img)  # 0: no affine step at all
    _, half = build_pipeline(pre, train=True, aug={"affine": 0.5, "hflip": 0.0})
    untouched = [np.array_equal(run(half, seed), img) for seed in range(200)]
    assert 0.35 < np.mean(untouched) < 0.65  # about half the images pass through unresampled
    _, always = build_pipeline(pre, train=True, aug={"affine": True, "hflip": 0.0})
    assert not any(np.array_equal(run(always, seed), img) for seed in range(20))


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


def test_tta_views_of_volumes_mirror_the_last_axis_and_scale_about_the_centre():
    import torch

    vol = torch.zeros(2, 1, 16, 16, 16)
    vol[..., 4:12, 4:12, 2:10] = 1.0  # centre (7.5, 7.5, 5.5)
    views = tta_views(vol, hflip=True, scales=[1.0, 0.5])
    assert len(views) == 4
    torch.testing.assert_close(views[0], vol)
    torch.testing.assert_close(views[1], vol.flip(-1))
    small = views[2][0, 0] > 0.5
    assert abs(int(small.sum()) - 4 ** 3) <= 4 ** 2 * 6
    zyx = torch.nonzero(small).float().mean(0)
    torch.testing.assert_close(zyx, torch.tensor([7.5, 7.5, 6.5]), atol=0.6, rtol=0)  # 5.5 halfway to 7.5
    with pytest.raises(ChestDxError, match="batch"):
        tta_views(torch.zeros(1, 16, 16))


def test_jpeg_recompression_adds_blocking_but_keeps_content():
    rng = np.random.default_rng(0)
    img = np.clip(square_image(64, 64) + 0.05 * rng.standard_normal((64, 64)), 0, 1).astype(np.float32)
    out = RandomJPEG(quality=(20, 20), p=1.0)(s2(img), rng)["image"][0]
    assert not np.allclose(out, img, atol=1e-3)
    assert np.corrcoef(out.ravel(), img.ravel())[0, 1] > 0.9


def test_downscale_looks_like_a_small_original_through_resize():
    import cv2

    rng = np.random.default_rng(0)
    img = rng.random((64, 64)).astype(np.float32)
    small_original = cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA)
    out = RandomDownscale(factor=(0.5, 0.5), p=1.0)(s2(img), rng)["image"]
    np.testing.assert_allclose(out, Resize(64)(s2(small_original))["image"], atol=1e-6)  # a 32 px image resized
    checker = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)  # the finest detail there is
    np.testing.assert_allclose(RandomDownscale(factor=(0.5, 0.5), p=1.0)(s2(checker), rng)["image"], 0.5, atol=1e-6)
    _, never = build_pipeline({"size": 64, "mean": 0.0, "std": 1.0}, train=True,
                              aug={"affine": 0.0, "hflip": 0.0, "downscale": 0.0})
    np.testing.assert_array_equal(never(s2(checker), rng)["image"][0], checker)  # off unless the config asks
    _, half = build_pipeline({"size": 64, "mean": 0.0, "std": 1.0}, train=True,
                             aug={"affine": 0.0, "hflip": 0.0, "downscale": 0.5})
    untouched = [np.array_equal(half(s2(checker), np.random.default_rng(seed))["image"][0], checker)
                 for seed in range(200)]
    assert 0.35 < np.mean(untouched) < 0.65


def test_pipeline_is_reproducible_per_seed():
    load, sample = build_pipeline({"size": 64, "mean": 0.5, "std": 0.5}, train=True, aug={"jpeg": 0.5})
    loaded = load(s2(square_image()))
    a = sample(loaded, np.random.default_rng([0, 1, 2]))["image"]
    b = sample(loaded, np.random.default_rng([0, 1, 2]))["image"]
    c = sample(loaded, np.random.default_rng([0, 2, 2]))["image"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert isinstance(load, Compose)
    _, plain = build_pipeline({"size": 64, "mean": 0.5, "std": 0.5}, train=False)
    np.testing.assert_allclose(plain(loaded, np.random.default_rng(1))["image"], (loaded["image"] - 0.5) / 0.5)


def test_pipeline_3d_is_reproducible_per_seed_and_moves_the_mask():
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 200, (1, 12, 30, 30)).astype(np.float32)
    mask = np.zeros((1, 12, 30, 30), np.uint8)
    mask[0, 4:8, 5:15, 5:12] = 1
    load, sample = build_pipeline({"size": 24, "window": [-600, 1500], "mean": 0.5, "std": 0.5}, train=True,
                                  aug={"translate": 0.1, "rotate": 10, "brightness_contrast": 0.5}, spatial_dims=3)
    loaded = load({"image": hu, "mask": mask})
    assert loaded["image"].shape == (1, 24, 24, 24) and loaded["mask"].shape == (1, 24, 24, 24)
    a = sample(loaded, np.random.default_rng([0, 1, 2]))
    b = sample(loaded, np.random.default_rng([0, 1, 2]))
    c = sample(loaded, np.random.default_rng([0, 2, 2]))
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert not np.array_equal(a["image"], c["image"])
    assert set(np.unique(a["mask"])) == {0, 1} and not np.array_equal(a["mask"], loaded["mask"])


def test_vertical_flip_and_gaussian_blur_from_the_config():
    import cv2

    from chestdx.data.transforms import RandomFlip, RandomGaussianBlur

    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    flipped = RandomFlip(axis=0, p=1.0)({"image": x}, np.random.default_rng(0))["image"]
    np.testing.assert_array_equal(flipped[0], x[0][::-1])  # rows reversed: up-down
    spike = np.zeros((2, 15, 15), np.float32)
    spike[:, 7, 7] = 1.0
    blur = RandomGaussianBlur(kernel=7, sigma=(1.0, 1.0))
    out = blur({"image": spike}, np.random.default_rng(0))["image"]
    kernel = cv2.getGaussianKernel(7, 1.0)
    np.testing.assert_allclose(out[0, 4:11, 4:11], kernel @ kernel.T, atol=1e-6)  # the 7 x 7 Gaussian itself
    np.testing.assert_array_equal(out[0], out[1])  # every slice of a sequence alike
    with pytest.raises(ChestDxError, match="odd"):
        RandomGaussianBlur(kernel=6)
    _, steps = build_pipeline({"size": 8}, train=True, aug={"affine": False, "hflip": 0, "vflip": 1.0, "blur": 1.0})
    names = [type(s).__name__ for s in steps.steps]
    assert names[:2] == ["RandomFlip", "RandomGaussianBlur"]


def test_lung_crop_zooms_onto_the_lungs_and_leaves_a_slice_without_lungs():
    from chestdx.data.transforms import LungCrop

    h, w = 128, 160
    yy, xx = np.mgrid[0:h, 0:w]
    body = (((yy - 64) / 56) ** 2 + ((xx - 80) / 70) ** 2) <= 1
    lungs = ((((yy - 64) / 24) ** 2 + ((xx - 58) / 14) ** 2) <= 1) | ((((yy - 64) / 24) ** 2 + ((xx - 102) / 14) ** 2) <= 1)
    slice_ = np.where(body, 0.6, 0.0).astype(np.float32)
    slice_[lungs] = 0.05
    step = LungCrop(margin=0.0)
    y0, y1, x0, x1 = step.box(slice_)
    assert abs(y0 - 40) <= 2 and abs(y1 - 89) <= 2 and abs(x0 - 44) <= 2 and abs(x1 - 117) <= 2
    flat = np.full((h, w), 0.5, np.float32)
    out = step({"image": np.stack([slice_, flat])})["image"]
    assert out.shape == (2, h, w)
    def lung_share(x):  # lung pixels (0.05), not the air around the body (0)
        return float(((x > 0.01) & (x < 0.3)).mean())

    assert lung_share(slice_) == pytest.approx(lungs.mean(), abs=0.01)
    assert lung_share(out[0]) > 3 * lung_share(slice_)  # the lungs now fill the frame
    np.testing.assert_array_equal(out[1], flat)  # no lungs found: unchanged
