"""The gathered-row ops (numba forward and backward) against plain torch autograd over gathers."""
from unittest import mock

import pytest
import torch
from hypothesis import given, strategies as st

from fastff.kernels import gathered
from fastff.kernels.gathered import gathered_combine, gathered_dots

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def dots_reference(x, w, idx):
    return torch.einsum("bi,bsi->bs", x, w[idx])


def combine_reference(c, w, idx):
    return torch.einsum("bs,bso->bo", c, w[idx])


def check(op, reference, v, w, idx, dtype, seed):
    """Values and the gradients of both differentiable inputs equal the reference's."""
    results = []
    for run in (op, reference):
        ts = [t.detach().to(dtype).requires_grad_() for t in (v, w)]
        out = run(*ts, idx)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
        (out * g).sum().backward()
        results.append([out.detach(), *(t.grad if t.grad is not None else torch.zeros_like(t) for t in ts)])
    for got, want in zip(*results):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **TOL[dtype])


@given(rows=st.integers(0, 9), slots=st.integers(0, 5), table=st.integers(1, 7), width=st.integers(1, 9),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**16))
def test_gathered_ops_equal_torch_autograd(rows, slots, table, width, dtype, seed):
    """Repeated indices within and across rows, rows of the table no index uses (zero gradient),
    empty batches and slot counts."""
    gen = torch.Generator().manual_seed(seed)
    used = max(1, table - 2)
    idx = torch.randint(0, used, (rows, slots), generator=gen)
    x = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    w = torch.randn(table, width, generator=gen, dtype=torch.float64)
    c = torch.randn(rows, slots, generator=gen, dtype=torch.float64)
    check(gathered_dots, dots_reference, x, w, idx, dtype, seed)
    check(gathered_combine, combine_reference, c, w, idx, dtype, seed)


@pytest.mark.parametrize("blocks_per_thread", [1, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_rows_per_table_row(blocks_per_thread, dtype):
    """Hundreds of pairs on one table row (as a tree root), one or many row ranges per thread."""
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 30, (257, 9), generator=gen)
    idx[:, 0] = 0
    x, w = torch.randn(257, 33, generator=gen, dtype=torch.float64), torch.randn(40, 33, generator=gen,
                                                                                   dtype=torch.float64)
    c = torch.randn(257, 9, generator=gen, dtype=torch.float64)
    with mock.patch.object(gathered, "BLOCKS_PER_THREAD", blocks_per_thread):
        check(gathered_dots, dots_reference, x, w, idx, dtype, 1)
        check(gathered_combine, combine_reference, c, w, idx, dtype, 2)


def test_gradcheck():
    gen = torch.Generator().manual_seed(4)
    idx = torch.tensor([[0, 2, 2], [1, 0, 3], [3, 3, 3], [0, 1, 2]])
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w: gathered_dots(x, w, idx), (x, w))
    torch.autograd.gradcheck(lambda c, w: gathered_combine(c, w, idx), (c, w))


def test_nan_propagates_as_in_torch():
    """A NaN input reaches its own row's outputs and the gradients it feeds, exactly where the torch
    gathers put it."""
    idx = torch.tensor([[0, 1], [2, 3], [1, 1]])
    x, w, c = torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 2)
    x[1, 2] = float("nan")
    c[2, 0] = float("nan")
    for op, reference, v in ((gathered_dots, dots_reference, x), (gathered_combine, combine_reference, c)):
        results = []
        for run in (op, reference):
            ts = [v.clone().requires_grad_(), w.clone().requires_grad_()]
            out = run(*ts, idx)
            out.sum().backward()
            results.append([out.detach(), ts[0].grad, ts[1].grad])
        assert results[0][0].isnan().any() and results[0][2].isnan().any()
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, equal_nan=True)
    assert not gathered_dots(x, w, idx)[[0, 2]].isnan().any()


def test_errors():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(IndexError, match="out of range"):
        gathered_dots(x, w, torch.tensor([[0, 4], [1, 2]]))
    with pytest.raises(IndexError, match="out of range"):
        gathered_combine(torch.randn(2, 2), w, torch.tensor([[0, -1], [1, 2]]))
    with pytest.raises(TypeError, match="float32 and float64"):
        gathered_dots(x.half(), w.half(), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="one dtype"):
        gathered_dots(x, w.double(), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="do not match"):
        gathered_dots(x, torch.randn(4, 2), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="differ in shape"):
        gathered_combine(torch.randn(2, 3), w, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="long index"):
        gathered_dots(x, w, torch.zeros(2, 1, dtype=torch.int32))
