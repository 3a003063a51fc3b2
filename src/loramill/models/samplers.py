"""Samplers by the names kohya's ``sample_sampler`` uses, as diffusers schedulers built from
the base model's scheduler config (so its betas and prediction type carry over)."""

from __future__ import annotations

from typing import Any

from loramill import LoramillError

# kohya name -> (diffusers scheduler class, extra config). The k_ names are kohya's aliases.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}


def make_sampler(name: str, base_config: Any) -> Any:
    """A kohya sampler name, or a diffusers scheduler class name as it is."""
    import diffusers

    class_name, extra = SAMPLERS.get(name, (name, {}))
    scheduler = getattr(diffusers, class_name, None) if class_name.endswith("Scheduler") else None
    if scheduler is None:
        raise LoramillError(
            f"sampler '{name}': use a diffusers scheduler class or one of {', '.join(SAMPLERS)}"
        )
    return scheduler.from_config(base_config, **extra)
