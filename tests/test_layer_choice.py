"""The automatic layer choice (find_saliency_layer, LayerChoice, the branch warning):
its rule, its cache, its state handling, the head the target reaches, cuts."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
import torch.nn as nn

from torchray_like.attribution import layer_choice
from torchray_like.attribution.explain import explain
from torchray_like.attribution.grad_cam import find_saliency_layer, grad_cam
from torchray_like.attribution.guided_grad_cam import guided_grad_cam

from .conftest import assert_same_state, snapshot

# ---------------------------------------------------------------------------------------------
# Automatic layer choice
# ---------------------------------------------------------------------------------------------


class Nested(nn.Module):
    """stem, a nested block returning its last child's tensor, a shared ReLU, a 1×1 pool."""

    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
        self.stem = conv(3, 4, 3, padding=1)
        self.block = nn.Sequential(conv(4, 4, 3, padding=1), nn.ReLU())
        self.shared = nn.ReLU()
        self.pool = pool(1)
        self.fc = nn.Linear(4, 3)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        x = self.shared(self.stem(x))
        x = self.shared(self.block(x))  # 'shared' is called twice: ambiguous, never chosen
        return self.fc(self.pool(x).flatten(1))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_find_saliency_layer_rule(dims):
    torch.manual_seed(0)
    model = Nested(dims).eval()
    x = torch.randn((2, 3) + (5,) * dims)
    # block.1 and block return the very same tensor: the outermost (block) is chosen; 'shared'
    # finishes later but is called twice; 'pool' has one position; 'fc' none.
    assert find_saliency_layer(model, x) == "block"
    smap = grad_cam(model, x, [0, 2])
    torch.testing.assert_close(smap, grad_cam(model, x, [0, 2], "block"))
    assert smap.shape == (2, 1) + (5,) * dims


def test_find_saliency_layer_is_cached_weakly():
    torch.manual_seed(0)
    model = Nested().eval()
    x = torch.randn(2, 3, 6, 6)
    assert find_saliency_layer(model, x) == "block"
    assert model.forwards == 1  # discovery: one forward pass
    grad_cam(model, x, 1)
    grad_cam(model, torch.randn(5, 3, 6, 6), 1)  # other batch size: same cache entry
    assert model.forwards == 3  # no second discovery
    guided_grad_cam(model, x, 1)
    assert model.forwards == 4
    grad_cam(model, torch.randn(2, 3, 7, 7), 1)  # other spatial size: discovered again
    assert model.forwards == 6
    # Structure changed: the cache notices.
    model.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
    grad_cam(model, x, 1)
    assert model.forwards == 8
    # The same module objects under other names (the dotted names change, no identity does):
    # discovered again.
    model.block._modules = {"conv": model.block[0]}
    assert find_saliency_layer(model, x) == "block"
    assert model.forwards == 9
    assert find_saliency_layer(model, x) == "block"
    assert model.forwards == 9
    # The cache does not keep the model alive.
    ref = weakref.ref(model)
    assert model in layer_choice.LAYER_CACHE
    cached = len(layer_choice.LAYER_CACHE)
    del model
    gc.collect()
    assert ref() is None
    assert len(layer_choice.LAYER_CACHE) <= cached - 1


class OtherThread(nn.Module):
    """Runs a spatial module in another thread during its forward (a concurrent user)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.elsewhere = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x)
        worker = threading.Thread(target=lambda: self.elsewhere(x.detach()))
        worker.start()
        worker.join()
        return self.fc(h.mean(dim=(2, 3)))


def test_find_saliency_layer_ignores_other_threads():
    model = OtherThread().eval()
    assert find_saliency_layer(model, torch.randn(1, 3, 5, 5)) == "conv"


def test_find_saliency_layer_none_qualifies():
    model = Nested().eval()
    x = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError, match=r"could not choose saliency_layer automatically.*"
                                         r"pass saliency_layer explicitly"):
        find_saliency_layer(model, x)
    with pytest.raises(ValueError, match="could not choose saliency_layer automatically"):
        grad_cam(model, x, 0)


def test_find_saliency_layer_restores_state_and_rng():
    torch.manual_seed(0)
    model = Nested().train()
    x = torch.randn(2, 3, 6, 6)
    before = snapshot(model, x)
    find_saliency_layer(model, x)
    assert_same_state(before, snapshot(model, x))



# ---------------------------------------------------------------------------------------------
# The automatic layer: before the classifier head, on a head the target reaches, of the
# input's rank (issues 17 items 9 and 16, 18 item 4)


def test_automatic_layer_stops_before_a_class_score_head():
    torch.manual_seed(0)
    # SqueezeNet-like: features, then a 1×1 convolution to 5 class-score maps, ReLU, pooling.
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Dropout(0.5), nn.Conv2d(8, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten())).eval()
    x = torch.randn(2, 3, 8, 8)
    # Not the class maps ("1.1", "1.2"), nor the eval-mode Dropout renaming "0"'s output.
    assert find_saliency_layer(model, x) == "0"
    smap, record = grad_cam(model, x, [1, 3], debug=True)
    assert record.layer == "0"
    torch.testing.assert_close(smap, grad_cam(model, x, [1, 3], saliency_layer="0"))


class TwoHeads(nn.Module):
    """A segmentation net with an auxiliary head computed last, as torchvision's FCN."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.aux_in = nn.Conv2d(3, 8, 3, padding=1)
        self.classifier = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(8, 4, 1))
        self.aux_classifier = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                            nn.Conv2d(8, 4, 1))

    def forward(self, x):
        out = self.classifier(self.backbone(x))
        aux = self.aux_classifier(torch.relu(self.aux_in(x)))
        return {"out": out, "aux": aux}


def test_automatic_layer_on_the_head_the_target_reaches(capsys):
    model = TwoHeads().eval()
    x = torch.randn(2, 3, 8, 8)
    target = lambda out: out["out"][:, 2].sum((1, 2))  # noqa: E731
    # Without a target the rule lands in the auxiliary head, computed last ...
    assert find_saliency_layer(model, x) == "aux_classifier.1"
    # ... which "out" does not reach: the methods choose among the layers it does reach.
    smap, record = grad_cam(model, x, target, debug=True)
    assert record.layer == "classifier.1"
    assert "saliency_layer chosen automatically: 'classifier.1'" in capsys.readouterr().out
    torch.testing.assert_close(smap, grad_cam(model, x, target, saliency_layer="classifier.1"))
    assert torch.equal(explain(model, x, target, ["grad_cam"])["grad_cam"], smap)


def test_automatic_layer_of_a_video_model_has_the_inputs_rank():
    """A video model whose last module outputs (N, heads, tokens, dim) (rank 4 for a 5-D
    input): that is no (T, H, W) map, the last 5-D layer is chosen."""
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, tokens):                                # (N, THW, 4)
            return self.lin(tokens).unflatten(-1, (2, 2)).transpose(1, 2)  # (N, 2, THW, 2)

    class Video(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.stem = nn.Conv3d(3, 4, 3, padding=1)
            self.conv = nn.Conv3d(4, 4, 3, padding=1)
            self.heads = Heads()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            f = torch.relu(self.conv(torch.relu(self.stem(x))))  # (N, 4, T, H, W)
            a = self.heads(f.flatten(2).transpose(1, 2))          # rank 4
            return self.fc(a.mean(2).flatten(1))

    model = Video().eval()
    x = torch.randn(1, 3, 4, 6, 6)
    assert find_saliency_layer(model, x) == "conv"
    assert grad_cam(model, x, 1).shape == (1, 1, 4, 6, 6)


class SkipInForward(nn.Module):
    """Residual sums written in forward: an in-place ``+=`` on a module's output (the skip
    joins the graph *after* the module returned) and a long skip from the stem to the head."""

    def __init__(self, long_skip: bool):
        super().__init__()
        torch.manual_seed(0)
        self.long_skip = long_skip
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        s = self.stem(x)
        h = torch.relu(self.conv1(s))
        out = self.conv2(h)
        out += s                      # conv2's output is a branch: s goes around it
        if self.long_skip:
            out = out + self.stem[0](x)  # stem.0 called twice: no layer qualifies and cuts
        return self.head(out.mean((2, 3)))


@pytest.mark.parametrize("long_skip, cut", [(False, "stem"), (True, None)])
def test_automatic_layer_on_a_branch_warns_naming_the_last_cut(long_skip, cut):
    model, x = SkipInForward(long_skip).eval(), torch.randn(2, 3, 6, 6)
    choice = layer_choice.choose_layer(model, x)
    assert choice == layer_choice.LayerChoice("conv2", cut)
    advice = (rf"'{cut}' is the last layer every path goes through: pass saliency_layer='{cut}'"
              if cut else "no layer that qualifies cuts the network")
    with pytest.warns(layer_choice.BranchLayerWarning, match=rf"'conv2', the last layer that "
                      rf"qualifies, lies on one branch of SkipInForward .*; {advice}"):
        smap = grad_cam(model, x, [0, 1])
    torch.testing.assert_close(smap, grad_cam(model, x, [0, 1], saliency_layer="conv2"))
    assert layer_choice.find_contrast_layer(model, x) == (cut or "conv2")


def test_a_layer_feeding_one_head_whole_is_a_cut():
    """Outputs that do not depend on a layer do not make it a branch: each head's own layers
    cut the network for the output they feed (no warning on TwoHeads' auxiliary head)."""
    model, x = TwoHeads().eval(), torch.randn(1, 3, 8, 8)
    assert layer_choice.choose_layer(model, x) == layer_choice.LayerChoice(
        "aux_classifier.1", "aux_classifier.1")
