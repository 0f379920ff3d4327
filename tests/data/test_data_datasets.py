"""Every dataset layout, built on disk by the test: contract, label mapping, splits, factory."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from fakedata import (
    make_ade20k,
    make_camvid,
    make_cityscapes,
    make_isbi_pngs,
    make_isbi_tifs,
    make_sbd,
    make_voc,
    rng_image,
    rng_mask,
    save,
)
from PIL import Image

from densepred.data import (
    IGNORE_INDEX,
    DataError,
    SegmentationDataset,
    UnknownDatasetError,
    create_dataset,
    detect_dataset,
    list_datasets,
)
from densepred.data.cityscapes import CITYSCAPES_LABEL_TO_TRAIN
from densepred.data.voc_splits import SEG11VALID, SEG11VALID_SHA256


def check_contract(ds: SegmentationDataset, channels: int = 3) -> None:
    """What every dataset promises: tensors of the right type and shape, labels in range."""
    assert len(ds) > 0
    assert len(ds.class_names) == ds.num_classes and len(ds.palette) == ds.num_classes
    assert ds.ignore_index == IGNORE_INDEX
    for i in range(len(ds)):
        item = ds[i]
        image, mask = item["image"], item["mask"]
        assert image.dtype == torch.float32 and image.shape[0] == channels and 0 <= image.min() and image.max() <= 1
        assert mask.dtype == torch.int64 and mask.shape == image.shape[1:]
        values = set(mask.unique().tolist())
        assert values <= set(range(ds.num_classes)) | {IGNORE_INDEX}, values
        assert isinstance(item["name"], str)
        np.testing.assert_array_equal(ds.load_mask(i), mask.numpy())


def raw(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_camvid_maps_void_11_to_ignore(tmp_path):
    root = make_camvid(tmp_path)
    ds = create_dataset("camvid", root=root, split="val")
    check_contract(ds)
    assert ds.num_classes == 11 and ds.class_names[0] == "sky"
    expected = raw(root / "valannot" / "f0.png").astype(np.int64)
    expected[expected == 11] = IGNORE_INDEX
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), expected)
    np.testing.assert_allclose(ds[0]["image"].numpy().transpose(1, 2, 0) * 255, raw(root / "val" / "f0.png"), atol=1e-3)


def test_voc_splits_and_boundary_ignore(tmp_path):
    root = make_voc(tmp_path)
    train = create_dataset("voc", root=root, split="train")
    check_contract(train)
    assert [n for n in (train[i]["name"] for i in range(len(train)))] == ["2007_000001", "2007_000002"]
    assert len(create_dataset("voc", root=root, split="trainval")) == 3
    # Palette PNG: indices are labels, 255 (boundary) stays the ignore label.
    np.testing.assert_array_equal(
        train[0]["mask"].numpy(), raw(root / "VOCdevkit/VOC2012/SegmentationClass/2007_000001.png")
    )
    # The root may also be VOCdevkit/VOC2012 itself.
    assert len(create_dataset("voc", root=root / "VOCdevkit" / "VOC2012", split="val")) == 1


def test_voc_train_aug_unions_sbd_minus_val_and_prefers_voc_masks(tmp_path):
    root = make_voc(tmp_path / "voc", train=("2007_000001", "2008_000002"), val=("2007_000033",))
    # SBD holds one VOC train image, the VOC val image (must be excluded) and two of its own.
    make_sbd(tmp_path / "sbd", train=("2008_000002", "2007_000033", "2009_000010"), val=("2010_000020",))
    ds = create_dataset("voc", root=root, split="train_aug")
    names = [ds.files[i].name for i in range(len(ds))]
    assert names == ["2007_000001", "2008_000002", "2009_000010", "2010_000020"]
    by_name = {f.name: f for f in ds.files}
    assert by_name["2008_000002"].mask.suffix == ".png"  # VOC's mask wins: it has boundaries
    assert by_name["2009_000010"].mask.suffix == ".mat" and by_name["2009_000010"].image.parts[-2] == "img"
    check_contract(ds)
    from scipy.io import loadmat

    mat = loadmat(
        tmp_path / "sbd/benchmark_RELEASE/dataset/cls/2009_000010.mat", squeeze_me=True, struct_as_record=False
    )
    np.testing.assert_array_equal(ds[2]["mask"].numpy(), mat["GTcls"].Segmentation)


def test_sbd_alone(tmp_path):
    make_sbd(tmp_path, train=("2008_000001", "2008_000002"), val=("2008_000003",))
    ds = create_dataset("sbd", root=tmp_path, split="train")
    check_contract(ds)
    assert len(create_dataset("sbd", root=tmp_path / "benchmark_RELEASE", split="val")) == 1


def test_voc_train_aug_without_sbd_says_where_it_looked(tmp_path):
    root = make_voc(tmp_path / "voc")
    with pytest.raises(DataError, match="SBD.*sbd_root"):
        create_dataset("voc", root=root, split="train_aug")


def test_seg11valid_list_is_the_fcn_file():
    assert len(SEG11VALID) == 736 and len(set(SEG11VALID)) == 736
    assert hashlib.sha256(("\n".join(SEG11VALID) + "\n").encode()).hexdigest() == SEG11VALID_SHA256


def test_voc_seg11valid_uses_the_packaged_list(tmp_path):
    root = make_voc(tmp_path, train=SEG11VALID[:2], val=SEG11VALID[2:3])
    with pytest.raises(DataError, match=r"733 image\(s\) in VOC split 'seg11valid' have no mask"):
        create_dataset("voc", root=root, split="seg11valid")


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    root = make_cityscapes(tmp_path)
    ds = create_dataset("cityscapes", root=root, split="train")
    check_contract(ds)
    assert ds.num_classes == 19 and ds[0]["name"] == "aachen_000000_000019"
    labels = raw(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png")
    expected = np.vectorize(CITYSCAPES_LABEL_TO_TRAIN.get)(labels)
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), expected)
    assert (
        CITYSCAPES_LABEL_TO_TRAIN[7] == 0
        and CITYSCAPES_LABEL_TO_TRAIN[33] == 18
        and CITYSCAPES_LABEL_TO_TRAIN[0] == 255
    )


def test_ade20k_shifts_ids_and_ignores_zero(tmp_path):
    root = make_ade20k(tmp_path)
    ds = create_dataset("ade20k", root=root, split="val")
    check_contract(ds)
    assert ds.num_classes == 150
    labels = raw(root / "ADEChallengeData2016/annotations/validation/ADE_valid_00000000.png").astype(np.int64)
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), np.where(labels == 0, 255, labels - 1))


@pytest.mark.parametrize("layout", ["pngs", "tifs"])
def test_isbi_both_layouts(tmp_path, layout):
    root = (make_isbi_pngs if layout == "pngs" else make_isbi_tifs)(tmp_path)
    train = create_dataset("isbi2012", root=root, split="train")
    check_contract(train, channels=1)
    assert train.class_names == ("membrane", "cell") and len(train) == 3
    # 0 = membrane -> 0, 255 = cell -> 1 (255 must not become the ignore label here).
    np.testing.assert_array_equal(train[1]["mask"].numpy(), rng_mask(1, [0, 255]) // 255)
    np.testing.assert_allclose(train[1]["image"][0].numpy() * 255, rng_image(1, channels=1), atol=1e-3)
    test = create_dataset("isbi2012", root=root, split="test")
    assert len(test) == 3 and (test[0]["mask"] == IGNORE_INDEX).all()


def test_isbi_stack_frame_count_mismatch(tmp_path):
    from fakedata import save_stack

    make_isbi_tifs(tmp_path)
    save_stack(tmp_path / "train-labels.tif", [rng_mask(0, [0, 255])])
    with pytest.raises(DataError, match="1 frames but .*train-volume.tif has 3"):
        create_dataset("isbi2012", root=tmp_path)


def test_isbi_label_other_than_0_255_is_refused(tmp_path):
    make_isbi_pngs(tmp_path)
    save(tmp_path / "train/labels/01.png", np.full((24, 32), 128, np.uint8))
    ds = create_dataset("isbi2012", root=tmp_path)
    with pytest.raises(DataError, match=r"01.png: mask has values \[128\]"):
        ds[1]


def _folder(root, classes_text, name="classes.yaml"):
    (root / name).write_text(classes_text)
    return root


def test_folder_index_masks_with_yaml(tmp_path):
    _folder(tmp_path, "classes: [background, cat, dog]\n")
    for i in range(2):
        save(tmp_path / "images" / f"img{i}.jpg", rng_image(i))
        save(tmp_path / "masks" / f"img{i}.png", rng_mask(i, [0, 1, 2, 255]))
    ds = create_dataset("folder", root=tmp_path, split="all")
    check_contract(ds)
    assert ds.class_names == ("background", "cat", "dog")
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), rng_mask(0, [0, 1, 2, 255]))


def test_folder_colour_masks_with_json_palette_and_splits(tmp_path):
    palette = [[0, 0, 0], [128, 64, 128], [0, 0, 142]]
    _folder(
        tmp_path,
        json.dumps({"classes": ["bg", "road", "car"], "palette": palette, "ignore_colour": [255, 255, 255]}),
        "classes.json",
    )
    ids = rng_mask(3, [0, 1, 2, 3])
    lut = np.array(palette + [[255, 255, 255]], np.uint8)
    save(tmp_path / "val" / "images" / "a.png", rng_image(3))
    save(tmp_path / "val" / "masks" / "a.png", lut[ids])
    ds = create_dataset("folder", root=tmp_path, split="val")
    check_contract(ds)
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), np.where(ids == 3, 255, ids))
    assert ds.palette == [tuple(c) for c in palette]


def test_folder_unknown_colour_is_listed(tmp_path):
    _folder(tmp_path, "classes: [bg, road]\npalette: [[0, 0, 0], [128, 64, 128]]\n")
    mask = np.zeros((24, 32, 3), np.uint8)
    mask[0, 0] = (1, 2, 3)
    save(tmp_path / "images" / "a.png", rng_image(0))
    save(tmp_path / "masks" / "a.png", mask)
    with pytest.raises(DataError, match=r"a.png: colour mask has 1 pixels .* \[\(1, 2, 3\)\]"):
        create_dataset("folder", root=tmp_path, split="all")[0]


def test_folder_colour_mask_without_palette_is_refused(tmp_path):
    _folder(tmp_path, "classes: [bg, road]\n")
    save(tmp_path / "images" / "a.png", rng_image(0))
    save(tmp_path / "masks" / "a.png", np.zeros((24, 32, 3), np.uint8))
    with pytest.raises(DataError, match="colour .* mask, but this dataset expects index masks"):
        create_dataset("folder", root=tmp_path, split="all")[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("classes: []\n", "non-empty list"),
        ("colours: [a]\n", "needs a 'classes' list"),
        ("classes: [a, b]\npalette: [[0, 0, 0]]\n", "one colour per class"),
        ("classes: [a, b]\nignore_index: 1\n", "ignore_index"),
        ("classes: [a, b]\nextra: 1\n", "unknown key"),
        ("classes: [a, b\n", "cannot read the class file"),
    ],
)
def test_folder_bad_class_file(tmp_path, text, message):
    _folder(tmp_path, text)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match=message):
        create_dataset("folder", root=tmp_path, split="all")


def test_folder_flat_layout_asks_for_split_all(tmp_path):
    _folder(tmp_path, "classes: [a, b]\n")
    save(tmp_path / "images" / "a.png", rng_image(0))
    save(tmp_path / "masks" / "a.png", rng_mask(0, [0, 1]))
    with pytest.raises(DataError, match="pass split='all'"):
        create_dataset("folder", root=tmp_path, split="train")


def test_factory_lists_and_suggests():
    assert set(list_datasets()) >= {"voc", "sbd", "cityscapes", "camvid", "isbi2012", "ade20k", "folder", "synthetic"}
    with pytest.raises(UnknownDatasetError, match="Did you mean: camvid"):
        create_dataset("camvidd", root=".")
    with pytest.raises(DataError, match="needs root=.*densepred data download camvid"):
        create_dataset("camvid")
    with pytest.raises(DataError, match="unknown split 'training'; choose one of train, val, test"):
        create_dataset("camvid", root=".", split="training")


def test_detect_dataset(tmp_path):
    assert detect_dataset(make_camvid(tmp_path / "c")) == "camvid"
    assert detect_dataset(make_voc(tmp_path / "v")) == "voc"
    assert detect_dataset(make_isbi_tifs(tmp_path / "i")) == "isbi2012"
    assert detect_dataset(make_cityscapes(tmp_path / "s")) == "cityscapes"
    assert detect_dataset(make_ade20k(tmp_path / "a")) == "ade20k"
    with pytest.raises(DataError, match="no known layout"):
        detect_dataset(tmp_path)
