"""Architecture sweep of the transformer methods: every method on the vision-transformer variants
users have (tests/transformer_variants.py): no class token (average pooling), DeiT's class and
distillation tokens, register tokens (declared as timm names them, before average-pooled
patches, or under a name no library reads), separate q/k/v projections, explicit softmax or
``F.scaled_dot_product_attention``, LayerNorm or RMSNorm, non-square images and patches, a batch
with one target per sample, float64, a model in train mode with dropout.

Each (method, variant) gives the right map — rollout equal to an independent computation from
the model's own attention (Abnar & Zuidema 2020; Chefer et al. 2021) on the right tokens and
grid, CP-LRP conserving the target score on bias-free variants (Ali et al. 2022), per-sample
maps equal to the maps of the samples run alone — or a ValueError saying what to pass."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.transformer_variants import VariantViT
from torchray_like.attribution.attention_rollout import (
    attention_flow,
    attention_rollout,
    grad_rollout,
)
from torchray_like.attribution.grad_cam import grad_cam
from torchray_like.attribution.gradient import gradient
from torchray_like.attribution.gradient_x_input import gradient_x_input
from torchray_like.attribution.lrp import lrp
from torchray_like.attribution.tokens import TokenLayout, TokenOrderError, has_class_token
from torchray_like.attribution.transformer_lrp import attn_lrp, cp_lrp

pytestmark = pytest.mark.usefixtures("one_thread")

#: The variants by name: VariantViT's keyword arguments.
VARIANTS: Dict[str, Dict[str, Any]] = {
    "cls": {},
    "gap": {"pool": "gap"},
    "deit": {"pool": "distill"},
    "registers": {"registers": 4},
    "gap_registers": {"pool": "gap", "registers": 4},
    "separate_qkv_sdpa": {"qkv": "separate", "attention": "sdpa"},
    "rmsnorm": {"norm": "rms"},
    "non_square": {"image": (32, 48)},
    "non_square_patch": {"image": (32, 48), "patch": (8, 12)},
    "deit_registers_tall": {"pool": "distill", "registers": 4, "image": (48, 32)},
    "layer_scale": {"layer_scale": True},
    "qk_norm_sdpa": {"qk_norm": True, "attention": "sdpa"},
    "swiglu": {"activation": "swiglu"},
}

METHODS: Dict[str, Callable[..., torch.Tensor]] = {
    "attention_rollout": attention_rollout, "attention_flow": attention_flow,
    "grad_rollout": grad_rollout, "attn_lrp": attn_lrp, "cp_lrp": cp_lrp,
    "grad_cam": grad_cam, "gradient": gradient, "lrp": lrp}
TOKEN_METHODS = ("attention_rollout", "attention_flow", "grad_rollout", "grad_cam")


def _image(kwargs: Dict[str, Any]) -> Tuple[int, int]:
    image = kwargs.get("image", 32)
    return (image, image) if isinstance(image, int) else tuple(image)  # type: ignore[return-value]


def _grid(kwargs: Dict[str, Any]) -> Tuple[int, int]:
    patch = kwargs.get("patch", 8)
    patch = (patch, patch) if isinstance(patch, int) else patch
    height, width = _image(kwargs)
    return height // patch[0], width // patch[1]


def _input(kwargs: Dict[str, Any], n: int = 3, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, *_image(kwargs), generator=generator).to(dtype)


def _explicit(kwargs: Dict[str, Any], **extra: Any) -> VariantViT:
    """The variant with its attention written out (the same weights as its sdpa twin)."""
    return VariantViT(**{**kwargs, "attention": "explicit", **extra})


def _kept(model: VariantViT, x: torch.Tensor, target: Optional[List[int]] = None
          ) -> Tuple[List[torch.Tensor], Optional[Tuple[torch.Tensor, ...]]]:
    """Each block's ``(N, H, T, T)`` probabilities, and their gradients of the targets."""
    attentions = [block.attn for block in model.blocks]
    for attention in attentions:
        attention.kept = []
    try:
        with torch.enable_grad():
            y = model(x)
            kept = [attention.kept[0] for attention in attentions]
            grads = None
            if target is not None:
                score = y[torch.arange(len(target)), torch.tensor(target)].sum()
                grads = torch.autograd.grad(score, kept)
    finally:
        for attention in attentions:
            attention.kept = None
    return [k.detach().double() for k in kept], grads


def _readout(matrix: torch.Tensor, kwargs: Dict[str, Any], model: VariantViT,
             mean: Optional[bool] = None) -> torch.Tensor:
    """The class token's row (token 0), or the mean patch row without a class token (or with
    ``mean=True``), on the patch grid: written from the variant's construction, not inferred."""
    prefix = model.num_prefix
    mean = kwargs.get("pool", "cls") == "gap" if mean is None else mean
    row = matrix[:, prefix:].mean(1) if mean else matrix[:, 0]
    return row[:, prefix:].reshape(matrix.shape[0], 1, *_grid(kwargs))


def _reference_rollout(kwargs: Dict[str, Any], x: torch.Tensor,
                       mean: Optional[bool] = None) -> torch.Tensor:
    model = _explicit(kwargs)
    result = None
    for attention in _kept(model, x)[0]:
        fused = attention.mean(1)
        layer = 0.5 * fused + 0.5 * torch.eye(fused.shape[-1], dtype=fused.dtype)
        # the rows are distributions before any row is taken
        assert (layer >= 0).all()
        torch.testing.assert_close(layer.sum(-1), torch.ones(layer.shape[:2], dtype=layer.dtype))
        result = layer if result is None else layer @ result
    assert result is not None
    torch.testing.assert_close(result.sum(-1), torch.ones(result.shape[:2], dtype=result.dtype))
    return _readout(result, kwargs, model, mean)


def _reference_grad_rollout(kwargs: Dict[str, Any], x: torch.Tensor, target: List[int]
                            ) -> torch.Tensor:
    model = _explicit(kwargs)
    attentions, grads = _kept(model, x, target)
    assert grads is not None
    t = attentions[0].shape[-1]
    relevance = torch.eye(t, dtype=torch.float64).expand(x.shape[0], t, t)
    for attention, grad in zip(attentions, grads):
        relevance = relevance + (grad.double() * attention).clamp(min=0).mean(1) @ relevance
    return _readout(relevance, kwargs, model)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_rollout_and_grad_rollout_read_the_right_tokens_and_grid(name):
    """The maps equal the papers' formulas computed from the model's own attention, with the
    readout row and the patch tokens taken from how the variant was built (class token row;
    mean patch row without one; DeiT's distillation token and the registers dropped)."""
    kwargs = VARIANTS[name]
    model, x, target = VariantViT(**kwargs), _input(kwargs), [0, 1, 2]
    want = _reference_rollout(kwargs, x)
    got = attention_rollout(model, x)
    assert got.shape == (3, 1) + _grid(kwargs) and got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=1e-5)
    assert float(got.flatten(1).sum(1).max()) <= 1 + 1e-6  # a part of a distribution
    got = grad_rollout(model, x, target)
    torch.testing.assert_close(got, _reference_grad_rollout(kwargs, x, target).float(),
                               atol=1e-6, rtol=1e-4)


def _call(method: str, model: nn.Module, x: torch.Tensor, target: Any) -> torch.Tensor:
    if method != "lrp":
        return METHODS[method](model, x, target)
    # LRP's composites have no transformer rules: it says so, naming the constructs.
    with pytest.warns(UserWarning, match=r"does not cover \(.*(layer_norm|rms_norm)"):
        return lrp(model, x, target)


@pytest.mark.parametrize("name", ["gap", "deit", "registers", "non_square_patch"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_gives_per_sample_maps_of_the_documented_shape(name, method):
    """A batch of three with one target each: the map of each sample is its map run alone, on
    the patch grid (token methods) or the input (the others); flow refuses a model without a
    class token by name."""
    kwargs = VARIANTS[name]
    model, x = VariantViT(**kwargs), _input(kwargs)
    if method == "attention_flow" and name == "gap":
        with pytest.raises(ValueError, match="attention_flow needs a class token"):
            attention_flow(model, x)
        return
    got = _call(method, model, x, [0, 1, 2])
    shape = _grid(kwargs) if method in TOKEN_METHODS else _image(kwargs)
    assert got.shape == (3, 1) + shape and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    alone = torch.cat([_call(method, model, x[i:i + 1], i) for i in range(3)])
    torch.testing.assert_close(got, alone, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["cls", "gap", "deit", "registers", "separate_qkv_sdpa",
                                  "rmsnorm", "non_square", "layer_scale", "qk_norm_sdpa",
                                  "heads_in_batch"])
def test_cp_lrp_conserves_the_score_on_bias_free_variants(name):
    """Ali et al. 2022: with no biases (nor positional embedding or token values) and a ReLU
    MLP, the input relevance sums to the target score; AttnLRP's softmax rule has a bias
    term, so its sum is only finite (relative gaps 0.3-1.3 on these random models; on the
    LayerScale variant the folded model gives the same maps, see below)."""
    kwargs = {"attention": "bmm"} if name == "heads_in_batch" else VARIANTS[name]
    model = VariantViT(bias=False, activation="relu", **kwargs)
    x = _input(kwargs, 4)
    with torch.no_grad():
        score = model(x)[:, 1]
    torch.testing.assert_close(cp_lrp(model, x, 1).flatten(1).sum(1), score,
                               atol=1e-5, rtol=1e-4)
    attn = attn_lrp(model, x, 1, epsilon=0.0).flatten(1).sum(1)
    assert torch.isfinite(attn).all()


def test_sdpa_and_separate_projections_give_the_explicit_maps():
    """The same weights with ``F.scaled_dot_product_attention`` or the softmax written out:
    the same maps from every attention method."""
    kwargs = VARIANTS["separate_qkv_sdpa"]
    sdpa, explicit, x = VariantViT(**kwargs), _explicit(kwargs), _input(kwargs)
    for method in ("attention_rollout", "grad_rollout", "attn_lrp", "cp_lrp"):
        torch.testing.assert_close(METHODS[method](sdpa, x, [0, 1, 2]),
                                   METHODS[method](explicit, x, [0, 1, 2]),
                                   atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method", list(METHODS))
def test_float64_inputs_give_float64_maps_equal_to_float32(method):
    kwargs = VARIANTS["registers"]
    model = VariantViT(**kwargs)
    x = _input(kwargs, 2)
    want = _call(method, model, x, 1)
    got = _call(method, model.double(), x.double(), 1)
    model.float()
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_a_model_in_train_mode_is_explained_in_eval_mode_and_given_back(attention):
    """Dropout after attention and MLP, attention dropout in the sdpa call: every method
    explains the model in eval mode and gives it back in train mode."""
    model = VariantViT(attention=attention, dropout=0.3)
    x = _input({}, 2)
    for method in METHODS:
        want = _call(method, model.eval(), x, 1)
        model.train()
        got = _call(method, model, x, 1)
        assert all(module.training for module in model.modules()), method
        assert torch.equal(got, want), method


def test_registers_before_average_pooled_patches_are_no_class_token():
    """Registers but no class token (timm's ``class_token=False`` with ``reg_tokens``): the
    rollout reads the mean of the patch rows (it read register 0's row), flow refuses."""
    kwargs = VARIANTS["gap_registers"]
    model, x = VariantViT(**kwargs), _input(kwargs, 2)
    assert has_class_token(model) is False
    with pytest.raises(ValueError, match=r"4 prefix token\(s\) are no class token"):
        attention_flow(model, x)
    model.cls_token = None  # timm's spelling of "no class token": the same answer
    assert has_class_token(model) is False
    torch.testing.assert_close(attention_rollout(model, x),
                               _reference_rollout(kwargs, x).float(), atol=1e-6, rtol=1e-5)


def test_a_class_token_model_that_pools_its_patches_reads_the_mean_row():
    """timm's ``global_pool="avg"`` (BEiT-style heads): the class token exists but the head
    reads the mean of the patch tokens, so the rollout reads their mean row."""
    model, x = VariantViT(), _input({}, 2)
    model.global_pool = "avg"
    rows = _reference_rollout({}, x, mean=True)
    assert has_class_token(model) is False and has_class_token(VariantViT()) is True
    torch.testing.assert_close(attention_rollout(model, x), rows.float(), atol=1e-6, rtol=1e-5)
    assert has_class_token(nn.Linear(2, 2)) is None


def _refused_then_given_the_prefix(model, declared, x, prefix, error, match):
    """The rollout methods refuse ``model``'s token layout with ``error``; given the prefix
    count, their maps are ``declared``'s."""
    for method in (attention_rollout, grad_rollout, attention_flow):
        with pytest.raises(error, match=match):
            method(model, x, 1)
        torch.testing.assert_close(method(model, x, 1, num_prefix_tokens=prefix),
                                   method(declared, x, 1))


def test_undeclared_registers_are_refused_not_guessed_on_a_wrong_grid():
    """A class token (``cls_token``) and eight registers under a name no library reads: 25
    tokens on a 4 × 4 patch grid were read as a 5 × 5 grid of all tokens (the aspect-ratio
    guess ignored the patch stride).  Now a ValueError asks for the prefix; given it, the maps
    equal those of the declared model."""
    hidden = VariantViT(registers=8, register_name="registers")
    declared = VariantViT(registers=8)
    x = _input({}, 2)
    _refused_then_given_the_prefix(hidden, declared, x, 9, ValueError,
                                   r"cannot lay the 25 tokens.*num_prefix_tokens=")
    with pytest.raises(ValueError, match="tokens="):
        grad_cam(hidden, x, 1)
    layout = TokenLayout(prefix=9)
    want = grad_cam(declared, x, 1, saliency_layer="blocks.0")
    assert float(want.abs().max()) > 0
    torch.testing.assert_close(grad_cam(hidden, x, 1, saliency_layer="blocks.0", tokens=layout),
                               want)


def test_undeclared_tokens_are_inferred_from_the_patch_stride():
    """No attribute says the patch size or the prefix tokens (only the convolution's stride):
    four undeclared registers and DeiT's two tokens are found from the shapes alone."""
    x = _input({}, 2)
    for kwargs in ({"registers": 4}, {"pool": "distill"}):
        hidden, declared = VariantViT(declare=False, **kwargs), VariantViT(**kwargs)
        assert not hasattr(hidden.patch_embed, "patch_size")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for method in ("attention_rollout", "grad_rollout", "grad_cam"):
                torch.testing.assert_close(METHODS[method](hidden, x, 1),
                                           METHODS[method](declared, x, 1))


def test_two_dimensional_register_tensors_are_refused_not_guessed():
    """``register_tokens`` of shape ``(R, D)`` (not timm's ``(1, R, D)``) is how vit-pytorch's
    SimpleViT keeps the registers it packs *after* the patch tokens: no prefix layout is
    inferred or guessed (the rollout guessed 4 prefix tokens and read registers as patches);
    given the prefix count (registers first, as here), the maps are the declared model's."""
    declared, x = VariantViT(registers=4), _input({}, 2)
    flat = VariantViT(registers=4, register_name="register_tokens")
    flat.register_tokens = nn.Parameter(flat.register_tokens.detach()[0])
    assert flat.register_tokens.shape == (4, 16) and flat.num_prefix == 5
    _refused_then_given_the_prefix(flat, declared, x, 5, TokenOrderError,
                                   r"register_tokens of shape \(4, 16\).*after")
    with pytest.raises(ValueError, match="tokens=TokenLayout"):
        grad_cam(flat, x, 1)  # the automatic layer choice finds no layer it can read
    with pytest.raises(ValueError, match="after the patch tokens"):
        grad_cam(flat, x, 1, saliency_layer="blocks.0")
    torch.testing.assert_close(
        grad_cam(flat, x, 1, saliency_layer="blocks.0", tokens=TokenLayout(prefix=5)),
        grad_cam(declared, x, 1, saliency_layer="blocks.0"))


def test_class_token_argument_says_what_the_model_does_not():
    """A model that declares nothing (registers before average-pooled patches, under names no
    library reads): token 0 is read as a class token unless ``class_token=False`` says the
    head pools the patches; a bad value is a TypeError by name."""
    kwargs = VARIANTS["gap_registers"]
    hidden, x = VariantViT(declare=False, **kwargs), _input(kwargs, 2)
    assert has_class_token(hidden) is None and hidden.num_prefix == 4
    mean_rows = _reference_rollout(kwargs, x)
    torch.testing.assert_close(attention_rollout(hidden, x, class_token=False),
                               mean_rows.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attention_rollout(hidden, x, class_token=True),
                               _reference_rollout(kwargs, x, mean=False).float(),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_rollout(hidden, x, [0, 1], class_token=False),
                               grad_rollout(VariantViT(**kwargs), x, [0, 1]))
    with pytest.raises(ValueError, match="class_token=True if token 0 is one"):
        attention_flow(hidden, x, class_token=False)
    with pytest.raises(ValueError, match=r"class_token=True, but the tokens are all patches"):
        attention_rollout(VariantViT(pool="gap"), x, class_token=True)
    for method in (attention_rollout, attention_flow):
        with pytest.raises(TypeError, match="class_token must be None"):
            method(hidden, x, class_token="yes")
    with pytest.raises(TypeError, match="class_token must be None"):
        grad_rollout(hidden, x, 1, class_token=1)


def test_heads_folded_into_the_batch_are_refused_by_rollout_and_read_by_the_rest():
    """``(N·H, T, T)`` scores from ``torch.bmm``: the rollout methods cannot tell the heads
    from Swin's windows, so they refuse and say both readings and what to write instead; the
    relevance methods see the same rules as the 4-D attention (the same maps)."""
    model, explicit, x = VariantViT(attention="bmm"), VariantViT(), _input({})
    for method in (attention_rollout, grad_rollout, attention_flow):
        with pytest.raises(ValueError, match=r"batches of \[6\] sequences for 3 image.*"
                                             r"folds its heads into the batch.*\(N, heads, T, T\)"):
            method(model, x, [0, 1, 2])
    for method in ("attn_lrp", "cp_lrp", "grad_cam", "gradient"):
        torch.testing.assert_close(METHODS[method](model, x, [0, 1, 2]),
                                   METHODS[method](explicit, x, [0, 1, 2]),
                                   atol=1e-6, rtol=1e-4)


def test_cp_lrp_names_the_gated_mlp_it_does_not_cover():
    """SwiGLU's product of two activations and its SiLU are outside CP-LRP's rules (Ali et
    al. cover attention, LayerNorm and GELU): a warning names them; AttnLRP covers both
    (the uniform rule and the identity rule) and says nothing."""
    model, x = VariantViT(activation="swiglu"), _input({}, 2)
    with pytest.warns(UserWarning, match=r"mul of two activations ×2, silu ×2"):
        cp_lrp(model, x, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relevance = attn_lrp(model, x, 1)
    assert relevance.shape == (2, 1, 32, 32) and torch.isfinite(relevance).all()


def test_layer_scale_is_a_linear_layer_for_the_relevance_rules():
    """LayerScale ``γ ⊙ f(x)`` (a parameter times an activation) is linear: the relevance
    equals that of the model with ``γ`` folded into the projection before it."""
    kwargs = {"bias": False, "activation": "relu", "layer_scale": True}
    model, folded, x = VariantViT(**kwargs), VariantViT(**kwargs), _input({}, 2)
    with torch.no_grad():
        for block in folded.blocks:
            block.attn.proj.weight.mul_(block.gamma1[:, None])
            block.fc2.weight.mul_(block.gamma2[:, None])
            block.gamma1 = block.gamma2 = None
        torch.testing.assert_close(model(x), folded(x))
    for method in (attn_lrp, cp_lrp):
        torch.testing.assert_close(method(model, x, 1), method(folded, x, 1),
                                   atol=1e-5, rtol=1e-4)


def test_a_hugging_face_config_with_mean_pooling_says_no_class_token_readout():
    """Hugging Face's BEiT keeps its class token but pools the patches
    (``config.use_mean_pooling``): the mean patch row is read."""
    model, x = VariantViT(), _input({}, 2)
    model.config = type("Config", (), {"use_mean_pooling": True})()
    assert has_class_token(model) is False
    torch.testing.assert_close(attention_rollout(model, x),
                               _reference_rollout({}, x, mean=True).float(), atol=1e-6,
                               rtol=1e-5)
    model.config.use_mean_pooling = False
    assert has_class_token(model) is True


def test_a_float64_input_to_a_float32_model_is_refused_by_name():
    model, x = VariantViT(), _input({}, 2, torch.float64)
    for method in METHODS:
        if method == "lrp":
            continue
        with pytest.raises(ValueError, match="input is float64 but the model's parameters "
                                             "are float32"):
            METHODS[method](model, x, 1)


# -- the rules written as detach tricks on the variants (gradient × input of these is the
#    relevance the papers define; cf. tests/transformer_models.ExplicitViT) -----------------

def _epsilon(z: torch.Tensor, rule: str, epsilon: float) -> torch.Tensor:
    if rule != "attnlrp":
        return z  # CP-LRP: LRP-0 on the linear layers, the plain gradient
    ratio = (z / (z + torch.where(z >= 0, epsilon, -epsilon))).detach()
    return z * ratio + (z * (1 - ratio)).detach()


def _half(z: torch.Tensor, rule: str) -> torch.Tensor:
    return 0.5 * z + 0.5 * z.detach() if rule == "attnlrp" else z


def _rule_norm(norm: nn.Module, z: torch.Tensor) -> torch.Tensor:
    if isinstance(norm, nn.LayerNorm):
        centred = z - z.mean(-1, keepdim=True)
        sigma = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps).detach()
        out = centred / sigma * norm.weight
        return out if norm.bias is None else out + norm.bias
    eps = norm.eps if norm.eps is not None else torch.finfo(z.dtype).eps
    return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + eps).detach() * norm.weight


def _rule_block(block: nn.Module, z: torch.Tensor, rule: str, eps: float) -> torch.Tensor:
    def linear(module: nn.Linear, t: torch.Tensor) -> torch.Tensor:
        return _epsilon(F.linear(t, module.weight, module.bias), rule, eps)

    attn, (n, t, d) = block.attn, z.shape
    h = attn.heads
    y = _rule_norm(block.norm1, z)
    if hasattr(attn, "qkv"):
        q, k, v = linear(attn.qkv, y).reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
    else:
        q, k, v = (linear(m, y).reshape(n, t, h, d // h).transpose(1, 2)
                   for m in (attn.q, attn.k, attn.v))
    a = (_half(q @ k.transpose(-2, -1), rule) * (d // h) ** -0.5).softmax(-1)
    a = a.detach() if rule == "cp-lrp" else a
    o = linear(attn.proj, _half(a @ v, rule).transpose(1, 2).reshape(n, t, d))
    z = z + (o if block.gamma1 is None else block.gamma1 * o)
    y = linear(block.fc1, _rule_norm(block.norm2, z))
    g = F.gelu(y)
    if rule == "attnlrp":  # the identity rule: g_x = (y / x) g_y
        g = y * torch.where(y == 0, torch.zeros_like(y), g / torch.where(y == 0, 1, y)).detach()
    o = linear(block.fc2, g)
    return z + (o if block.gamma2 is None else block.gamma2 * o)


def _rule_relevance(model: VariantViT, x: torch.Tensor, target: int, rule: str,
                    eps: float = 1e-6) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    conv = model.patch_embed.proj
    patches = _epsilon(F.conv2d(x, conv.weight, conv.bias, conv.stride), rule, eps)
    n = x.shape[0]
    prefix = [getattr(model, name).reshape(1, -1, patches.shape[1]).expand(n, -1, -1)
              for name in model.prefix_names + model.register_names]
    z = torch.cat(prefix + [patches.flatten(2).transpose(1, 2)], 1) + model.positions
    for block in model.blocks:
        z = _rule_block(block, z, rule, eps)
    z = _rule_norm(model.norm, z)

    def head(module: nn.Linear, t: torch.Tensor) -> torch.Tensor:
        return _epsilon(F.linear(t, module.weight, module.bias), rule, eps)

    if model.pool == "gap":
        y = head(model.head, z[:, model.num_prefix:].mean(1))
    elif model.pool == "distill":
        y = (head(model.head, z[:, 0]) + head(model.head_dist, z[:, 1])) / 2
    else:
        y = head(model.head, z[:, 0])
    (grad,) = torch.autograd.grad(y[:, target].sum(), x)
    return (x * grad).sum(1, keepdim=True).detach()


@pytest.mark.parametrize("name", ["cls", "gap", "deit", "registers", "separate_qkv_sdpa",
                                  "rmsnorm", "non_square_patch", "layer_scale"])
@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
def test_attn_lrp_and_cp_lrp_equal_the_rules_written_out(name, rule):
    """Each variant's relevance equals gradient × input of the same network with the rules
    written as detach tricks (ε on linear layers and the patch embedding, σ held constant in
    LayerNorm and RMSNorm, the uniform rule on q kᵀ and A v, the identity rule on GELU for
    AttnLRP; the attention held constant for CP-LRP): the readout tokens, registers, separate
    projections, sdpa and LayerScale change nothing in the rules."""
    kwargs = VARIANTS[name]
    model, x = VariantViT(**kwargs), _input(kwargs, 2)
    want = _rule_relevance(model, x, 1, rule)
    got = attn_lrp(model, x, 1, rule=rule)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    plain = gradient_x_input(model, x, 1)  # the rules matter on every variant (0.37-0.61)
    assert float((want - plain).norm() / plain.norm()) > 0.1


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_attention_pooling_is_attention_however_it_is_computed(attention):
    """A learned query attending over the tokens (``(N, H, 1, T)`` scores): with an explicit
    softmax the rollout ignored it (and read the mean patch row the head does not read) and
    CP-LRP gave it its plain gradient (a warning, relevance not conserved: 0.95 of the score);
    now both spellings are read as with sdpa: the rollout refuses by name, CP-LRP holds the
    pooling weights constant and conserves the score."""
    model = VariantViT(pool="map", attention=attention, bias=False, activation="relu")
    x = _input({}, 2)
    for method in (attention_rollout, grad_rollout):
        with pytest.raises(ValueError, match=r"\[\(1, 16\), \(16, 16\)\].*attention pooling"):
            method(model, x, 1)
    with torch.no_grad():
        score = model(x)[:, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relevance = cp_lrp(model, x, 1)
    torch.testing.assert_close(relevance.flatten(1).sum(1), score, atol=1e-5, rtol=1e-4)
    other = VariantViT(pool="map", attention="sdpa" if attention == "explicit" else "explicit",
                       bias=False, activation="relu")
    for method in (cp_lrp, attn_lrp):
        torch.testing.assert_close(method(model, x, 1), method(other, x, 1),
                                   atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["deit_registers_tall", "gap_registers", "non_square_patch"])
def test_grad_cam_reads_the_patch_tokens_on_their_grid(name):
    """Grad-CAM at a block: the block's tokens ``(N, P + h·w, D)`` with the P class /
    distillation / register tokens dropped and the patches laid row-major on the (non-square)
    grid, written by hand from the variant's construction (Selvaraju et al. 2017).  The first
    block: after the last one a class-token model's patch tokens have no gradient."""
    kwargs = VARIANTS[name]
    model, x = VariantViT(**kwargs), _input(kwargs)
    seen: List[torch.Tensor] = []
    handle = model.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.enable_grad():
            y = model(x)
            (grad,) = torch.autograd.grad(y[torch.arange(3), torch.tensor([0, 1, 2])].sum(),
                                          seen[0])
    finally:
        handle.remove()
    h, w = _grid(kwargs)

    def on_grid(t: torch.Tensor) -> torch.Tensor:
        return t[:, model.num_prefix:].reshape(3, h, w, -1).permute(0, 3, 1, 2)

    act, grad = on_grid(seen[0].detach()), on_grid(grad)
    want = torch.relu((grad.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True))
    got = grad_cam(model, x, [0, 1, 2], saliency_layer="blocks.0")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    assert float(want.abs().max()) > 0
