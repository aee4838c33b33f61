"""Test helper shared by the equality tests of the fast paths."""
import torch


def route_margin(x, w, b, depth):
    """Smallest |pre-activation| (float64) met on each row's hard path through one tree
    (x (B, I), w (M, I), b (M,)) -> (B,). Rows this close to a hyperplane may legitimately route
    differently under float32 rounding, so float32 comparisons skip them."""
    x, w, b = x.double(), w.double(), b.double()
    margin = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    node = torch.zeros(x.shape[0], dtype=torch.long)
    for _ in range(depth):
        a = (x * w[node]).sum(-1) + b[node]
        margin = torch.minimum(margin, a.abs())
        node = 2 * node + 1 + (a >= 0).long()
    return margin


def kept(keep, at_least: int):
    """The row mask ``keep`` (B,) bool (tensor or array), after asserting that it keeps at least
    ``at_least`` rows: a filtered comparison must compare enough rows to mean something."""
    n = int(keep.sum())
    assert n >= at_least, f"the filter kept {n} of {len(keep)} rows, fewer than {at_least}"
    return keep
