"""Hostile cases found in the review of the day's changes (one test per fix)."""

import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

from torchray_like.attribution import METHODS
from torchray_like.attribution.grad_cam import grad_cam
from torchray_like.attribution.integrated_gradients import resolve_baseline, uniform_baseline
from torchray_like.attribution.layer_choice import (
    BranchLayerWarning,
    LayerChoice,
    choose_layer,
    find_contrast_layer,
    find_saliency_layer,
)
from torchray_like.attribution.layer_layout import explicit_layout
from torchray_like.attribution.maps import DegenerateMapWarning, constant_rows, zero_rows


class SharedReLU(nn.Module):
    """One ReLU instance registered in two Sequentials: after a convolution (the path run and
    named) and after a linear layer (registered later, never run)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        act = nn.ReLU()
        self.b = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), act)
        self.a = nn.Sequential(nn.Linear(8, 8), act)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(x).mean((2, 3)))


def test_a_shared_module_is_read_through_the_path_named():
    """The layout of ``"b.1"`` comes from ``b`` (a convolution before it: channels first),
    not from whichever parent a walk of the tree met first (``a``: a linear layer, which read
    the (N, C, H, W) map channels-last, C taken for W)."""
    model, x = SharedReLU().eval(), torch.randn(2, 3, 8, 8)
    assert explicit_layout(model, "b.1", (2, 8, 8, 8), (2, 3, 8, 8)) is False
    torch.testing.assert_close(grad_cam(model, x, [0, 1], saliency_layer="b.1"),
                               grad_cam(model, x, [0, 1], saliency_layer="b.1", tokens=False))


def test_the_automatic_layer_of_an_inference_tensor_is_that_of_its_clone():
    """The layer choice runs the model with autograd (the cut check): an input made under
    ``torch.inference_mode()`` (a data pipeline's) is copied there, not refused with
    PyTorch's RuntimeError about requires_grad on inference tensors; the methods that need its
    gradient still refuse it with their own ValueError."""
    model = SharedReLU().eval()
    with torch.inference_mode():
        x = torch.randn(1, 3, 8, 8)
    assert x.is_inference()
    assert find_saliency_layer(model, x) == find_saliency_layer(model, x.clone()) == "b"
    assert find_contrast_layer(model, x) == "b"
    with pytest.raises(ValueError, match="inference tensor"):
        METHODS["contrastive_excitation_backprop"](model, x, 0)


class FrozenBackbone(nn.Module):
    """A backbone run under ``torch.no_grad()`` in ``forward``, a head that learns."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = self.backbone(x)
        return self.head(f.mean((2, 3)))


def test_a_layer_off_the_graph_is_no_branch():
    """A layer autograd does not record (no_grad in forward) is not said to lie on a branch
    ("a path around it"): no BranchLayerWarning, only the driver's own ValueError, which says
    why its gradient cannot be read."""
    model, x = FrozenBackbone().eval(), torch.randn(1, 3, 8, 8)
    assert choose_layer(model, x) == LayerChoice("backbone", "backbone")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BranchLayerWarning)
        assert find_saliency_layer(model, x) == "backbone"
        with pytest.raises(ValueError, match="torch.no_grad"):
            grad_cam(model, x, 0)


def test_a_zero_gradient_at_a_token_layer_is_said_once():
    """torchvision's ViT starts with a zero head: every gradient is zero.  The driver says so
    (with the causes that apply); the note that the class-token head reads no patch token —
    false here, the first block's patch tokens are read — is not added."""
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        smap = grad_cam(vit, x, 0, saliency_layer="encoder.layers.encoder_layer_0.ln_1")
    said = [str(w.message) for w in heard if issubclass(w.category, DegenerateMapWarning)]
    assert not smap.any() and len(said) == 1, said
    assert "is exactly zero for sample(s) [0, 1]" in said[0]
    # With a head that reads the class token, the patch tokens after the only attention are
    # unread: that note alone.
    with torch.no_grad():
        vit.heads.head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        grad_cam(vit, x, 0, saliency_layer="encoder.layers.encoder_layer_0.mlp")
    said = [str(w.message) for w in heard if issubclass(w.category, DegenerateMapWarning)]
    assert len(said) == 1 and "reads nothing of its patch tokens for sample(s) [0, 1]" in said[0]


def test_the_automatic_layer_of_a_token_model_costs_one_forward_pass():
    """The discovery pass runs with autograd on the first sample and keeps the outputs: the
    token rule reads it instead of running the model again (a ViT-B/16 at 224²: 1.78 s ->
    1.29 s on the first call)."""
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=3).eval()
    runs = []
    handle = vit.register_forward_pre_hook(lambda module, args: runs.append(args[0].shape[0]))
    try:
        name = find_saliency_layer(vit, torch.randn(2, 3, 32, 32))
    finally:
        handle.remove()
    assert name == "encoder.layers.encoder_layer_1.ln_1" and runs == [1]


def test_row_helpers_take_a_scalar_and_an_empty_batch():
    """``zero_rows`` / ``constant_rows`` (public in maps): a 0-d tensor is one sample, an empty
    batch has none (an IndexError and a RuntimeError from reshape before)."""
    assert zero_rows(torch.tensor(0.0)) == [0] and zero_rows(torch.tensor(2.0)) == []
    assert constant_rows(torch.tensor(2.0)) == [0]
    assert zero_rows(torch.empty(0, 3)) == [] and constant_rows(torch.empty(0, 3, 4)) == []
    rows = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    assert zero_rows(rows) == [0] and constant_rows(rows) == [0, 1]


def test_uniform_baseline_takes_the_seeds_resolve_baseline_takes():
    """``uniform_baseline`` (public) with an int, seeds or None draws image by image as
    ``resolve_baseline("uniform", ...)`` does (PyTorch's TypeError about rand() or len()
    before); a wrong count or type is the seeding's own error naming ``generator``."""
    x = torch.randn(2, 3, 4, 4)
    a = uniform_baseline(x, 3)
    assert torch.equal(a, uniform_baseline(x, [3, 4]))
    assert torch.equal(a, resolve_baseline("uniform", x, generator=3))
    assert torch.equal(a[1:], uniform_baseline(x[1:], 4))
    low, high = x.flatten(1).amin(1), x.flatten(1).amax(1)
    assert bool((a.flatten(1).amin(1) >= low).all() and (a.flatten(1).amax(1) <= high).all())
    state = torch.get_rng_state()
    uniform_baseline(x, None)
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError, match="generator has 3 entries but the batch has 2"):
        uniform_baseline(x, [1, 2, 3])
    with pytest.raises(TypeError, match="generator must be"):
        uniform_baseline(x, "seed")


def test_automatic_contrast_layer_of_a_vit_is_the_last_block():
    """A ViT's automatic layer is a token layer (the last block's ln_1), which the residual
    stream goes around: contrastive excitation backprop refused it as its contrast layer, so
    METHODS["contrastive_excitation_backprop"] failed on every ViT.  The automatic contrast
    is now the innermost enclosing block every path crosses (the benchmark's choice for the
    embedded ViT), and the map is that of the explicit call."""
    from torchray_like.benchmark.embedded_models import EMBEDDED_LAYERS, load_embedded_model

    model, x = load_embedded_model("embedded-vit"), torch.randn(2, 3, 64, 64)
    choice = choose_layer(model, x)
    assert choice.name == EMBEDDED_LAYERS["embedded-vit"]["grad_cam"]
    assert choice == LayerChoice(choice.name, choice.name)  # no BranchLayerWarning for tokens
    contrast = find_contrast_layer(model, x)
    assert contrast == EMBEDDED_LAYERS["embedded-vit"]["contrast"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        smap = METHODS["contrastive_excitation_backprop"](model, x, [1, 2])
        explicit = METHODS["contrastive_excitation_backprop"](model, x, [1, 2],
                                                              contrast_layer=contrast)
    assert smap.shape == (2, 1, 64, 64) and float(smap.amax((1, 2, 3)).min()) > 0
    torch.testing.assert_close(smap, explicit)
