"""Benchmark data sets: tiny PASCAL VOC / MS COCO / image-folder trees built on disk.

The builders (:func:`make_voc`, :func:`make_coco`) are shared with the pointing-game tests;
every number checked is worked out by hand from the boxes and polygons below.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from torchray_like.benchmark import datasets as ds
from torchray_like.benchmark.datasets import (
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    IMAGENET_CLASSES,
    VOC_CLASSES,
    CocoDetection,
    CocoTarget,
    DatasetNotFoundError,
    ImageFolder,
    VOCDetection,
    coco_as_class_ids,
    coco_as_image_size,
    coco_as_mask,
    get_dataset,
    voc_as_class_ids,
    voc_as_image_size,
    voc_as_mask,
)

# pycocotools' annToMask (used here as the reference) trips a NumPy 2 deprecation notice.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DOG, PERSON, CAT, BOTTLE, CAR = (VOC_CLASSES.index(n) for n in
                                 ("dog", "person", "cat", "bottle", "car"))
COCO_PERSON, COCO_DOG = COCO_CLASSES.index("person"), COCO_CLASSES.index("dog")

# name -> (width, height, [(class name, difficult, xmin, ymin, xmax, ymax)]), VOC 1-based boxes.
VOC_IMAGES = {
    "000001": (100, 80, [("dog", 0, 11, 11, 40, 30), ("person", 0, 61, 41, 90, 70)]),
    "000002": (60, 50, [("cat", 0, 1, 1, 60, 50), ("bottle", 1, 5, 5, 10, 10)]),
    "000003": (80, 80, [("car", 0, 31, 31, 50, 50)]),
}


def _jpeg(path: Path, width: int, height: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _voc_xml(name: str, width: int, height: int, objects: list) -> str:
    parts = [f"<annotation><folder>VOC2007</folder><filename>{name}.jpg</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for cls, difficult, xmin, ymin, xmax, ymax in objects:
        parts.append(
            f"<object><name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    parts.append("</annotation>")
    return "".join(parts)


def make_voc(root: Path, subset: str = "test") -> Path:
    """A VOC 2007 tree ``root/VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main}``."""
    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for seed, (name, (width, height, objects)) in enumerate(VOC_IMAGES.items()):
        _jpeg(voc / "JPEGImages" / f"{name}.jpg", width, height, seed)
        (voc / "Annotations" / f"{name}.xml").write_text(_voc_xml(name, width, height, objects))
    (voc / "ImageSets" / "Main" / f"{subset}.txt").write_text("\n".join(VOC_IMAGES) + "\n")
    return root


def _square(x0: float, y0: float, x1: float, y1: float) -> list:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


COCO_IMAGES = [  # (id, width, height)
    (42, 64, 48),
    (7, 50, 50),
]
COCO_ANNOTATIONS = [
    # image 42: two people (squares) and a dog (triangle)
    {"id": 1, "image_id": 42, "category_id": 1, "iscrowd": 0,
     "segmentation": _square(10, 10, 30, 30)},
    {"id": 2, "image_id": 42, "category_id": 1, "iscrowd": 0,
     "segmentation": _square(0, 40, 8, 47)},
    {"id": 3, "image_id": 42, "category_id": 18, "iscrowd": 0,
     "segmentation": [[40, 5, 60, 5, 60, 25]]},
    # image 7: a big dog and a crowd of people as uncompressed RLE (column 0, rows 0..9)
    {"id": 4, "image_id": 7, "category_id": 18, "iscrowd": 0,
     "segmentation": _square(5, 5, 45, 45)},
    {"id": 5, "image_id": 7, "category_id": 1, "iscrowd": 1,
     "segmentation": {"size": [50, 50], "counts": [0, 10, 2490]}},
]


def make_coco(root: Path, subset: str = "val2014") -> Path:
    """A COCO tree ``root/{subset}/*.jpg`` + ``root/annotations/instances_{subset}.json``."""
    images = []
    for seed, (image_id, width, height) in enumerate(COCO_IMAGES):
        name = f"COCO_{subset}_{image_id:012d}.jpg"
        _jpeg(root / subset / name, width, height, seed)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
    annotations = []
    for annotation in COCO_ANNOTATIONS:
        xs = annotation["segmentation"][0][0::2] if annotation["iscrowd"] == 0 else [0, 1]
        ys = annotation["segmentation"][0][1::2] if annotation["iscrowd"] == 0 else [0, 10]
        bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        annotations.append({**annotation, "bbox": bbox, "area": float(bbox[2] * bbox[3])})
    categories = [{"id": cid, "name": name, "supercategory": "x"}
                  for cid, name in zip(COCO_CATEGORY_IDS, COCO_CLASSES)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{subset}.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return root


@pytest.fixture
def voc(tmp_path):
    return get_dataset("voc_2007", "test", dataset_dir=make_voc(tmp_path))


@pytest.fixture
def coco(tmp_path):
    pytest.importorskip("pycocotools")
    return get_dataset("coco", "val2014", dataset_dir=make_coco(tmp_path))


# ------------------------------------------------------------------ class lists


def test_class_lists():
    assert len(VOC_CLASSES) == 20
    assert VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"
    assert len(COCO_CLASSES) == 80 == len(set(COCO_CLASSES))
    assert len(COCO_CATEGORY_IDS) == 80 and COCO_CATEGORY_IDS[-1] == 90
    assert COCO_CATEGORY_IDS[COCO_DOG] == 18
    assert len(IMAGENET_CLASSES) == 1000 and IMAGENET_CLASSES[0] == "tench"


# ------------------------------------------------------------------------ VOC


def test_voc_load_ids_sizes_masks(voc):
    assert isinstance(voc, VOCDetection) and len(voc) == 3
    image, label = voc[0]
    assert image.size == (100, 80)  # PIL: (width, height)
    assert voc_as_image_size(label) == (100, 80) == voc.as_image_size(label)  # TorchRay's (w, h)
    assert voc_as_class_ids(label) == [DOG, PERSON] == voc.as_class_ids(label)
    mask = voc_as_mask(label, DOG)
    assert mask.dtype == torch.bool and mask.shape == (80, 100)
    # xmin=11..xmax=40 (1-based, inclusive) -> columns 10..39; rows 10..29
    assert int(mask.sum()) == 30 * 20
    assert bool(mask[10, 10]) and bool(mask[29, 39])
    assert not bool(mask[9, 10]) and not bool(mask[10, 40])
    assert int(voc_as_mask(label, CAT).sum()) == 0  # absent class: empty mask


def test_voc_difficult_objects(voc):
    _, label = voc[1]
    assert voc_as_class_ids(label) == [BOTTLE, CAT]
    assert voc_as_class_ids(label, include_difficult=False) == [CAT]
    assert int(voc_as_mask(label, BOTTLE).sum()) == 36
    assert int(voc_as_mask(label, BOTTLE, exclude_difficult=True).sum()) == 0
    assert int(voc_as_mask(label, CAT).sum()) == 60 * 50  # the full image


def test_voc_single_object_and_load_label(voc):
    label = voc.load_label(2)
    assert label == voc[2][1]
    assert voc_as_class_ids(label) == [CAR]
    assert voc.image_name(2) == "000003"


def test_voc_accepts_devkit_dir_and_transform(tmp_path):
    make_voc(tmp_path)
    for root in (tmp_path / "VOCdevkit", tmp_path / "VOCdevkit" / "VOC2007"):
        assert len(get_dataset("voc_2007", "test", dataset_dir=root)) == 3
    from torchray_like.benchmark.models import get_transform

    dataset = get_dataset("voc_2007", "test", dataset_dir=tmp_path,
                          transform=get_transform("voc", size=32))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, [0]), batch_size=1,
                                         collate_fn=VOCDetection.collate)
    images, labels = next(iter(loader))
    assert images.shape == (1, 3, 32, 40) and voc_as_class_ids(labels[0]) == [DOG, PERSON]


def test_voc_missing_directory(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="VOCdevkit/VOC2007") as info:
        get_dataset("voc_2007", "test", dataset_dir=tmp_path / "nowhere")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    make_voc(tmp_path, subset="test")
    with pytest.raises(DatasetNotFoundError, match="trainval.txt"):
        get_dataset("voc_2007", "trainval", dataset_dir=tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        get_dataset("voc2007", "test", dataset_dir=tmp_path)
    with pytest.raises(ValueError, match="subset must be one of"):
        get_dataset("voc_2007", "val2014", dataset_dir=tmp_path)
    with pytest.raises(ValueError, match="download=True is only supported"):
        get_dataset("coco", "val2014", dataset_dir=tmp_path, download=True)
    with pytest.raises(TypeError, match="transform must be callable"):
        get_dataset("imagenet", "val", dataset_dir=tmp_path, transform=3)
    with pytest.raises(TypeError, match="PASCAL VOC label"):
        voc_as_class_ids([{"category_id": 1}])
    label = {"annotation": {"size": {"width": "4", "height": "3"}, "object": []}}
    with pytest.raises(ValueError, match=r"class_id must be in \[0, 20\)"):
        voc_as_mask(label, 20)
    with pytest.raises(TypeError, match="class_id must be an int"):
        voc_as_mask(label, "dog")
    with pytest.raises(ValueError, match="not one of the 20 VOC_CLASSES"):
        voc_as_class_ids({"annotation": {"object": [{"name": "unicorn"}]}})
    with pytest.raises(ValueError, match="no valid 'size'"):
        voc_as_image_size({"annotation": {}})


def test_hand_made_voc_label():
    """A single object given as a dict (not a list) is accepted too."""
    label = {"annotation": {"size": {"width": "10", "height": "5"},
                            "object": {"name": "cat", "difficult": "0",
                                       "bndbox": {"xmin": "1", "ymin": "1", "xmax": "2",
                                                  "ymax": "5"}}}}
    assert voc_as_class_ids(label) == [CAT]
    assert int(voc_as_mask(label, CAT).sum()) == 10


def test_default_dir_from_config(monkeypatch, tmp_path):
    """Without dataset_dir, torchray_like.utils.get_config()['voc_dir'] is used if set."""
    utils = pytest.importorskip("torchray_like.utils")
    monkeypatch.setattr(utils, "get_config", lambda: {"voc_dir": None}, raising=False)
    with pytest.raises(ValueError, match="dataset_dir is required"):
        get_dataset("voc_2007", "test")
    make_voc(tmp_path)
    monkeypatch.setattr(utils, "get_config", lambda: {"voc_dir": str(tmp_path)}, raising=False)
    assert len(get_dataset("voc_2007", "test")) == 3


# ----------------------------------------------------------------------- COCO


def test_coco_load_ids_sizes_masks(coco):
    assert isinstance(coco, CocoDetection) and len(coco) == 2
    assert coco.ids == [7, 42]
    image, label = coco[1]
    assert image.size == (64, 48)
    assert isinstance(label, CocoTarget) and isinstance(label, list) and len(label) == 3
    assert label.image_id == 42 and label.image_size == (48, 64)
    assert coco_as_class_ids(label) == [COCO_PERSON, COCO_DOG]
    assert coco_as_image_size(label) == (64, 48) == coco_as_image_size(coco, label)  # (w, h)
    for class_id in (COCO_PERSON, COCO_DOG):
        mask = coco_as_mask(label, class_id)
        assert mask.dtype == torch.bool and mask.shape == (48, 64)
        assert torch.equal(mask, coco_as_mask(coco, label, class_id))
        assert torch.equal(mask, coco.as_mask(label, class_id))
        # pycocotools' own decoding, one annotation at a time, then the union
        expected = np.zeros((48, 64), dtype=bool)
        for annotation in label:
            if annotation["category_id"] == COCO_CATEGORY_IDS[class_id]:
                expected |= coco.coco.annToMask(annotation).astype(bool)
        assert np.array_equal(mask.numpy(), expected)
    person = coco_as_mask(label, COCO_PERSON)
    assert bool(person[20, 20]) and bool(person[44, 4]) and not bool(person[5, 50])
    assert 400 <= int(person.sum()) <= 520  # a 20x20 and an 8x7 square, edges included


def test_coco_crowd_rle(coco):
    label = coco.load_label(0)
    assert label.image_id == 7
    crowd = coco_as_mask(label, COCO_PERSON)
    assert int(crowd.sum()) == 10 and bool(crowd[:10, 0].all())
    expected = coco.coco.annToMask(label[1]).astype(bool)
    assert np.array_equal(crowd.numpy(), expected)
    assert coco.image_name(0) == "COCO_val2014_000000000007"


def test_coco_bare_list_needs_size(coco):
    label = list(coco.load_label(1))  # a plain list: no image size attached
    with pytest.raises(ValueError, match="cannot tell the image size"):
        coco_as_mask(label, COCO_DOG)
    assert torch.equal(coco_as_mask(label, COCO_DOG, image_size=(48, 64)),
                       coco_as_mask(coco, label, COCO_DOG))
    assert coco_as_image_size(coco, label) == (64, 48)
    # TorchRay's (width, height) passed as image_size (height, width): the dog's triangle
    # reaches x = 60 in a 48-wide image — refused, not a transposed mask
    with pytest.raises(ValueError, match=r"reach x=60.*coco_as_image_size returns TorchRay's"):
        coco_as_mask(label, COCO_DOG, image_size=coco_as_image_size(coco, label))
    boxed = [dict(a, bbox=[40.0, 5.0, 20.0, 20.0], segmentation=[]) for a in label]
    with pytest.raises(ValueError, match=r"reach x=60, y=25"):
        coco_as_mask(boxed, COCO_DOG, image_size=(64, 48))
    with pytest.raises(ValueError, match="not a COCO category id"):
        coco_as_mask(coco, label, 80)
    with pytest.raises(TypeError, match=r"coco_as_mask\(\) takes"):
        coco_as_mask(label)
    with pytest.raises(ValueError, match="not one of the 80 standard"):
        coco_as_class_ids([{"category_id": 12}])


def test_coco_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="instances_val2014.json"):
        get_dataset("coco", "val2014", dataset_dir=tmp_path)


# --------------------------------------------------------------------- ImageNet


def test_image_folder(tmp_path):
    for k, wnid in enumerate(("n01440764", "n01443537")):
        _jpeg(tmp_path / "val" / wnid / f"img{k}.jpg", 12, 10, k)
    # two of ImageNet's 1000 wnid folders: the labels are positions, not ImageNet indices
    with pytest.warns(UserWarning, match=r"2 of ImageNet's 1000 class folders.*positions 0-1"):
        dataset = get_dataset("imagenet", "val", dataset_dir=tmp_path)
    assert isinstance(dataset, ImageFolder) and len(dataset) == 2
    assert [label for _, label in dataset] == [0, 1]
    assert ImageFolder.as_class_ids(1) == [1]
    with pytest.raises(DatasetNotFoundError, match="train"):
        get_dataset("imagenet", "train", dataset_dir=tmp_path)


def test_image_folder_of_other_classes_does_not_warn(tmp_path):
    for k, name in enumerate(("cat", "dog")):
        _jpeg(tmp_path / "val" / name / f"img{k}.jpg", 12, 10, k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = get_dataset("imagenet", "val", dataset_dir=tmp_path)
    assert dataset.classes == ["cat", "dog"]


def test_public_names():
    for name in ds.__all__:
        assert hasattr(ds, name), name


# ------------------------------------------------------------- malformed files


def _voc_with(tmp_path: Path, name: str, xml: str) -> VOCDetection:
    """The tiny VOC tree with the annotation of ``name`` replaced by ``xml``."""
    make_voc(tmp_path)
    (tmp_path / "VOCdevkit" / "VOC2007" / "Annotations" / f"{name}.xml").write_text(xml)
    return get_dataset("voc_2007", "test", dataset_dir=tmp_path)


@pytest.mark.parametrize("box, problem", [
    ((40, 11, 11, 30), "xmin > xmax"),
    ((11, 30, 40, 11), "ymin > ymax"),
    ((101, 11, 120, 30), "outside the image"),  # the image is 100 px wide
    ((11, -30, 40, 0), "outside the image"),
])
def test_voc_malformed_box_is_refused_naming_file_and_object(tmp_path, box, problem):
    """An inverted or off-image box would give an empty mask: every point a silent miss."""
    objects = [("person", 0, 61, 41, 90, 70), ("dog", 0, *box)]
    voc = _voc_with(tmp_path, "000001", _voc_xml("000001", 100, 80, objects))
    label = voc.load_label(0)
    assert int(voc_as_mask(label, PERSON).sum()) == 30 * 30  # the sound object still works
    with pytest.raises(ds.DatasetFormatError, match=(
            rf"object 2 \('dog'\) in the VOC annotation of image '000001.jpg' has a "
            rf"malformed box \({problem}\): xmin={box[0]}, ymin={box[1]}")) as info:
        voc_as_mask(label, DOG)
    assert isinstance(info.value, ValueError)


def test_voc_box_that_is_not_four_numbers(tmp_path):
    xml = _voc_xml("000003", 80, 80, [("car", 0, 31, 31, 50, 50)]).replace(
        "<xmax>50</xmax>", "<xmax>inf</xmax>")
    voc = _voc_with(tmp_path, "000003", xml)
    with pytest.raises(ds.DatasetFormatError,
                       match=r"object 1 \('car'\) in the VOC annotation of image '000003.jpg' "
                             r"has no valid 'bndbox' \(four finite numbers"):
        voc_as_mask(voc.load_label(2), CAR)


def test_voc_malformed_xml_names_the_file(tmp_path):
    voc = _voc_with(tmp_path, "000002", "<annotation><size><width>60</width>")  # truncated
    path = tmp_path / "VOCdevkit" / "VOC2007" / "Annotations" / "000002.xml"
    for read in (lambda: voc[1], lambda: voc.load_label(1), lambda: ds.voc_load_label(voc, 1)):
        with pytest.raises(ds.DatasetFormatError, match=rf"{path} is not well-formed XML"):
            read()
    path.write_text("<html><body/></html>")
    with pytest.raises(ds.DatasetFormatError, match=r"root element <html>, not <annotation>"):
        voc.load_label(1)
    path.unlink()
    with pytest.raises(DatasetNotFoundError, match=rf"{path} is missing"):
        voc[1]
    assert voc_as_class_ids(voc[0][1]) == [DOG, PERSON]  # the other images still load


def test_voc_getitem_keeps_the_sequence_protocol(voc):
    """Iteration stops on IndexError; the items equal torchvision's."""
    import torchvision

    assert [voc_as_class_ids(label) for _, label in voc] == [[DOG, PERSON], [BOTTLE, CAT], [CAR]]
    with pytest.raises(IndexError, match="index 3 is out of range for a data set of 3"):
        voc[3]
    plain = torchvision.datasets.VOCDetection(voc.root, year="2007", image_set="test")
    assert voc[-1][1] == plain[2][1] and voc[0][0].size == plain[0][0].size
    assert ds.voc_as_image_name(voc[1][1]) == "000002" == voc.image_name(1)
    assert ds.voc_load_label(plain, 2) == voc.load_label(2)  # torchvision's data set too


def test_voc_empty_split(tmp_path):
    make_voc(tmp_path)
    split = tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "test.txt"
    split.write_text("")
    with pytest.raises(DatasetNotFoundError, match=rf"read from {split} has no images"):
        get_dataset("voc_2007", "test", dataset_dir=tmp_path)


@pytest.mark.parametrize("text, error", [
    ('{"images": [{"id": 42, "file_name": "a.jpg", "wid', "JSONDecodeError"),  # truncated
    ("[1, 2, 3]", "AssertionError"),  # JSON, but not a COCO file
    ('{"images": [], "annotations": [{"id": 1}], "categories": []}', "KeyError"),
])
def test_coco_malformed_annotation_file_names_the_path(tmp_path, text, error):
    pytest.importorskip("pycocotools")
    make_coco(tmp_path)
    path = tmp_path / "annotations" / "instances_val2014.json"
    path.write_text(text)
    with pytest.raises(ds.DatasetFormatError,
                       match=rf"COCO annotation file {path} is not a valid COCO instances "
                             rf"file \({error}"):
        get_dataset("coco", "val2014", dataset_dir=tmp_path)


def test_coco_without_images(tmp_path):
    pytest.importorskip("pycocotools")
    make_coco(tmp_path)
    path = tmp_path / "annotations" / "instances_val2014.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(DatasetNotFoundError, match=rf"read from {path} has no images"):
        get_dataset("coco", "val2014", dataset_dir=tmp_path)


def test_coco_public_image_id(coco):
    label = coco.load_label(1)
    assert ds.coco_as_image_id(label) == 42 == ds.coco_as_image_id(list(label))
    assert ds.coco_as_image_id([]) is None


def test_empty_image_folder(tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    with pytest.raises(DatasetNotFoundError, match=rf"the image folder {folder} holds no "
                                                   r"images \(Couldn't find any class folder"):
        get_dataset("imagenet", "val", dataset_dir=tmp_path)
    (folder / "n01440764").mkdir()
    (folder / "n01440764" / "notes.txt").write_text("no image")
    with pytest.raises(DatasetNotFoundError, match=rf"the image folder {folder} holds no "
                                                   r"images \(Found no valid file"):
        get_dataset("imagenet", "val", dataset_dir=tmp_path)
