"""How ``benchmarks/pointing_game.py`` runs each method: its settings, and the work it shares.

Issue 22 (the main job in under 75 s, with the same table):

* RISE and occlusion explain every class of an image from one set of passes
  (:data:`ALL_CLASSES_ONCE`, :func:`all_classes_once`);
* extremal perturbation optimises the masks of several images in one call
  (:data:`IMAGE_BATCH_ROWS`, :func:`image_batch`), each row with its image's seed;
* the backpropagation methods described as data share one forward pass per image
  (:func:`~torchray_like.attribution.explain.explain`, run by the script).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Container, Dict, List, Mapping, Optional, Sequence

import torch

from ..attribution.registry import METHODS
from .settings import describe_options, options_table
from .shared_passes import ReplayedForward

__all__ = ["CENTER", "ALL_CLASSES_ONCE", "IMAGE_BATCH_ROWS", "method_settings",
           "describe_settings", "all_classes_once", "image_batch"]

#: The centre baseline (no method: it points at the image centre).
CENTER = "center"
#: Methods whose passes serve every class of an image (``all_classes_once``): RISE scores every
#: class with one set of masked passes (one call, no target); occlusion's occluded copies do not
#: depend on the class, so the image's classes are explained one call each with the passes of
#: the first replayed (:class:`~torchray_like.benchmark.shared_passes.ReplayedForward`: the
#: maps of per-class calls, bit for bit, at the cost of one class).  (Attention rollout and
#: flow are class-agnostic too, but their rows stay in one batch: a one-row call rounds
#: differently and moved a point of the table.)
ALL_CLASSES_ONCE = ("rise", "occlusion")
#: Methods run on several images per call on the embedded data set (images of one size): at most
#: this many (image, class) rows per call.  Extremal perturbation optimises every mask on its
#: own with each row's own seed (the masks of per-image calls: bit for bit on the CNNs, within
#: rounding on the ViT), and its iterations' fixed costs are paid once per batch.
IMAGE_BATCH_ROWS = {"extremal_perturbation": 8}


def method_settings(arch: str, network: torch.nn.Module, image_side: int, benchmark: str,
                    published: bool, overrides: Optional[Mapping[str, Any]] = None
                    ) -> Dict[str, Dict[str, Any]]:
    """Per method (and :data:`CENTER`): ``kwargs`` (JSON) for ``METHODS[method]`` from the
    settings table's ``benchmark``, plus how the method is run.

    ``fully_convolutional`` / ``pointing_gradient`` say whether the fully convolutional
    network and the pointing seed are used (``published``: VOC/COCO, the published protocol,
    for the methods that take a ``get_backward_gradient``);
    ``all_classes_once``: the method's passes serve every class of an image
    (:data:`ALL_CLASSES_ONCE`).
    """
    table = options_table(list(METHODS), arch, benchmark, network=network,
                          input_size=image_side, overrides=overrides)
    s: Dict[str, Dict[str, Any]] = {CENTER: {"kwargs": {}}}
    for name, kwargs in table.items():
        s[name] = {"kwargs": kwargs}
        # The published protocol seeds the backpropagation methods with the pointing gradient
        # on the fully convolutional network; the others see the original network.
        seeded = "get_backward_gradient" in inspect.signature(METHODS[name]).parameters
        s[name]["fully_convolutional"] = s[name]["pointing_gradient"] = published and seeded
    if published and table["contrastive_excitation_backprop"]["contrast_layer"] == "avgpool":
        # The fully convolutional ResNet has no avgpool (fc is a 1×1 conv after layer4): the
        # contrast layer of the published setting only exists in the original network.
        s["contrastive_excitation_backprop"]["fully_convolutional"] = False
        s["contrastive_excitation_backprop"]["pointing_gradient"] = False
    for name in ALL_CLASSES_ONCE:
        s[name]["all_classes_once"] = True
    return s


def describe_settings(settings: Mapping[str, Mapping[str, Any]],
                      methods: Sequence[str]) -> List[str]:
    """One line per method: its keyword arguments and how it is run."""
    shown = [m for m in methods if m in settings and m != CENTER]
    lines = describe_options({m: settings[m]["kwargs"] for m in shown})
    out = []
    for method, line in zip(shown, lines):
        extra = [k for k in ("fully_convolutional", "pointing_gradient", "all_classes_once")
                 if settings[method].get(k)]
        out.append(line + (f"  [{', '.join(extra)}]" if extra else ""))
    return out


def all_classes_once(method: str, model: torch.nn.Module, x: torch.Tensor,
                     classes: Sequence[int], options: Mapping[str, Any],
                     seed: int) -> torch.Tensor:
    """``(K, 1, h, w)`` maps of one image ``x`` (``(1, C, *spatial)``) for its ``K`` classes,
    from one set of the method's passes (a method of :data:`ALL_CLASSES_ONCE`)."""
    from ..attribution.rise import rise

    if method not in ALL_CLASSES_ONCE:
        raise ValueError(f"all_classes_once: {method!r} is not one of {ALL_CLASSES_ONCE}")
    if method == "rise":  # every class from one call, then the image's
        return rise(model, x, None, generator=seed, progress=False, **options)[0, list(classes),
                                                                              None]
    shared = ReplayedForward(model)
    maps = []
    for k, c in enumerate(classes):
        if k:
            shared.rewind()
        maps.append(METHODS[method](shared, x, [c], **options))
    return torch.cat(maps)


def image_batch(index: int, stop: int, rows_of: Callable[[int], int], wanted: Container[int],
                cap: int) -> List[int]:
    """The images explained with image ``index`` in one call: ``index``, then the next images
    before ``stop`` that are ``wanted`` and have rows (classes), while the rows fit in ``cap``
    (``index`` always: its rows may exceed it)."""
    images, rows = [index], rows_of(index)
    for j in range(index + 1, stop):
        more = rows_of(j) if j in wanted else 0
        if not more:
            continue  # not this call's (another process's, done) or nothing to explain
        if rows + more > cap:
            break
        images.append(j)
        rows += more
    return images
