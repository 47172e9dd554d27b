"""A sweep of TorchRay's whole public surface against ``torchray_like`` (import renamed).

What it checks
--------------
* **Names and signatures** (runs in CI, without TorchRay): :data:`TORCHRAY_SURFACE` is a frozen
  table of every public name TorchRay 1.0.0.2 defines in each of its modules (walked with
  ``pkgutil.walk_packages``; names re-imported from torch/numpy left out by ``__module__``),
  with parameter names, order and defaults, class methods and properties, and constants.
  :func:`surface_gaps` reads ``torchray_like.<same module path>`` and reports each missing
  module, name, member or parameter, each moved positional parameter and each other default;
  the result must be exactly the keys of :data:`SURFACE_DIFFERENCES` (name -> reason), so a new
  gap fails and a closed one must leave the dict.  Ours may add parameters after TorchRay's.
  TorchRay's ``*args, **kwargs`` wrappers (``gradient``, ``grad_cam``, ...) forward to
  ``saliency``; their positional parameters are checked in ``test_torchray_compat``.
* **Behaviour** (needs TorchRay from ``/tmp/torchray_pkg``; skipped without it): the frozen
  table equals what TorchRay reports, and every helper that runs offline on small synthetic
  inputs is called on both with the same inputs (utils, ``common`` helpers, the
  ``gradient_to_*`` functions, extremal-perturbation rewards / perturbations / mask
  generator, excitation-backprop helpers, RISE, the pointing game, models' transforms and
  surgery, COCO and image-folder data sets written to ``tmp_path``, ``plot_example``): values,
  shapes, dtypes and types agree, or the difference is a key of
  :data:`BEHAVIOUR_DIFFERENCES` and its test asserts that we are right (and loud where
  TorchRay is silently wrong).

What it found (fixed in the package, each its own commit)
-----------------------------------------------------------
``get_dataset`` took ``download`` 4th (TorchRay: ``annotation_dir``, ``transform``,
``limiter``, ``download``) and lacked ``annotation_dir`` / ``limiter``; the data sets lacked
``limiter`` (image folders: round-robin over classes), ``as_image_name``, ``get_image_url``,
``coco_as_image_name``, ``CocoDetection.images`` and ``ImageFolder(full_classes=)``;
``replace_module`` returned the replaced module where TorchRay returns the model (so
``model = replace_module(model, ...)`` silently bound ``model`` to e.g. a ReLU);
``tensor_to_im`` was an alias of ``im_to_numpy`` (TorchRay: ``(N, K, H, W) -> (N*K, 1, H,
W)``); ``resample`` refused TorchRay's ``2x2`` transform; ``MaskGenerator.to`` /
``Perturbation.to`` named their parameter ``device`` (TorchRay: ``dev``).
"""

from __future__ import annotations

import ast
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

BEHAVIOUR_DIFFERENCES = {
    "utils.is_url": "file:// URLs count as URLs (imread reads them); TorchRay: False",
    "utils.get_config": "our keys (root_dir, voc_dir, ...; no MongoDB section)",
    "utils.imsmooth padding": "the documented size, H + 2 * padding (strided: floored / s); "
                              "TorchRay's output with padding > 0 has 2 * padding more",
    "utils.imarraysc spacing": "a border of `spacing` around each tile, as TorchRay's docstring "
                               "says; TorchRay's code leaves `spacing` between tiles only",
    "common.resize_saliency nearest": "works; TorchRay raises (align_corners with 'nearest')",
    "common.get_module unknown": "ValueError naming the modules; TorchRay returns None silently",
    "common.attach_debug_probes": "no probe on the root module (its output is the model's), and "
                                  "an empty dict instead of None when debug is False",
    "common.errors": "ValueError naming the argument where TorchRay raises IndexError, "
                     "AttributeError or RuntimeError (class out of range, no .grad)",
    "extremal.contrastive_reward": "(N,) rewards; TorchRay broadcasts (N,) - (N, 1) to (N, N)",
    "extremal.Perturbation blur": "borders replicated (TorchRay pads with zeros, darkening the "
                                  "border of blurred copies); equal away from the border",
    "extremal.Perturbation.pyramid": "(N, levels, C, H, W) for a batch; TorchRay: (levels, C, H, "
                                     "W) for one image",
    "extremal.MaskGenerator": "its own grid (shape_in, no shape_mid/radius); 'sigmoid' pooling "
                              "refused by name; use generator.shape_in for the parameters",
    "excitation.update_resnet": "returns the model unchanged: the rule context sees the "
                                "residual '+' itself, no EltwiseSum modules needed",
    "rise.target": "an int target gives (N, 1, H, W); TorchRay ignores target and returns all "
                   "classes; TorchRay's rise_class fails on an int target (len() of a 0-d tensor)",
    "rise.values": "another mask draw for the same seed (maps agree in distribution only)",
    "pointing_game.accuracy": "a float, NaN with nothing scored (TorchRay: a 0-d tensor, 0.0); "
                              "counts are int64; str() is a table; a point outside the image is "
                              "a ValueError (TorchRay: a silent miss)",
    "models.get_transform": "'voc'/'coco' use ImageNet statistics like 'imagenet' (our heads sit "
                            "on torchvision backbones); TorchRay applies Caffe preprocessing "
                            "(0..255, mean subtracted, no std) for its Caffe-converted weights; "
                            "an unknown dataset is a ValueError (TorchRay: silently Caffe)",
    "models.replace_module": "in place, returning the model; TorchRay returns a copy whose "
                             "modules off the path are shared with the unchanged original",
    "datasets.VOCDetection": "TorchRay's fails on current torchvision (year=None passed on)",
    "datasets.COCO_CLASSES": "COCO's own names ('motorcycle'); TorchRay uses VOC-style names",
    "datasets.IMAGENET_CLASSES": "torchvision's short names; TorchRay: WordNet synonyms + '\\n'",
    "datasets.coco_as_class_ids": "sorted unique ids; TorchRay: annotation order with repeats",
    "datasets.limiter": "0 and negative limiters refused (TorchRay: 0 = all, -1 = all but last)",
    "resample offset": "TorchRay's numbers; a non-zero offset warns that TorchRay's code maps "
                       "u' = s*u - t while its docstring says + t",
    "benchmark.plot_example": "returns the Figure (TorchRay: None) with a colour bar; titles "
                              "name the category id, not an ImageNet name for every data set",
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


def test_every_difference_has_a_reason_and_a_test():
    for key, reason in {**SURFACE_DIFFERENCES, **BEHAVIOUR_DIFFERENCES}.items():
        assert isinstance(reason, str) and len(reason) > 15, key
    source = Path(__file__).read_text()
    tests = source[source.index("with TorchRay (black" + " box)"):]
    assert [key for key in BEHAVIOUR_DIFFERENCES if f"# {key}" not in tests] == []


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


def _folder(root: Path, counts: dict) -> Path:
    """An image folder ``root/<class>/img<k>.png`` with ``counts[class]`` images."""
    for seed, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for k in range(count):
            pixels = np.random.default_rng(seed * 10 + k).integers(0, 256, (6, 5, 3), np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{k}.png")
    return root


def test_fixed_tensor_to_im_replace_module_and_to_dev():
    from torchray_like.attribution.extremal_perturbation import MaskGenerator, Perturbation
    from torchray_like.benchmark.models import replace_module
    from torchray_like.utils import tensor_to_im

    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    stack = tensor_to_im(x)
    assert stack.shape == (6, 1, 4, 5) and stack.dtype == torch.float32
    assert torch.equal(stack[4, 0], x[1, 1])  # image n, channel k -> n*K + k
    with pytest.raises(ValueError, match=r"\(N, K, H, W\), got \(3, 4, 5\).*im_to_numpy"):
        tensor_to_im(x[0])
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

    _folder(tmp_path / "val", {"a": 3, "b": 1, "c": 2})  # indices a: 0-2, b: 3, c: 4-5
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


@pytest.fixture(scope="module")
def tr():
    """TorchRay's modules by short path (import failures as None); sys.path / sys.modules and
    torch's global RNG are restored afterwards."""
    path, modules, rng = list(sys.path), set(sys.modules), torch.get_rng_state()
    if os.path.isdir(TORCHRAY_PATH):
        sys.path.insert(0, TORCHRAY_PATH)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchRay's deprecation notices
            pytest.importorskip("torchray")
            modules_by_path = {m: importlib.import_module("torchray." + m) for m in (
                "utils", "attribution.common", "attribution.grad_cam",
                "attribution.linear_approx", "attribution.excitation_backprop",
                "attribution.extremal_perturbation", "attribution.rise", "benchmark",
                "benchmark.pointing_game", "benchmark.models", "benchmark.datasets")}
        yield modules_by_path
    finally:
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            if name == "torchray" or name.startswith("torchray."):
                del sys.modules[name]
        torch.set_rng_state(rng)


def ours(module: str):
    return importlib.import_module("torchray_like." + module)


def same(a, b, atol=1e-6) -> bool:
    """Equal type, shape, dtype and values (tensors, arrays, numbers, sequences)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and torch.allclose(a.double(), b.double(), atol=atol, equal_nan=True))
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype
                and np.allclose(a, b, atol=atol))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def test_frozen_table_is_what_torchray_reports(tr):
    """Every module, public name, member, parameter, default and constant of the table."""
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


def test_utils_against_torchray(tr):
    t, o = tr["utils"], ours("utils")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 10, generator=g)
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 7, 3), np.uint8))
    for call in (lambda m: m.im_to_numpy(x[0]), lambda m: m.tensor_to_im(x),
                 lambda m: m.pil_to_tensor(pil), lambda m: m.pil_to_tensor(pil.convert("L")),
                 lambda m: m.imsmooth(x, 1.5), lambda m: m.imsmooth(x, 1.0, stride=2),
                 lambda m: m.imsmooth(x, 1.0, padding=2, padding_mode="replicate"),
                 lambda m: m.resample(x, (16, 20), torch.tensor([[2.0, 0.0], [2.0, 0.0]])),
                 lambda m: (m.is_url("http://a.b/c"), m.is_url("/tmp/x")),
                 lambda m: (m.get_device(), m.get_device(-1))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert same(call(t), call(o), atol=1e-5)
    assert (t.is_url("file:///x"), o.is_url("file:///x")) == (False, True)  # utils.is_url
    assert "mongo" in t.get_config() and "mongo" not in o.get_config()  # utils.get_config
    # utils.imsmooth padding: the documented H + 2 * padding rows
    assert o.imsmooth(x, 1.0, padding=1).shape == (2, 3, 10, 12)
    assert t.imsmooth(x, 1.0, padding=1).shape == (2, 3, 12, 14)
    with pytest.warns(UserWarning, match="docstring says"):  # resample offset
        shifted = o.resample(x, (8, 10), torch.tensor([[0.5, 1.0], [0.5, 0.0]]))
    assert same(shifted, t.resample(x, (8, 10), torch.tensor([[0.5, 1.0], [0.5, 0.0]])))


def test_plotting_helpers_against_torchray(tr):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    shown = []
    for m in (tr["utils"], ours("utils")):
        plt.close("all")
        image, none = m.imsc(x[0], quiet=True)
        tiles, _ = m.imarraysc(x.expand(5, 3, 16, 20), quiet=True)
        _, handle = m.imsc(x[0, :1], lim=[0.2, 0.8])
        shown.append((image, tiles, none, type(handle).__name__, len(plt.gcf().axes)))
        plt.close("all")
    assert same(shown[0][0], shown[1][0]) and same(shown[0][1], shown[1][1])
    assert shown[0][2:] == shown[1][2:] == (None, "AxesImage", 1)
    spaced = [m.imarraysc(x.expand(4, 3, 16, 20), spacing=1, quiet=True)[0].shape
              for m in (tr["utils"], ours("utils"))]  # utils.imarraysc spacing
    assert spaced == [(3, 33, 41), (3, 36, 44)]
    structure = []
    for m in (tr["benchmark"], ours("benchmark")):
        plt.close("all")
        result = m.plot_example(x, x[:, :1], "gradient", 3, show_plot=False)
        structure.append((type(result).__name__, [len(a.images) for a in plt.gcf().axes],
                          plt.gcf().axes[0].get_title()))
        plt.close("all")
    # benchmark.plot_example: ours adds a colour-bar axis and returns the Figure
    assert structure == [("NoneType", [1, 1], "input image"),
                         ("Figure", [1, 1, 0], "input image")]


def test_common_helpers_against_torchray(tr):
    t, o = tr["attribution.common"], ours("attribution.common")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 3, 8, 10, generator=g), torch.randn(2, 5, generator=g)
    y4 = torch.randn(1, 5, 3, 3, generator=g)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), nn.Conv2d(4, 2, 1)))
    for call in (lambda m: m.resize_saliency(x, x[:, :1, :4, :5], (8, 10), "bilinear"),
                 lambda m: m.resize_saliency(x, x[:, :1, :4, :5], True, "bilinear"),
                 lambda m: m.resize_saliency(x, x[:, :1, :4, :5], False, "bilinear"),
                 lambda m: m.get_backward_gradient(y, 3),
                 lambda m: m.get_backward_gradient(y, [1, 2]),
                 lambda m: m.get_backward_gradient(y, torch.tensor([1, 2])),
                 lambda m: m.get_backward_gradient(y, torch.ones(2, 5)),
                 lambda m: m.get_pointing_gradient(y4, 2),
                 lambda m: m.get_pointing_gradient(y4, 2, normalize=False),
                 lambda m: (m.get_module(net, "1.0") is net[1][0], m.get_module(net, net[0])
                            is net[0], m.get_module(net, "") is net)):
        assert same(call(t), call(o))
    leaf = torch.randn(1, 4, 5, 5, generator=g, requires_grad=True)
    (leaf * torch.randn(1, 4, 5, 5, generator=g)).sum().backward()
    pairs = [(t.gradient_to_saliency, o.gradient_to_saliency)] + [
        (getattr(tr[f"attribution.{mod}"], fn), getattr(ours(f"attribution.{mod}"), fn))
        for mod, fn in GRADIENT_TO]
    for theirs_fn, our_fn in pairs:
        assert same(theirs_fn(leaf), our_fn(leaf)) and our_fn(leaf).shape == (1, 1, 5, 5)
    with pytest.raises(ValueError, match="out of range"):  # common.errors
        o.get_backward_gradient(y, 7)
    with pytest.raises(ValueError, match="no .grad"):
        o.gradient_to_saliency(torch.zeros(1, 2, 3, 3))
    assert t.get_module(net, "7") is None  # common.get_module unknown
    with pytest.raises(ValueError, match="no module named '7'"):
        o.get_module(net, "7")
    nearest = o.resize_saliency(x, x[:, :1, :4, :5], (10, 8), "nearest")  # size is (W, H)
    assert torch.equal(nearest, x[:, :1, :4, :5].repeat_interleave(2, 2).repeat_interleave(2, 3))
    with pytest.raises(ValueError, match="align_corners"):  # common.resize_saliency nearest
        t.resize_saliency(x, x[:, :1, :4, :5], (10, 8), "nearest")
    probes = [m.attach_debug_probes(net, debug=True) for m in (t, o)]  # common.attach_debug_probes
    assert list(probes[0]) == ["", *probes[1]] and t.attach_debug_probes(net) is None
    for p in [*probes[0].values(), *probes[1].values()]:
        p.remove()


GRADIENT_TO = [("grad_cam", "gradient_to_grad_cam_saliency"),
               ("linear_approx", "gradient_to_linear_approx_saliency"),
               ("excitation_backprop", "gradient_to_excitation_backprop_saliency"),
               ("excitation_backprop", "gradient_to_contrastive_excitation_backprop_saliency")]


def test_extremal_helpers_against_torchray(tr):
    t, o = tr["attribution.extremal_perturbation"], ours("attribution.extremal_perturbation")
    g = torch.Generator().manual_seed(0)
    scores, x = torch.randn(4, 5, generator=g), torch.rand(1, 3, 40, 40, generator=g)
    mask = torch.rand(2, 1, 40, 40, generator=g)
    for variant in ("preserve", "delete", "dual"):
        assert same(t.simple_reward(scores, 3, variant), o.simple_reward(scores, 3, variant))
        theirs = t.contrastive_reward(scores, 3, variant)  # extremal.contrastive_reward
        assert same(theirs.diagonal() if theirs.dim() == 2 else theirs,
                    o.contrastive_reward(scores, 3, variant).view(-1))
    with pytest.raises(ValueError, match="variant must be one of"):
        o.simple_reward(scores, 3, "sideways")
    fade = [m.Perturbation(x, num_levels=4, type="fade") for m in (t, o)]
    assert same(fade[0].pyramid, fade[1].pyramid[0])  # extremal.Perturbation.pyramid
    assert same(fade[0].apply(mask), fade[1].apply(mask))
    blur = [m.Perturbation(x, num_levels=3, max_blur=2) for m in (t, o)]
    inner = (..., slice(9, -9), slice(9, -9))  # beyond the 4-sigma kernel radius (8 px)
    assert same(blur[0].pyramid[inner], blur[1].pyramid[0][inner])  # extremal.Perturbation blur
    assert not torch.allclose(blur[0].pyramid, blur[1].pyramid[0], atol=1e-3)
    generators = [m.MaskGenerator((16, 20), 4, 3) for m in (t, o)]  # extremal.MaskGenerator
    for generator in generators:
        masks = generator.generate(torch.rand(2, 1, *generator.shape_in, generator=g))
        assert isinstance(masks, tuple) and masks[0].shape == (2, 1, 16, 20)
    with pytest.raises(ValueError, match="sigmoid"):
        o.MaskGenerator((16, 20), 4, 3, pooling_method="sigmoid")


def test_excitation_helpers_and_rise_against_torchray(tr):
    import torchvision

    t, o = tr["attribution.excitation_backprop"], ours("attribution.excitation_backprop")
    a, b = torch.rand(2, 3), torch.rand(2, 3)
    assert same(t.EltwiseSum()(a, b), o.EltwiseSum()(a, b))
    assert same(t.EltwiseSumFunction.apply(a, b), o.EltwiseSumFunction.apply(a, b))
    resnets = [torchvision.models.resnet18(num_classes=3) for _ in range(2)]
    assert t.update_resnet(resnets[0]) is resnets[0] and o.update_resnet(resnets[1]) is resnets[1]
    kinds = [sum(type(m).__name__ == "EltwiseSum" for m in r.modules()) for r in resnets]
    assert kinds == [8, 0]  # excitation.update_resnet
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten()).eval()
    x = torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    t_rise, o_rise = tr["attribution.rise"], ours("attribution.rise")
    every = [m.rise(net, x, num_masks=64, batch_size=16) for m in (t_rise, o_rise)]
    assert every[0].shape == every[1].shape == (1, 4, 16, 20)  # rise.values: other draws
    assert every[0].dtype == every[1].dtype == torch.float32
    assert t_rise.rise(net, x, target=2, num_masks=64).shape == (1, 4, 16, 20)  # rise.target
    one = o_rise.rise(net, x, target=2, num_masks=64, batch_size=16)
    assert torch.allclose(one, every[1][:, 2:3], atol=1e-6)
    with pytest.raises(TypeError, match="len"):
        t_rise.rise_class(net, x, target=2, num_masks=64)
    assert o_rise.rise_class(net, x, target=2, num_masks=64, batch_size=16).shape == \
        (1, 1, 16, 20)


def test_pointing_game_against_torchray(tr):
    t, o = tr["benchmark.pointing_game"], ours("benchmark.pointing_game")
    mask = torch.zeros(20, 30, dtype=torch.bool)
    mask[5:8, 10:14] = True
    games = [m.PointingGame(3, tolerance=3) for m in (t, o)]
    for point in [(1, 1), (12, 6), (29, 19), (0, 0), (16, 9), (17, 9)]:
        assert games[0].evaluate(mask, point) == games[1].evaluate(mask, point), point
    for hit, class_id in [(1, 0), (0, 0), (-1, 1), (1, 2)]:
        for game in games:
            game.aggregate(hit, class_id)
    assert same(games[0].class_accuracies, games[1].class_accuracies)
    assert float(games[0].accuracy) == pytest.approx(games[1].accuracy) == 2 / 3
    empty = [m.PointingGame(2) for m in (t, o)]  # pointing_game.accuracy
    assert isinstance(empty[0].accuracy, torch.Tensor) and float(empty[0].accuracy) == 0.0
    assert isinstance(empty[1].accuracy, float) and np.isnan(empty[1].accuracy)
    assert games[1].hits.dtype == torch.int64
    assert games[0].evaluate(mask, (-1, -1)) == -1
    with pytest.raises(ValueError, match="lies outside the image"):
        games[1].evaluate(mask, (-1, -1))


def test_models_against_torchray(tr):
    t, o = tr["benchmark.models"], ours("benchmark.models")
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8))
    assert same(t.get_transform(size=32)(pil), o.get_transform(size=32)(pil))
    red = Image.new("RGB", (8, 6), (255, 0, 0))  # models.get_transform
    caffe = t.get_transform("voc", size=(6, 8))(red)[:, 0, 0]
    assert torch.allclose(caffe, torch.tensor([255 - 123.68, -116.779, -103.939]))
    assert same(o.get_transform("voc", size=(6, 8))(red), o.get_transform(size=(6, 8))(red))
    with pytest.raises(ValueError, match="dataset must be one of"):
        o.get_transform("foo")
    results = []
    for m in (t, o):  # models.replace_module
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), nn.Conv2d(4, 2, 1)))
        new = m.replace_module(net, "1.0", nn.Identity())
        results.append((repr(new), new is net, type(net[1][0]).__name__, new[1][1] is net[1][1]))
    assert results[0][0] == results[1][0]
    assert results[0][1:] == (False, "ReLU", True) and results[1][1:] == (True, "Identity", True)
    with pytest.raises(ValueError, match="no sub-module '1.7'"):
        o.replace_module(net, "1.7", nn.Identity())


def test_datasets_against_torchray(tr, tmp_path):
    t, o = tr["benchmark.datasets"], ours("benchmark.datasets")
    assert t.VOC_CLASSES == o.VOC_CLASSES
    assert "motorbike" in t.COCO_CLASSES and "motorcycle" in o.COCO_CLASSES  # datasets.COCO_CLASSES
    # datasets.IMAGENET_CLASSES: the same classes in the same order, other spellings
    assert t.IMAGENET_CLASSES[0] == "tench, Tinca tinca\n" and o.IMAGENET_CLASSES[0] == "tench"
    root = make_coco(tmp_path / "coco")
    sets = [m.get_dataset("coco", "val2014", dataset_dir=str(root),
                          annotation_dir=str(root / "annotations")) for m in (t, o)]
    assert len(sets[0]) == len(sets[1]) == 2 and sets[0].images == sets[1].images
    for k in range(2):
        labels = [s[k][1] for s in sets]
        assert list(labels[0]) == list(labels[1])
        ids = [s.as_class_ids(label) for s, label in zip(sets, labels)]
        assert sorted(set(ids[0])) == ids[1]  # datasets.coco_as_class_ids
        for s, label in zip(sets, labels):
            assert s.as_image_size(label) == sets[0].as_image_size(labels[0])
            assert s.as_image_name(label) == t.coco_as_image_name(sets[0], labels[0])
            assert s.get_image_url(k) == sets[0].get_image_url(k)
        for class_id in ids[1]:
            assert same(sets[0].as_mask(labels[0], class_id), sets[1].as_mask(labels[1], class_id))
    limited = [m.get_dataset("coco", "val2014", str(root), str(root / "annotations"), None, 1)
               for m in (t, o)]
    assert len(limited[0]) == len(limited[1]) == 1
    with pytest.raises(ValueError, match="year"):  # datasets.VOCDetection
        t.get_dataset("voc_2007", "test", dataset_dir=str(tmp_path))
    folder = _folder(tmp_path / "folder", {"a": 3, "b": 1, "c": 2})
    for limiter in (None, 2, 4):
        sets = [m.ImageFolder(str(folder), limiter=limiter) for m in (t, o)]
        assert list(sets[0].selection) == sets[1].selection
        assert [sets[0].get_image_url(i) for i in range(len(sets[0]))] == \
            [sets[1].get_image_url(i) for i in range(len(sets[1]))]
    assert len(t.get_dataset("coco", "val2014", str(root), str(root / "annotations"),
                             limiter=0)) == 2  # datasets.limiter
