"""ReplayedForward (torchray_like.benchmark.shared_passes) and the pointing game's methods whose
passes serve every class of an image (issue 22)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from torchray_like.attribution.occlusion import occlusion
from torchray_like.benchmark.runner import ResultsStore
from torchray_like.benchmark.shared_passes import ReplayedForward

from .conftest import load_benchmark


class Counting(nn.Module):
    """A small CNN counting its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(4))
        self.fc = nn.Linear(8 * 16, 5)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(self.features(x).flatten(1))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _per_class(model, x, classes, **kwargs):
    shared = ReplayedForward(model)
    maps = []
    for k, c in enumerate(classes):
        if k:
            shared.rewind()
        maps.append(occlusion(shared, x, [c], **kwargs))
    return torch.cat(maps), shared


def test_occlusion_of_every_class_at_the_cost_of_one():
    model = Counting().eval()
    x = torch.randn(1, 3, 16, 16)
    classes = [0, 3, 4]
    maps, shared = _per_class(model, x, classes, window=4, stride=2, batch_size=16)
    computed = model.calls
    own = torch.cat([occlusion(model, x, [c], window=4, stride=2, batch_size=16)
                     for c in classes])
    assert torch.equal(maps, own)  # bit for bit
    assert maps.shape == (3, 1, 16, 16) and maps.dtype == torch.float32
    # 49 positions in batches of 16 (4 passes) + the clean pass (+ the layout check's pass):
    # computed once, replayed for the two other classes.
    per_call = (model.calls - computed) // 3
    assert shared.computed == computed == per_call
    assert shared.replayed == 2 * per_call


def test_a_different_input_is_computed():
    model = Counting().eval()
    shared = ReplayedForward(model)
    a, b = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        out_a = shared(a)
        shared.rewind()
        out_b = shared(b)            # same position, other values
        out_a2 = shared(a)           # a position the first round did not reach
    assert torch.equal(out_b, model.fc(model.features(b).flatten(1)))
    assert torch.equal(out_a2, out_a)
    assert (shared.computed, shared.replayed) == (3, 0)
    # Other strides (channels-last) are another input: computed.
    shared.rewind()
    with torch.no_grad():
        shared(a.contiguous(memory_format=torch.channels_last))
    assert (shared.computed, shared.replayed) == (4, 0)


def test_changed_parameters_or_modes_are_computed():
    model = Counting().eval()
    shared = ReplayedForward(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        first = shared(x)
        shared.rewind()
        model.fc.bias.add_(1.0)      # in place: the version counter moves
        second = shared(x)
    assert torch.allclose(second, first + 1.0) and shared.replayed == 0
    shared.rewind()
    model.train()
    with torch.no_grad():
        shared(x)
    assert shared.replayed == 0 and shared.computed == 3


def test_hooks_gradients_and_other_outputs_are_never_replayed():
    model = Counting().eval()
    shared = ReplayedForward(model)
    x = torch.randn(2, 3, 8, 8)
    seen = []
    with torch.no_grad():
        shared(x)
    shared.rewind()
    handle = model.features.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        with torch.no_grad():
            shared(x)
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 8, 4, 4])] and shared.replayed == 0
    shared.rewind()
    out = shared(x.clone().requires_grad_(True))  # grad enabled: the graph is needed
    assert out.grad_fn is not None and shared.replayed == 0
    assert shared.computed == 3


def test_replay_hands_out_a_copy_and_the_budget_bounds_the_record():
    model = Counting().eval()
    shared = ReplayedForward(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        first = shared(x)
        shared.rewind()
        again = shared(x)
        again.zero_()                # the caller's copy: the record is untouched
        shared.rewind()
        third = shared(x)
    assert torch.equal(third, first) and shared.replayed == 2
    nothing = ReplayedForward(model, max_bytes=0)
    with torch.no_grad():
        nothing(x)
        nothing.rewind()
        nothing(x)
    assert (nothing.computed, nothing.replayed) == (2, 0)


@pytest.mark.parametrize("model, max_bytes, error, message", [
    (lambda x: x, 1, TypeError, "model must be a torch.nn.Module, got function"),
    (nn.Identity(), -1, ValueError, "max_bytes must be a non-negative int, got -1"),
    (nn.Identity(), True, ValueError, "max_bytes must be a non-negative int, got True"),
])
def test_bad_arguments(model, max_bytes, error, message):
    with pytest.raises(error, match=message):
        ReplayedForward(model, max_bytes=max_bytes)


# ------------------------------------------------------------------------- the pointing game


def test_pointing_game_explains_every_class_from_one_set_of_passes(tmp_path, capsys):
    """Occlusion's replayed passes give the points of each class's own call; the settings say
    ``all_classes_once``."""
    from torchray_like.attribution.registry import METHODS
    from torchray_like.benchmark.embedded_cli import load_benchmark_model
    from torchray_like.benchmark.embedded_data import EmbeddedShapes
    from torchray_like.benchmark.pointing_game import saliency_to_point

    pg = load_benchmark("pointing_game")
    methods = ["occlusion"]
    assert pg.main(["--weights", "random", "--models", "embedded-vit", "--limit", "3",
                    "--no-report", "--no-progress", "--methods", ",".join(methods),
                    "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for method in methods:
        assert "[all_classes_once]" in next(line for line in out.splitlines()
                                               if line.strip().startswith(method))
    records = {(r["method"], r["index"]): r for r in ResultsStore(
        tmp_path / "results.sqlite", "pointing_game/embedded").records()}
    model, _ = load_benchmark_model("embedded-vit", "random", 0, "coco")
    data = EmbeddedShapes("test", size=3)
    several = 0
    for index in range(3):
        x, label = data[index]
        size = tuple(label["image_size"])
        classes = label["class_ids"].tolist()
        several += len(classes) > 1
        for method in methods:
            own = [list(saliency_to_point(METHODS[method](model, x[None], [c])[0], size))
                   for c in classes]
            assert [p[3] for p in records[(method, index)]["pairs"]] == own, (method, index)
    assert several  # an image with several classes was explained


def test_extremal_perturbation_batches_images_with_their_own_seeds(tmp_path):
    """Several images per extremal-perturbation call: each image's points are those of its own
    call (its batch of classes, its seed), and the call's time is split by rows."""
    from torchray_like.attribution.registry import METHODS
    from torchray_like.benchmark.embedded_cli import load_benchmark_model
    from torchray_like.benchmark.embedded_data import EmbeddedShapes
    from torchray_like.benchmark.pointing_game import saliency_to_point
    from torchray_like.benchmark.settings import method_options

    pg = load_benchmark("pointing_game")
    assert pg.main(["--weights", "random", "--models", "embedded-resnet", "--limit", "4",
                    "--ep-limit", "4", "--ep-iters", "3", "--no-report", "--no-progress",
                    "--methods", "extremal_perturbation", "--out", str(tmp_path)]) == 0
    records = {r["index"]: r for r in ResultsStore(
        tmp_path / "results.sqlite", "pointing_game/embedded").records()}
    model, _ = load_benchmark_model("embedded-resnet", "random", 0, "coco")
    options = dict(method_options("extremal_perturbation", "embedded-resnet", "pointing_game"),
                   max_iter=3)
    data = EmbeddedShapes("test", size=4)
    rows = {}
    for index in range(4):
        x, label = data[index]
        classes = label["class_ids"].tolist()
        rows[index] = len(classes)
        batch = x[None].expand(len(classes), *x.shape).contiguous()
        maps = METHODS["extremal_perturbation"](model, batch, classes, progress=False,
                                                generator=(index * 101) % 2 ** 31, **options)
        own = [list(saliency_to_point(maps[k], tuple(label["image_size"])))
               for k in range(len(classes))]
        assert [p[3] for p in records[index]["pairs"]] == own, index
    # The first call took the images whose classes fit in IMAGE_BATCH_ROWS: one time per row.
    batched = [0]
    for index in range(1, 4):
        if sum(rows[i] for i in batched) + rows[index] > pg.IMAGE_BATCH_ROWS[
                "extremal_perturbation"]:
            break
        batched.append(index)
    assert len(batched) > 1
    per_row = {round(records[i]["seconds"] / rows[i], 9) for i in batched}
    assert len(per_row) == 1


def test_image_batch_takes_the_next_wanted_images_while_their_rows_fit():
    from torchray_like.benchmark.pointing_game_methods import image_batch

    rows = {0: 2, 1: 3, 2: 0, 3: 2, 4: 1, 5: 4}.__getitem__
    assert image_batch(0, 6, rows, {0, 1, 2, 3, 4, 5}, 8) == [0, 1, 3, 4]
    # Another process's images and images without classes are skipped, not counted.
    assert image_batch(0, 6, rows, {0, 3, 5}, 8) == [0, 3, 5]
    assert image_batch(1, 6, rows, {1, 3, 4, 5}, 5) == [1, 3]   # 3 + 2 fits, + 1 does not
    assert image_batch(5, 6, rows, {5}, 2) == [5]               # alone, even over the cap
    assert image_batch(0, 1, rows, {0, 1}, 8) == [0]            # stop: the method's images


def test_all_classes_once_refuses_the_other_methods():
    from torchray_like.benchmark.pointing_game_methods import ALL_CLASSES_ONCE, all_classes_once

    assert ALL_CLASSES_ONCE == ("rise", "occlusion")
    with pytest.raises(ValueError, match=r"all_classes_once: 'grad_cam' is not one of "
                                         r"\('rise', 'occlusion'\)"):
        all_classes_once("grad_cam", Counting().eval(), torch.randn(1, 3, 8, 8), [0], {}, 0)
