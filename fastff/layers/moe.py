"""Top-k mixture-of-experts baseline (Switch / GShard style router)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_choice, check_int
from ..functional import ACTIVATIONS, get_activation, straight_through_gate
from ._base import RoutedLayer, batch_mean

# How the chosen experts are weighted: "softmax" (their router probabilities, renormalised for k > 1),
# "straight-through" (each 1/k in value, with the gradient of log probability reaching the router).
MOE_GATES = ("softmax", "straight-through")


class MoE(RoutedLayer):
    """``experts`` MLPs ``in -> expert_width -> out``; a linear router picks the top ``k`` per row.

    ``gate="softmax"``: the chosen experts are weighted by their router softmax probabilities,
    renormalised to sum to 1 when ``k > 1`` (for ``k = 1`` the raw probability is kept so the
    router learns, as in Switch). ``gate="straight-through"``: each chosen expert weighs 1/k in
    value (``straight_through_gate`` of its probability, / k), so a top-1 expert's output is not
    shrunk by an unsure router, while the router still gets the gradient of log probability.
    Only the chosen experts are evaluated (rows grouped per expert).
    x (..., in_features) -> (..., out_features). Parameters: router (Linear in -> E),
    w1 (E, in, H), b1 (E, H), w2 (E, H, out), b2 (E, out).
    """

    _reference = "w1"

    def __init__(self, in_features: int, out_features: int, experts: int, expert_width: int,
                 k: int = 1, activation: str = "gelu", gate: str = "softmax"):
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1)
        self.out_features = check_int("out_features", out_features, 1)
        self.experts = check_int("experts", experts, 1)
        self.expert_width = check_int("expert_width", expert_width, 1)
        self.k = check_int("k", k, 1, experts)
        self.activation = check_choice("activation", activation, tuple(ACTIVATIONS))
        self.gate = check_choice("gate", gate, MOE_GATES)
        E, H = experts, expert_width
        self.router = nn.Linear(in_features, E)
        b_in, b_out = 1 / math.sqrt(in_features), 1 / math.sqrt(H)
        self.w1 = nn.Parameter(torch.empty(E, in_features, H).uniform_(-b_in, b_in))
        self.b1 = nn.Parameter(torch.empty(E, H).uniform_(-b_in, b_in))
        self.w2 = nn.Parameter(torch.empty(E, H, out_features).uniform_(-b_out, b_out))
        self.b2 = nn.Parameter(torch.empty(E, out_features).uniform_(-b_out, b_out))

    @property
    def training_width(self) -> int:
        return self.experts * self.expert_width

    @property
    def neurons_per_inference(self) -> int:
        """Router neurons + the k chosen experts' neurons."""
        return self.experts + self.k * self.expert_width

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.router(x), dim=-1)                  # (B, E)
        gate, chosen = probs.topk(self.k, dim=-1)                      # (B, k)
        if self.gate == "straight-through":
            gate = straight_through_gate(gate) / self.k
        elif self.k > 1:
            gate = gate / gate.sum(-1, keepdim=True)
        act = get_activation(self.activation)
        y = x.new_zeros(x.shape[0], self.out_features)
        order = chosen.flatten().argsort(stable=True)                  # (B·k,) slots grouped by expert
        counts = torch.bincount(chosen.flatten(), minlength=self.experts).tolist()
        for e, slots in enumerate(order.split(counts)):
            if len(slots):
                rows = slots // self.k
                h = act(x[rows] @ self.w1[e] + self.b1[e])
                y = y.index_add(0, rows, gate.flatten()[slots, None] * (h @ self.w2[e] + self.b2[e]))
        if self.training:
            top1 = torch.bincount(chosen[:, 0], minlength=self.experts).to(x.dtype)
            self.aux = {"route_fraction": top1 / max(1, x.shape[0]), "route_prob": batch_mean(probs)}
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, experts={self.experts}, "
                f"expert_width={self.expert_width}, k={self.k}, activation={self.activation!r}, gate={self.gate!r}")
