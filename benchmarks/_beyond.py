"""The rows of ``benchmarks/speed.py`` for the methods beyond TorchRay's (a private helper module:
nothing to run): integrated gradients, SmoothGrad, occlusion, gradient × input, the CAM family,
Score-CAM, Ablation-CAM and LRP, each against its floor and against the other libraries'
equivalent (:mod:`_references`) at equal work, timed interleaved in the same run.

Floors: forward + ``torch.autograd.grad`` of the same batch for the gradient methods; for the
perturbation methods (occlusion, Score-CAM, Ablation-CAM) the same number of plain forward
passes, batched as the method batches them, under ``torch.no_grad`` on a ready-made batch — the
ratio is then what building the perturbed copies and folding the scores costs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List

import _references as refs
import torch
from _harness import Case, floor_forward, floor_input, floor_layer, frozen

from torchray_like.attribution import METHODS
from torchray_like.attribution.explain import explain
from torchray_like.attribution.occlusion import occlusion_windows
from torchray_like.attribution.probe import get_module

#: Integrated gradients' steps and SmoothGrad's copies in the rows (in one batch).
STEPS = 16
COPIES = 16
#: Masked / ablated / occluded copies per forward pass (ours and the reference's).
CHANNEL_BATCH = 32
#: The gradient-weighted CAMs explain computes from one forward and one backward pass.
GRADIENT_CAMS = ("grad_cam", "grad_cam_plus_plus", "layer_cam", "xgrad_cam", "hires_cam")


def attach(case: Case, found: Dict[str, refs.Ref], use: Dict[str, bool]) -> Case:
    """Put each available reference beside the case (``others``); the missing ones go into the
    row's note (``grad-cam: n/a (not installed)``), so a missing library never hides a row.
    (:func:`drop_failing` then runs each once, before the row is timed.)"""
    notes = [case.note] if case.note else []
    for lib, ref in found.items():
        if not use.get(lib, True):
            continue
        if isinstance(ref, str):
            notes.append(f"{lib}: {ref}")
        else:
            case.others[lib] = ref
    case.note = "; ".join(notes)
    return case


def drop_failing(case: Case) -> Case:
    """Run each reference library's callable of the row once; one that raises (the library
    refuses the model) leaves ``others`` for the note, ``captum: n/a (TypeError: ...)``."""
    for lib in [k for k in case.others if k in refs.LIBRARIES]:
        ref = refs.checked(case.others[lib])
        if isinstance(ref, str):
            del case.others[lib]
            case.note = "; ".join(filter(None, [case.note, f"{lib}: {ref}"]))
    return case


def floor_forwards(model: torch.nn.Module, x: torch.Tensor, count: int, batch: int,
                   clean: bool = True) -> Callable[[], object]:
    """``count`` plain forward passes of copies of ``x[:1]``, ``batch`` at a time, under
    ``no_grad`` (plus one of the clean batch with ``clean``): what a perturbation method with
    ``count`` perturbed copies cannot avoid."""
    full = x[:1].expand(batch, *x.shape[1:]).contiguous()
    sizes = [batch] * (count // batch) + ([count % batch] if count % batch else [])

    def run():
        with frozen(model), torch.no_grad():
            out = [model(x)] if clean else []
            return out + [model(full[:size]) for size in sizes]
    return run


def _use(s: Any) -> Dict[str, bool]:
    return {"captum": s.captum, "grad-cam": s.references, "zennit": s.references}


def gradient_cases(s: Any) -> List[Case]:
    """Gradient × input against forward + grad to the input; integrated gradients (its
    ``n_steps`` in one batch) and SmoothGrad over the gradient (its copies in one batch)
    against forward + grad of that batch — the rest is building the batch and folding the
    gradients (target ≤ 1.10) — and against Captum's ``IntegratedGradients`` (target ≤ 1.05)
    and ``NoiseTunnel(Saliency)`` at the same steps, copies and batch."""
    model, x, target = s.model, s.x, s.target
    n = len(target)
    many = torch.as_tensor(target).repeat_interleave(STEPS)
    use = _use(s)
    ig = Case("integrated_gradients", f"integrated_gradients({STEPS} steps)",
              lambda: METHODS["integrated_gradients"](model, x, target, n_steps=STEPS,
                                                      internal_batch_size=STEPS * n),
              floor_input(model, x.repeat_interleave(STEPS, 0), many),
              f"fwd+grad({STEPS}·N batch)", target_ratio=1.10, ref_target=1.05)
    sg = Case("smooth_grad", f"smooth_grad(gradient, {COPIES} copies)",
              lambda: METHODS["smooth_grad"](model, x, target, n_samples=COPIES,
                                             batch_size=COPIES * n, generator=0),
              floor_input(model, x.repeat_interleave(COPIES, 0), many),
              f"fwd+grad({COPIES}·N batch)", target_ratio=1.10, ref_target=1.05)
    return [
        Case("gradient_x_input", "gradient_x_input",
             lambda: METHODS["gradient_x_input"](model, x, target),
             floor_input(model, x, target), "fwd+grad(input)"),
        attach(ig, {"captum": refs.captum_integrated_gradients(model, x, target, STEPS,
                                                               STEPS * n)}, use),
        attach(sg, {"captum": refs.captum_smooth_grad(model, x, target, COPIES, 0.15)}, use),
    ]


def occlusion_cases(s: Any) -> List[Case]:
    """Occlusion with its default window (an eighth of each side, stride half of it) against the
    same number of forward passes (target ≤ 1.10), and against Captum's ``Occlusion`` with the
    same window, stride and copies per forward pass."""
    model, x, target = s.model, s.x, s.target
    win, step, grid = occlusion_windows(tuple(x.shape[2:]))
    count = math.prod(grid) * x.shape[0]
    case = Case("occlusion", f"occlusion({win[0]}² window, stride {step[0]})",
                lambda: METHODS["occlusion"](model, x, target, batch_size=CHANNEL_BATCH),
                floor_forwards(model, x, count, CHANNEL_BATCH),
                f"{count} occluded fwd, batch {CHANNEL_BATCH}", target_ratio=1.10, heavy=True)
    return [attach(case, {"captum": refs.captum_occlusion(model, x, target, win[0], step[0],
                                                          CHANNEL_BATCH)}, _use(s))]


def channel_cases(s: Any) -> List[Case]:
    """Score-CAM and Ablation-CAM (one forward pass per channel of the layer, ``CHANNEL_BATCH``
    copies per pass) against the same forward passes (target ≤ 1.10) and against
    pytorch-grad-cam's ``ScoreCAM`` / ``AblationCAM`` on the same layer with the same batch
    size (target: faster, < 1).  Our maps are resized to the input, as pytorch-grad-cam's."""
    model, x, target = s.model, s.x, s.target
    layer = s.options["score_cam"]["saliency_layer"]
    module = get_module(model, layer)
    with torch.no_grad():  # the layer's channels
        box: List[torch.Tensor] = []
        handle = module.register_forward_hook(lambda m, i, o: box.append(o))
        try:
            model(x[:1])
        finally:
            handle.remove()
    count = box[0].shape[1] * x.shape[0]
    floor = floor_forwards(model, x, count, CHANNEL_BATCH)
    floor_name = f"1+{count} fwd, batch {CHANNEL_BATCH}"
    cases = []
    for method in ("score_cam", "ablation_cam"):
        case = Case(method, f"{method}({layer}, batch {CHANNEL_BATCH})",
                    lambda m=method: METHODS[m](model, x, target, saliency_layer=layer,
                                                batch_size=CHANNEL_BATCH, resize=True),
                    floor, floor_name, target_ratio=1.10, ref_target=1.0, heavy=True,
                    note="" if method == "score_cam" else
                    "the layers below run on one copy per batch: under the floor by design")
        cases.append(attach(case, {"grad-cam": refs.grad_cam_method(
            method, model, x, target, module, CHANNEL_BATCH)}, _use(s)))
    return cases


def cam_cases(s: Any) -> List[Case]:
    """The gradient-weighted CAMs against forward + grad to their layer, and pytorch-grad-cam's
    class for each (its maps come resized and normalised: ours are timed with ``resize=True``);
    Eigen-CAM against one forward pass; and the five gradient CAMs from one :func:`explain`
    against one Grad-CAM call (target ≤ 1.3: one forward, one backward, five cheap maps)."""
    model, x, target = s.model, s.x, s.target
    layer = s.options["grad_cam"]["saliency_layer"]
    module = get_module(model, layer)
    at_layer = floor_layer(model, x, target, layer)
    use = _use(s)
    cases = []
    for method in GRADIENT_CAMS[1:] + ("eigen_cam",):
        eigen = method == "eigen_cam"
        case = Case(method, method,
                    lambda m=method: METHODS[m](model, x, target, saliency_layer=layer,
                                                resize=True),
                    floor_forward(model, x) if eigen else at_layer,
                    "fwd" if eigen else f"fwd+grad({layer})",
                    target_ratio=1.10)
        cases.append(attach(case, {"grad-cam": refs.grad_cam_method(method, model, x, target,
                                                                   module)}, use))
    cases.append(Case(
        "grad_cam_plus_plus", "explain(5 gradient CAMs) vs 1 grad_cam",
        lambda: explain(model, x, target, GRADIENT_CAMS,
                        {name: {"saliency_layer": layer} for name in GRADIENT_CAMS}),
        lambda: METHODS["grad_cam"](model, x, target, saliency_layer=layer), "grad_cam call",
        target_ratio=1.3))
    return cases


#: The LRP rows: (method, its composite as the row says it).
LRP_ROWS = (("lrp", "EpsilonPlusFlat"), ("lrp_epsilon_plus", "EpsilonPlus"),
            ("lrp_epsilon_gamma_box", "EpsilonGammaBox"),
            ("lrp_epsilon_alpha2_beta1", "EpsilonAlpha2Beta1"))
#: LRP's target against forward + grad to the input, per composite: 1.1 × the products its rules
#: need per layer over the floor's F + B (F the layer's forward product, B its transposed one, of
#: about the same cost).  z⁺ (EpsilonPlus, EpsilonPlusFlat): F + F⁺ + B⁺ — the one extra
#: forward-sized product per rule-modified layer (``op(x, w⁺)``) — 1.5; γ (EpsilonGammaBox):
#: F + F⁺ + 2B, since outputs with z > 0 share by ``w + γw⁺`` and the others by ``w + γw⁻`` —
#: 2.0 (one B where no relevance reaches outputs with z ≤ 0, as behind a ReLU); α-β
#: (EpsilonAlpha2Beta1): F + 2F (``op(x, w⁺)`` and ``op(x, w⁻)``) + 2B — 2.5.  Where the products
#: dominate (224², ``--full``); at 64² the weights' passes and each layer's Python weigh more,
#: and ``benchmarks/lrp_bound.py`` gives what LRP costs there with no interception at all.
LRP_TARGETS = {"EpsilonPlusFlat": 1.65, "EpsilonPlus": 1.65, "EpsilonGammaBox": 2.2,
               "EpsilonAlpha2Beta1": 2.75}


def lrp_cases(s: Any) -> List[Case]:
    """LRP under three standard composites against forward + grad to the input (target
    ≤ ``LRP_TARGETS``: the products of each composite's rules) and against Zennit's
    ``Gradient`` attributor with the same composite and canonizer (target ≤ 1.1), and Captum's
    ``LRP`` (which refuses batch norm and residual models: then the row says so)."""
    model, x, target = s.model, s.x, s.target
    floor = floor_input(model, x, target)
    use = _use(s)
    cases = []
    # (The targets are stated where the products dominate; below 224² the row says so.)
    note = "" if min(x.shape[2:]) >= 224 else "target stated at 224² (--full)"
    for method, composite in LRP_ROWS:
        case = Case(method, f"{method}({composite})",
                    lambda m=method: METHODS[m](model, x, target), floor, "fwd+grad(input)",
                    target_ratio=LRP_TARGETS[composite], ref_target=1.1, ref="zennit", heavy=True,
                    note=note)
        found: Dict[str, refs.Ref] = {"zennit": refs.zennit_lrp(method, model, x, target)}
        if method == "lrp":
            found["captum"] = refs.captum_lrp(model, x, target)
        cases.append(attach(case, found, use))
    return cases


#: The families of this module, in the order of the rows.
BEYOND_CASES = (gradient_cases, occlusion_cases, channel_cases, cam_cases, lrp_cases)

