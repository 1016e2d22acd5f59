"""The constraint methods, each declared once: what it does to a layer (project into a ball / add a penalty
gradient / nothing), in which norm, whether the radii are learned, which knobs a sweep searches, and how the model
card describes it. Selection, config validation, the sweep and the card read this table; a new method is an entry
here plus its math in this package. Plain Python: importing it costs nothing (the config imports it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    name: str
    action: str
    """'project' (into the ball after every update), 'penalty' (a gradient before it), 'decay' (a selective pull
    toward the pretrained weights after every update: SPD), 'loss' (a term of the training loss,
    mars_dist/run/delta.py; its layers are measured only) or 'none'."""
    norm: str
    """'mars' (maximum absolute row sum) or 'l2' (Frobenius)."""
    card: str
    """One sentence for the model card."""
    learned: bool = False
    """The backbone's radii are learned during the run (the head and BatchNorm scales keep fixed ones)."""
    search: dict[str, str] = field(default_factory=dict)
    """Sweep: config key under `constraint.` (dotted for a sub-section) -> the `sweep.` range it is drawn from
    (log-uniform)."""
    head_action: str | None = None
    """The head's action when it differs from the layers' (DELTA: an L2 penalty on the head)."""


_RADII = {"radius": "radius_range", "head_radius": "head_radius_range"}
_SPD = {"spd.strength": "spd_strength_range"}  # a nested key: constraint.spd.strength
_PENALTIES = {"penalty": "penalty_range", "head_penalty": "penalty_range"}

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("mars-pgm", "project", "mars", "MARS-PGM: after every update each layer is projected into a ball around "
           "its pretrained weights in the MARS norm (maximum absolute row sum), ‖W − W0‖_MARS ≤ radius, the new head "
           "into ‖W‖_MARS ≤ head radius (Gouk, Hospedales, Pontil, ICLR 2021)", search=_RADII),
    Method("l2-pgm", "project", "l2", "L2-PGM: after every update each layer is projected into a Frobenius-norm ball "
           "around its pretrained weights, the new head into a ball around zero", search=_RADII),
    Method("mars-sp", "penalty", "mars", "MARS-SP: a MARS-norm penalty on the distance from the pretrained weights",
           search=_PENALTIES),
    Method("l2-sp", "penalty", "l2", "L2-SP: a squared L2 penalty on the distance from the pretrained weights",
           search=_PENALTIES),
    Method("mars-ftp", "project", "mars", "MARS-FTP: as MARS-PGM, with one radius per layer learned during the "
           "fine-tune (Fast Trainable Projection, Tian et al., NeurIPS 2023); the head and BatchNorm scales keep "
           "fixed radii", learned=True, search={"head_radius": "head_radius_range"}),  # backbone radii: learned
    Method("spd", "decay", "l2", "SPD: after every update, a layer whose gradient points away from its pretrained "
           "weights is pulled back toward them by λ times its relative growth in Frobenius distance (Selective "
           "Projection Decay, Tian, Huang, Kira, NeurIPS 2024); the new head toward zero", search=_SPD),
    Method("mars-spd", "decay", "mars", "MARS-SPD: SPD with the growth ratio measured in the MARS norm (maximum "
           "absolute row sum) instead of the Frobenius norm", search=_SPD),
    Method("delta", "loss", "l2", "DELTA: the feature maps of chosen layers kept near the pretrained model's, "
           "weighted per channel by attention measured on the pretrained model, plus an L2 penalty on the head (Li "
           "et al., ICLR 2019)", search={"delta.alpha": "delta_alpha_range", "delta.beta": "delta_beta_range"},
           head_action="penalty"),
    Method("none", "none", "mars", "plain fine-tuning (no constraint; distances are reported for reference)"),
)}


def layer_action(m: Method, role: str) -> str:
    """What is done to one layer of `role` under method `m`: a loss method leaves the weights to the loss."""
    if role == "head" and m.head_action:
        return m.head_action
    return "none" if m.action == "loss" else m.action


def method(name: str) -> Method:
    """The method called `name`; an error listing the valid names otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown constraint method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
