"""A sweep of TorchRay's whole public surface against ``torchray_like`` (import renamed).

:data:`TORCHRAY_SURFACE` is a frozen table of every public name TorchRay 1.0.0.2 defines in each
of its modules (walked with ``pkgutil.walk_packages``; names re-imported from torch / numpy left
out by ``__module__``): parameter names, order and defaults, class methods and properties, and
constants.  :func:`surface_gaps` reads ``torchray_like.<same module path>`` and reports every
missing module, name, member or parameter, moved positional parameter and other default; in CI
(no TorchRay) the result must be exactly the keys of :data:`SURFACE_DIFFERENCES` (name ->
reason), so a new gap fails and a closed one must leave the dict.  Ours may add parameters
after TorchRay's.  TorchRay's ``*args, **kwargs`` wrappers (``gradient``, ``grad_cam``, ...)
forward to ``saliency``; their positional use is checked in ``test_torchray_compat``.  With
TorchRay importable (``/tmp/torchray_pkg``, or ``$TORCHRAY_PATH``), the table is checked
against TorchRay itself; ``test_torchray_behaviour_sweep`` compares the helpers' results.

Found and fixed (each its own commit): ``get_dataset`` took ``download`` 4th (TorchRay:
``annotation_dir``, ``transform``, ``limiter``, ``download``); the data sets lacked ``limiter``
(image folders: round-robin over classes), ``as_image_name``, ``get_image_url``,
``coco_as_image_name``, ``CocoDetection.images`` and ``ImageFolder(full_classes=)``;
``voc_as_image_size`` / ``coco_as_image_size`` returned ``(height, width)`` where TorchRay
documents and returns ``(width, height)``; ``replace_module`` returned the replaced module where
TorchRay returns the model; ``tensor_to_im`` was an alias of ``im_to_numpy`` (TorchRay:
``(N, K, H, W) -> (N*K, 1, H, W)``); ``resample`` refused TorchRay's ``2x2`` transform;
``imread`` returned a ``uint8`` ``(H, W, C)`` array (TorchRay: a ``(C, H, W)`` float tensor;
``resize`` pairs are ``(W, H)``) and ``imsc`` refused PIL images;
``MaskGenerator.to`` / ``Perturbation.to`` named their parameter ``device`` (TorchRay: ``dev``);
TorchRay's ``benchmark.aggregate(benchmark.evaluate(...), c)`` loop counted every pair twice
(our ``evaluate`` counts; the second count is now skipped with a warning).  Behaviour
differences kept on purpose are listed in ``test_torchray_behaviour_sweep``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import os
import pkgutil
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from .test_datasets import make_coco

TORCHRAY_PATH = os.environ.get("TORCHRAY_PATH", "/tmp/torchray_pkg")  # absent: skipped

# TorchRay 1.0.0.2's public surface, by module path under ``torchray`` ('' is the package).
# ``None``: the module cannot be imported here (``benchmark.logging`` needs ``bson``).
TORCHRAY_SURFACE: dict = {
    '': {},
    'attribution': {},
    'attribution.common': {
        'NullContext': {'__init__': '()'},
        'Patch': {'__init__': '(target, new_callable)', 'remove': '()', 'resolve': '(target)'},
        'Probe': {'__init__': "(module, target='input')", 'remove': '()'},
        'ReLUContext': {'__init__': '(relu_func)'}, 'attach_debug_probes': '(model, debug=False)',
        'get_backward_gradient': '(pred_y, y)', 'get_module': '(model, module)',
        'get_pointing_gradient': '(pred_y, y, normalize=True)', 'gradient_to_saliency': '(x)',
        'resize_saliency': '(tensor, saliency, size, mode)',
        'saliency': ("(model, input, target, saliency_layer='', resize=False, "
                     "resize_mode='bilinear', smooth=0, context_builder=<NullContext>, "
                     'gradient_to_saliency=<gradient_to_saliency>, '
                     'get_backward_gradient=<get_backward_gradient>, debug=False)'),
    },
    'attribution.deconvnet': {
        'DeConvNetContext': {'__init__': '()'},
        'DeConvNetReLU': {'backward': '(ctx, grad_output)', 'forward': '(ctx, input)'},
        'deconvnet': '(*args, context_builder=<DeConvNetContext>, **kwargs)',
    },
    'attribution.excitation_backprop': {
        'EltwiseSum': {'forward': '(*inputs)'},
        'EltwiseSumFunction': {'backward': '(ctx, grad_output)', 'forward': '(ctx, *inputs)'},
        'ExcitationBackpropContext': {'__init__': '(enable=True, debug=False)'},
        'contrastive_excitation_backprop': ('(model, input, target, saliency_layer, '
                                            'contrast_layer, classifier_layer=None, '
                                            "resize=False, resize_mode='bilinear', "
                                            'get_backward_gradient=<get_backward_gradient>, '
                                            'debug=False)'),
        'excitation_backprop': ('(*args, context_builder=<ExcitationBackpropContext>, '
                                'gradient_to_saliency=<gradient_to_excitation_backprop_saliency>,'
                                ' **kwargs)'),
        'gradient_to_contrastive_excitation_backprop_saliency': '(x)',
        'gradient_to_excitation_backprop_saliency': '(x)', 'update_resnet': '(model, debug=False)',
    },
    'attribution.extremal_perturbation': {
        'BLUR_PERTURBATION': ('str', 'blur'), 'DELETE_VARIANT': ('str', 'delete'),
        'DUAL_VARIANT': ('str', 'dual'), 'FADE_PERTURBATION': ('str', 'fade'),
        'MaskGenerator': {
            '__init__': "(shape, step, sigma, clamp=True, pooling_method='softmax')",
            'generate': '(mask_in)', 'to': '(dev)',},
        'PRESERVE_VARIANT': ('str', 'preserve'),
        'Perturbation': {'__init__': "(input, num_levels=8, max_blur=20, type='blur')",
            'apply': '(mask)', 'to': '(dev)',},
        'contrastive_reward': '(activation, target, variant)',
        'extremal_perturbation': ("(model, input, target, areas=[0.1], perturbation='blur', "
                                  'max_iter=800, num_levels=8, step=7, sigma=21, jitter=True, '
                                  "variant='preserve', print_iter=None, debug=False, "
                                  'reward_func=<simple_reward>, resize=False, '
                                  "resize_mode='bilinear', smooth=0)"),
        'simple_reward': '(activation, target, variant)',
    },
    'attribution.grad_cam': {
        'grad_cam': ('(*args, saliency_layer, '
                     'gradient_to_saliency=<gradient_to_grad_cam_saliency>, **kwargs)'),
        'gradient_to_grad_cam_saliency': '(x)',
    },
    'attribution.gradient': {
        'gradient': '(*args, context_builder=None, **kwargs)',
    },
    'attribution.guided_backprop': {
        'GuidedBackpropContext': {'__init__': '()'},
        'GuidedBackpropReLU': {'backward': '(ctx, grad_output)', 'forward': '(ctx, input)'},
        'guided_backprop': '(*args, context_builder=<GuidedBackpropContext>, **kwargs)',
    },
    'attribution.linear_approx': {
        'gradient_to_linear_approx_saliency': '(x)',
        'linear_approx': ('(*args, gradient_to_saliency=<gradient_to_linear_approx_saliency>, '
                          '**kwargs)'),
    },
    'attribution.rise': {
        'rise': ('(model, input, target=None, seed=0, num_masks=8000, num_cells=7, '
                 "filter_masks=None, batch_size=32, p=0.5, resize=False, resize_mode='bilinear')"),
        'rise_class': '(*args, target, **kwargs)',
    },
    'benchmark': {
        'get_example_data': "(arch='vgg16', shape=224)",
        'plot_example': '(input, saliency, method, category_id, show_plot=False, save_path=None)',
    },
    'benchmark.datasets': {
        'COCO_CLASSES': ('list', 80),
        'CocoDetection': {'__init__': '(root, annFile, *args, limiter=None, **kwargs)',
            'as_class_ids': '(label)', 'as_image_name': '(label)', 'as_image_size': '(label)',
            'as_mask': '(label, class_id)', 'collate': '(batch)', 'get_image_url': '(i)',
            'images': 'property',},
        'IMAGENET_CLASSES': ('list', 1000),
        'ImageFolder': {'__init__': '(*args, limiter=None, full_classes=None, **kwargs)',
            'get_image_url': '(i)',},
        'VOCDetection': {'__init__': '(*args, limiter=None, **kwargs)', 'as_class_ids': '(label)',
            'as_image_name': '(label)', 'as_image_size': '(label)', 'as_mask': '(label, class_id)',
            'collate': '(batch)', 'get_image_url': '(i)',},
        'VOC_CLASSES': ('list', 20), 'coco_as_class_ids': '(label)',
        'coco_as_image_name': '(dataset, label)', 'coco_as_image_size': '(dataset, label)',
        'coco_as_mask': '(dataset, label, class_id)',
        'get_dataset': ('(name, subset, dataset_dir=None, annotation_dir=None, transform=None, '
                        'limiter=None, download=False)'),
        'voc_as_class_ids': '(label)', 'voc_as_image_name': '(label)',
        'voc_as_image_size': '(label)', 'voc_as_mask': '(label, class_id)',
    },
    'benchmark.logging': None,
    'benchmark.models': {
        'base_model_url': ('str', 'https://dl.fbaipublicfiles.com/torchray/'),
        'get_model': "(arch='vgg16', dataset='voc', convert_to_fully_convolutional=False)",
        'get_transform': "(dataset='imagenet', size=224)", 'model_urls': ('dict', 2),
        'replace_module': '(model, module_name, new_module)',
    },
    'benchmark.pointing_game': {
        'PointingGame': {'__init__': '(num_classes, tolerance=15)', 'accuracy': 'property',
            'aggregate': '(hit, class_id)', 'class_accuracies': 'property',
            'evaluate': '(mask, point)', 'reset': '()',},
        'PointingGameBenchmark': {'__init__': '(dataset, tolerance=15, difficult=False)',
            'evaluate': '(label, class_id, point)',},
    },
    'benchmark.server': {
        'run_server': '()',
    },
    'utils': {
        'get_config': '()', 'get_device': '(gpu=0)', 'im_to_numpy': '(tensor)',
        'imarraysc': "(tiles, spacing=0, quiet=False, lim=None, interpolation='lanczos')",
        'imread': '(file, as_pil=False, resize=None, to_rgb=False)',
        'imsc': "(img, *args, quiet=False, lim=None, interpolation='lanczos', **kwargs)",
        'imsmooth': ("(tensor, sigma, stride=1, padding=0, padding_mode='constant', "
                     'padding_value=0)'),
        'is_url': '(obj)', 'pil_to_tensor': '(pil_image)',
        'resample': '(source, target_size, transform)', 'tensor_to_im': '(tensor)',
        'xmkdir': '(path)',
    },
}

# benchmark.logging's functions (read with stand-in bson/pymongo modules): MongoDB helpers.
TORCHRAY_MONGO_LOGGING = ("data_from_mongo", "data_to_mongo", "last_lines", "mongo_connect",
                          "mongo_load", "mongo_save")

SURFACE_DIFFERENCES = {
    "benchmark.server": "TorchRay's MongoDB/HTTP results server (needs pymongo and a database); "
                        "not an attribution feature, so no module: importing it fails loudly",
    "benchmark.models.base_model_url": "nothing is downloaded: get_model reads torchvision's "
                                       "cache or a local state dict (TorchRay's VOC/COCO "
                                       "checkpoints are CC BY-NC and need Caffe inputs)",
    "benchmark.models.model_urls": "as base_model_url",
    "attribution.common.Patch.__init__(new_callable) position":
        "Patch(target, new) works as in TorchRay; Patch(obj, 'name', new) is also accepted, "
        "so new_callable moved behind *args",
    "attribution.common.Patch.__init__(new_callable=)": "a sentinel default tells the forms apart",
    "attribution.common.ReLUContext.__init__(relu_func=)": "default None = plain ReLU (extension)",
    "attribution.common.resize_saliency(mode=)": "default 'bilinear' (extension; TorchRay requires "
                                                 "it)",
    "attribution.excitation_backprop.EltwiseSumFunction.backward(grad_output)":
        "autograd calls backward positionally; the name is internal",
    "attribution.excitation_backprop.excitation_backprop(context_builder=)":
        "None builds ExcitationBackpropContext(signed=signed), TorchRay's default plus 'signed'",
    "attribution.gradient.gradient(context_builder=)":
        "NullContext is what TorchRay's None does (no rule changed); None is accepted too",
    "attribution.extremal_perturbation.extremal_perturbation(areas=)":
        "(0.1,) not [0.1]: the same value, not a shared mutable default",
    "attribution.grad_cam.grad_cam(saliency_layer=)":
        "None picks the last convolutional layer (extension; TorchRay requires it)",
    "attribution.rise.rise(num_masks=)": "None means 8000 (TorchRay's number) or a bank's size",
    "attribution.rise.rise_class(target=)": "None is refused with a ValueError: target is required",
    **{f"benchmark.datasets.{name}": "accepts (label[, class_id]) and TorchRay's (dataset, label"
       "[, class_id]) positionally, so the parameters are *args (by keyword both would clash)"
       for name in ("coco_as_image_size(dataset)", "coco_as_image_size(label)",
                    "coco_as_mask(dataset)", "coco_as_mask(label)", "coco_as_mask(class_id)",
                    "CocoDetection.as_image_size(label)", "CocoDetection.as_mask(label)",
                    "CocoDetection.as_mask(class_id)")},
}

REQUIRED = "<required>"


def _default_text(default: object) -> object:
    if inspect.isclass(default) or inspect.isroutine(default):
        return f"<{default.__name__}>"
    return default


def parse(text: str) -> list:
    """``[(name, kind, default)]`` of a table signature; kind is 'pos', 'kw' or 'var'."""
    tree = ast.parse("def f" + re.sub(r"<(\w+)>", r"'<\1>'", text) + ": pass")
    a = tree.body[0].args
    pos = a.posonlyargs + a.args
    defaults = [REQUIRED] * (len(pos) - len(a.defaults)) + [ast.literal_eval(d)
                                                             for d in a.defaults]
    out = [(p.arg, "pos", d) for p, d in zip(pos, defaults)]
    out += [(a.vararg.arg, "var", None)] if a.vararg else []
    out += [(p.arg, "kw", REQUIRED if d is None else ast.literal_eval(d))
            for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    return out + ([(a.kwarg.arg, "var", None)] if a.kwarg else [])


def params(fn, drop_first: bool) -> list:
    """``[(name, kind, default)]`` of a live callable, encoded as :func:`parse` does."""
    out = []
    for i, p in enumerate(inspect.signature(fn).parameters.values()):
        if i == 0 and drop_first:
            continue
        kind = {p.VAR_POSITIONAL: "var", p.VAR_KEYWORD: "var", p.KEYWORD_ONLY: "kw"}
        out.append((p.name, kind.get(p.kind, "pos"),
                    None if kind.get(p.kind) == "var" else
                    REQUIRED if p.default is p.empty else _default_text(p.default)))
    return out


def compare(key: str, theirs: str, ours: list) -> set:
    """Gaps of our parameters against TorchRay's (ours may add parameters after them)."""
    gaps = set()
    ours_by = {name: (i, kind, d) for i, (name, kind, d) in enumerate(ours)}
    for i, (name, kind, default) in enumerate(parse(theirs)):
        if kind == "var":
            continue
        if name not in ours_by:
            gaps.add(f"{key}({name})")
            continue
        j, our_kind, our_default = ours_by[name]
        if kind == "pos" and (our_kind != "pos" or j != i):
            gaps.add(f"{key}({name}) position")
        if type(default) is not type(our_default) or not default == our_default:
            gaps.add(f"{key}({name}=)")
    return gaps


def is_method(cls: type, member: str) -> bool:
    """Whether ``cls.member`` receives the instance first (a plain function in the class)."""
    return inspect.isfunction(inspect.getattr_static(cls, member))


def _class_gaps(key: str, cls: type, members: dict) -> set:
    gaps = set()
    for member, text in members.items():
        if not hasattr(cls, member):
            gaps.add(f"{key}.{member}")
        elif text != "property":
            gaps |= compare(f"{key}.{member}", text,
                            params(getattr(cls, member), is_method(cls, member)))
    return gaps


def surface_gaps(table: dict, package: str = "torchray_like") -> set:
    """Every gap of ``package`` against a surface table (keys as in SURFACE_DIFFERENCES)."""
    gaps: set = set()
    for module, names in table.items():
        if names is None:
            continue
        try:
            mod = importlib.import_module(package + ("." + module if module else ""))
        except ImportError:
            gaps.add(module)
            continue
        for name, spec in names.items():
            key = f"{module}.{name}"
            if not hasattr(mod, name):
                gaps.add(key)
                continue
            obj = getattr(mod, name)
            if isinstance(spec, tuple):
                kind, value = spec
                if type(obj).__name__ != kind or (obj != value if kind == "str"
                                                  else len(obj) != value):
                    gaps.add(key + "=")
            elif isinstance(spec, dict):
                gaps |= _class_gaps(key, obj, spec)
            else:
                gaps |= compare(key, spec, params(obj, False))
    return gaps


def public_names(module) -> dict:
    """A module's public names defined there (or constants), as TORCHRAY_SURFACE lists them."""
    return {attr: obj for attr, obj in vars(module).items()
            if not attr.startswith("_") and not inspect.ismodule(obj)
            and (isinstance(obj, (str, list, dict, tuple))
                 or getattr(obj, "__module__", None) == module.__name__)}


# ------------------------------------------------------------------- without TorchRay (CI)


def test_our_surface_gaps_are_exactly_the_intentional_ones():
    assert surface_gaps(TORCHRAY_SURFACE) == set(SURFACE_DIFFERENCES)


def test_every_difference_has_a_reason():
    for key, reason in SURFACE_DIFFERENCES.items():
        assert isinstance(reason, str) and len(reason) > 15, key


def test_the_checker_sees_each_kind_of_gap():
    """A hostile stand-in package: every kind of gap is reported under its key."""
    table = {"m": {"f": "(a, b=1, *, c='x')", "g": "(a)", "K": {"__init__": "(a)", "p": "property",
                                                              "m": "(x)"},
                   "S": ("str", "s"), "L": ("list", 2)}, "gone": {}, "skip": None}
    m = type(sys)("fake_pkg.m")
    m.f = lambda b, a=0, *, c="y": None
    m.K = type("K", (), {"__init__": lambda self, b: None, "m": lambda self, x=2: None})
    m.S, m.L = "t", [1]
    sys.modules.update({"fake_pkg": type(sys)("fake_pkg"), "fake_pkg.m": m})
    try:
        gaps = surface_gaps(table, "fake_pkg")
    finally:
        del sys.modules["fake_pkg"], sys.modules["fake_pkg.m"]
    assert gaps == {"gone", "m.g", "m.f(a) position", "m.f(a=)", "m.f(b) position", "m.f(b=)",
                    "m.f(c=)", "m.K.__init__(a)", "m.K.p", "m.K.m(x=)", "m.S=", "m.L="}
    assert parse("(x, *a, y=<F>, **k)") == [("x", "pos", REQUIRED), ("a", "var", None),
                                            ("y", "kw", "<F>"), ("k", "var", None)]


def write_image_folder(root: Path, counts: dict) -> Path:
    """An image folder ``root/<class>/img<k>.png`` with ``counts[class]`` images."""
    for seed, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for k in range(count):
            pixels = np.random.default_rng(seed * 10 + k).integers(0, 256, (6, 5, 3), np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{k}.png")
    return root


def test_fixed_tensor_to_im_imsc_imread_replace_module_and_to_dev(tmp_path):
    from torchray_like.attribution.extremal_perturbation import MaskGenerator, Perturbation
    from torchray_like.benchmark.models import replace_module
    from torchray_like.utils import imread, imsc, tensor_to_im

    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    stack = tensor_to_im(x)
    assert stack.shape == (6, 1, 4, 5) and stack.dtype == torch.float32
    assert torch.equal(stack[4, 0], x[1, 1])  # image n, channel k -> n*K + k
    with pytest.raises(ValueError, match=r"\(N, K, H, W\), got \(3, 4, 5\).*im_to_numpy"):
        tensor_to_im(x[0])
    red = Image.new("RGB", (3, 2), (255, 0, 0))  # imsc takes a PIL image, as TorchRay's
    expected = torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 2, 3)
    assert torch.equal(imsc(red, quiet=True)[0], expected)
    red.save(tmp_path / "red.png")  # imread: TorchRay's (C, H, W) float tensor, resize (W, H)
    assert torch.equal(imread(tmp_path / "red.png"), expected)
    assert imread(tmp_path / "red.png", resize=(6, 4)).shape == (3, 4, 6)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), nn.Conv2d(4, 2, 1)))
    new = nn.Identity()
    assert replace_module(model, "1.0", new) is model and model[1][0] is new
    generator = MaskGenerator((16, 20), 4, 3)
    assert generator.to(dev="cpu") is generator
    perturbation = Perturbation(torch.rand(1, 3, 16, 20), num_levels=2)
    assert perturbation.to(dev="cpu") is perturbation


def test_fixed_resample_takes_torchray_2x2_transforms():
    from torchray_like.utils import resample

    x = torch.rand(1, 2, 4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    up = resample(x, (8, 12), torch.tensor([[2.0, 0.0], [2.0, 0.0]]))
    ours = resample(x, (8, 12), torch.tensor([[0.5, 0, -0.25], [0, 0.5, -0.25]]))
    assert up.shape == (1, 2, 8, 12) and torch.allclose(up, ours, atol=1e-12)
    with pytest.warns(UserWarning, match=r"u' = s\*u - t .*docstring says \+ t"):
        shifted = resample(x, (4, 6), torch.tensor([[1.0, 2.0], [1.0, 0.0]]))
    assert torch.allclose(shifted[..., :4], x[..., 2:], atol=1e-12)  # TorchRay's sign
    assert shifted[..., 4:].abs().max() < 1e-12  # sampled outside the image: zeros
    with pytest.raises(ValueError, match="needs non-zero scales"):
        resample(x, (4, 6), torch.tensor([[0.0, 0.0], [1.0, 0.0]]))


def test_fixed_get_dataset_order_limiter_and_names(tmp_path):
    from torchray_like.benchmark.datasets import coco_as_image_name, get_dataset

    coco = make_coco(tmp_path / "coco")
    (tmp_path / "coco" / "annotations").rename(tmp_path / "ann")
    # TorchRay's positional order: name, subset, dataset_dir, annotation_dir, transform, limiter
    dataset = get_dataset("coco", "val2014", tmp_path / "coco", tmp_path / "ann", None, 1)
    assert len(dataset) == 1 and dataset.images == ["COCO_val2014_000000000007.jpg"]
    label = dataset[0][1]
    assert dataset.as_image_name(label) == coco_as_image_name(dataset, label) == \
        "COCO_val2014_000000000007"
    assert dataset.get_image_url(0) == "COCO_val2014_000000000007.jpg"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="limiter must be None or a positive int"):
            get_dataset("coco", "val2014", coco, tmp_path / "ann", limiter=bad)
    with pytest.raises(ValueError, match="annotation_dir is only used for 'coco'"):
        get_dataset("imagenet", "val", tmp_path, tmp_path / "ann")


def test_fixed_image_folder_round_robin_limiter(tmp_path):
    from torchray_like.benchmark.datasets import ImageFolder, get_dataset

    write_image_folder(tmp_path / "val", {"a": 3, "b": 1, "c": 2})  # indices a: 0-2, b: 3, c: 4-5
    expected = {1: [0], 2: [0, 3], 3: [0, 3, 4], 4: [0, 1, 3, 4], 5: [0, 1, 3, 4, 5],
                7: [0, 1, 2, 3, 4, 5]}  # TorchRay's selections (black-box)
    for limiter, selection in expected.items():
        folder = get_dataset("imagenet", "val", tmp_path, limiter=limiter)
        assert folder.selection == selection and len(folder) == len(selection)
        assert folder.targets == [[0, 0, 0, 1, 2, 2][k] for k in selection]
    folder = ImageFolder(str(tmp_path / "val"), full_classes=["a", "b", "c", "d"])
    assert folder.full_classes == ["a", "b", "c", "d"] and folder.targets == [0, 0, 0, 1, 2, 2]
    assert folder.get_image_url(3) == str(tmp_path / "val" / "b" / "img0.png")
    with pytest.raises(TypeError, match="full_classes must be None or a sequence"):
        ImageFolder(str(tmp_path / "val"), full_classes="abcd")
    with pytest.raises(IndexError, match="out of range for 6 images"):
        folder.get_image_url(6)


# ------------------------------------------------------------------- with TorchRay (black box)


@contextlib.contextmanager
def torchray_on_path():
    """Import TorchRay (skip when absent); sys.path, sys.modules and torch's RNG restored after."""
    path, modules, rng = list(sys.path), set(sys.modules), torch.get_rng_state()
    if os.path.isdir(TORCHRAY_PATH):
        sys.path.insert(0, TORCHRAY_PATH)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchRay's deprecation notices
            pytest.importorskip("torchray")
        yield
    finally:
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            if name == "torchray" or name.startswith("torchray."):
                del sys.modules[name]
        torch.set_rng_state(rng)


@pytest.fixture
def torchray_importable():
    with torchray_on_path():
        yield


def test_frozen_table_is_what_torchray_reports(torchray_importable):
    """Every module, public name, member, parameter, default and constant of the table."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        package = importlib.import_module("torchray")
    walked = {info.name[9:] for info in pkgutil.walk_packages(package.__path__, "torchray.")}
    assert walked | {""} == set(TORCHRAY_SURFACE)
    for module, table in TORCHRAY_SURFACE.items():
        if table is None:
            with pytest.raises(ImportError, match="bson"):
                importlib.import_module("torchray." + module)
            continue
        names = public_names(importlib.import_module(("torchray." + module).rstrip(".")))
        assert set(names) == set(table), module
        for name, spec in table.items():
            obj = names[name]
            if isinstance(spec, tuple):
                assert spec == (("str", obj) if isinstance(obj, str)
                                else (type(obj).__name__, len(obj))), name
            elif isinstance(spec, dict):
                assert {m for m, v in vars(obj).items() if (m == "__init__" or m[0] != "_") and (
                    isinstance(v, (property, staticmethod)) or callable(v))} == set(spec), name
                for member, text in spec.items():
                    if text != "property":
                        assert params(getattr(obj, member), is_method(obj, member)) == \
                            parse(text), (name, member)
            else:
                assert params(obj, False) == parse(spec), name
