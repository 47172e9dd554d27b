"""torchray_like: attribution methods for PyTorch convolutional networks.

A clean-room toolkit compatible with TorchRay's public API (rename ``torchray`` to
``torchray_like``): rule contexts and probes in :mod:`torchray_like.attribution.common`, one
module per method in :mod:`torchray_like.attribution`.  The methods' functions are also here, as
a flat namespace::

    import torchray_like as trl
    saliency_map = trl.grad_cam(model, x, category_id)
"""

__version__ = "0.1.0"

from .attribution.ablation_cam import ablation_cam  # noqa: E402
from .attribution.deconvnet import deconvnet  # noqa: E402
from .attribution.eigen_cam import eigen_cam  # noqa: E402
from .attribution.excitation_backprop import contrastive_excitation_backprop, excitation_backprop  # noqa: E402
from .attribution.explain import explain  # noqa: E402
from .attribution.extremal_perturbation import extremal_perturbation  # noqa: E402
from .attribution.grad_cam import grad_cam  # noqa: E402
from .attribution.grad_cam_plus_plus import grad_cam_plus_plus  # noqa: E402
from .attribution.gradient import gradient  # noqa: E402
from .attribution.gradient_x_input import gradient_x_input  # noqa: E402
from .attribution.guided_backprop import guided_backprop  # noqa: E402
from .attribution.guided_grad_cam import guided_grad_cam  # noqa: E402
from .attribution.hires_cam import hires_cam  # noqa: E402
from .attribution.integrated_gradients import integrated_gradients  # noqa: E402
from .attribution.layer_cam import layer_cam  # noqa: E402
from .attribution.linear_approx import linear_approx  # noqa: E402
from .attribution.occlusion import occlusion  # noqa: E402
from .attribution.registry import METHODS  # noqa: E402
from .attribution.rise import rise  # noqa: E402
from .attribution.score_cam import score_cam  # noqa: E402
from .attribution.smooth_grad import smooth_grad  # noqa: E402
from .attribution.xgrad_cam import xgrad_cam  # noqa: E402

__all__ = ["METHODS", "explain", "gradient", "guided_backprop", "deconvnet", "grad_cam",
           "guided_grad_cam", "linear_approx", "excitation_backprop",
           "contrastive_excitation_backprop", "rise", "extremal_perturbation", "gradient_x_input",
           "integrated_gradients", "smooth_grad", "occlusion", "grad_cam_plus_plus", "layer_cam",
           "xgrad_cam", "hires_cam", "eigen_cam", "score_cam", "ablation_cam"]

# Issue 20: layer-wise relevance propagation.
from .attribution.lrp import (  # noqa: E402
                                              LRPContext,
                                              lrp,
                                              lrp_epsilon_alpha2_beta1,
                                              lrp_epsilon_gamma_box,
                                              lrp_epsilon_plus,
                                              lrp_epsilon_plus_flat,
)

__all__ += ["lrp", "LRPContext", "lrp_epsilon_plus", "lrp_epsilon_plus_flat",
            "lrp_epsilon_alpha2_beta1", "lrp_epsilon_gamma_box"]

# Issue 21: transformers (attention rollout / flow, gradient-weighted rollout, CP-LRP, AttnLRP).
from .attribution.attention_rollout import attention_flow, attention_rollout, grad_rollout  # noqa: E402
from .attribution.transformer_lrp import TransformerLRPContext, attn_lrp, cp_lrp  # noqa: E402

__all__ += ["attention_rollout", "attention_flow", "grad_rollout", "attn_lrp", "cp_lrp",
            "TransformerLRPContext"]

# A method called inside torch.inference_mode() (a ValueError and a RuntimeError).
from .attribution.inputs import InferenceModeError  # noqa: E402

__all__ += ["InferenceModeError"]
