"""The ``"cpu"`` backend: torch glue around the numba kernels (``fastff.kernels.numba``), CPU
float32 / float64.

- No gradient needed (eval under ``torch.no_grad()`` / ``inference_mode()``, or nothing requires
  grad): ``fff_hard`` / ``neuron_tree`` run the hard-inference kernels on numpy views of the
  tensors (a layer's weights prepared once, see ``Prepared`` / ``prepared``). Under ``torch.compile`` /
  ``torch.export`` tracing they go through the ops ``torch.ops.fastff.fff_hard`` /
  ``torch.ops.fastff.neuron_tree_hard``, which run the same code.
- Gradient needed (training, or eval under autograd): the conditional training kernels as
  autograd Functions — ``neuron_tree_paths``, ``fff_walk``, ``fff_leaves`` — whose forward and
  backward touch only the weight rows a row uses, O(depth) per row. Weight gradients are dense
  tensors whose untouched rows are zero.
- NeuronTree with ``route_bias`` / ``gate`` (with or without gradient): the grouped descent for the
  walk, then the gathered-row ops of ``fastff.kernels.gathered`` for the visited neurons.

Batches of ``THROUGHPUT_MIN_ROWS`` rows or more take the grouped throughput kernels; smaller
jobs run row by row, in parallel only when the work amortises waking the thread pool.
Shapes as in ``fastff.kernels.reference``.
"""
from __future__ import annotations

import functools
import operator
import weakref
from typing import Optional

import numba
import numpy as np
import torch

from ..functional import activation_code, fff_depth, tree_levels, tree_table_rows
from ..threads import follow_torch_threads, single_threaded_blas, with_torch_threads
from . import gathered, routing
from .numba import common, infer, train
from .numba.common import group_rows, group_tiles

DTYPES = (torch.float32, torch.float64)
# Batches from this size on take the grouped throughput paths.
THROUGHPUT_MIN_ROWS = 256
# Grouped descent: a group's subtree (w_in + w_out rows) must fit in this many bytes (about a
# quarter of one core's L2); a tile's input rows in TILE_BYTES.
SUBTREE_BYTES = 1 << 19
TILE_BYTES = 3 << 18
# Smaller jobs (rows x weight bytes touched per row) run on the calling thread only.
PARALLEL_MIN_BYTES = 1 << 19
# Rows per FFF leaf tile (the M of each small per-leaf GEMM).
LEAF_TILE = 32
# Leaves at least this wide run their tiles of up to GEMM_TILE rows as BLAS GEMMs (measured at
# dim 384-768, 4096-8192 rows: equal speed at leaf 16, 1.5x faster at 64, 2.6x at 512).
GEMM_MIN_LEAF = 32
GEMM_TILE = 256


# ----------------------------------------------------------------------------- tensors <-> numpy

def check_tensors(*tensors) -> None:
    """All given tensors (None skipped) must be CPU tensors of one dtype in ``DTYPES``."""
    dtype = tensors[0].dtype
    if dtype in DTYPES and all(t is None or (t.is_cpu and t.dtype is dtype) for t in tensors):
        return
    present = [t for t in tensors if t is not None]
    for t in present:
        if t.device.type != "cpu":
            raise ValueError(f"the 'cpu' backend runs CPU tensors only, got a tensor on {t.device}; "
                             f"use backend='torch' (or 'auto') for other devices")
        if t.dtype not in DTYPES:
            raise TypeError(f"the 'cpu' backend supports float32 and float64, got {t.dtype}")
    raise TypeError("the 'cpu' backend needs the input and all weights in one dtype, got "
                    + ", ".join(sorted({str(t.dtype) for t in present})))


def applies(*tensors) -> bool:
    """Whether these tensors (None skipped) are ones the kernels run: CPU, one dtype of ``DTYPES``."""
    dtype = tensors[0].dtype
    return dtype in DTYPES and all(t is None or (t.is_cpu and t.dtype is dtype) for t in tensors)


def _np(t: torch.Tensor) -> np.ndarray:
    """C-contiguous numpy view (or copy, if ``t`` is not contiguous) of a CPU tensor."""
    if not t.requires_grad and t.is_contiguous():
        return t.numpy()
    return t.detach().contiguous().numpy()


def weights_np(*weights) -> tuple:
    """Checked numpy views of ``weights`` (None stays None). Raises like ``check_tensors`` for
    tensors the kernels cannot run."""
    check_tensors(*weights)
    return tuple(None if w is None else _np(w) for w in weights)


_present = functools.partial(operator.is_not, None)
_ptr = torch.Tensor.data_ptr
_nbytes = operator.attrgetter("nbytes")


def stamp(tensors) -> tuple:
    """What must stay equal for numpy views of ``tensors`` (None skipped) to still describe them:
    their data pointers and sizes. Value updates in place are seen through the shared memory; a
    ``.data`` assignment, a move or a dtype change gives a new pointer (the views keep the old
    memory alive, so no new tensor gets its address), ``resize_`` or a ``.data`` assignment of a
    slice a new size."""
    tensors = tuple(filter(_present, tensors))
    return (*map(_ptr, tensors), *map(_nbytes, tensors))


def _weight_np(t: torch.Tensor) -> np.ndarray:
    """numpy view of a weight that keeps its memory alive but not the tensor (a copy if ``t`` is
    not contiguous)."""
    return _np(t.detach())


class Prepared:
    """One layer's weights ready for repeated eager kernel calls: checked, viewed as numpy (sharing
    their memory), the activation code and tree shape worked out, so a call costs a few checks
    plus the kernel. Made by ``prepare_neuron_tree`` / ``prepare_fff``; reusable while the
    weights keep their ``stamp`` (``prepared`` caches them per weights, layers per layer).
    ``__call__(x (..., I)) -> (..., O)``."""

    __slots__ = ("config", "dtype", "in_features", "out_features", "row_bytes", "serial", "serial_args", "run",
                 "run_args")

    def __init__(self, config: tuple, like: np.ndarray, out_features: int, row_bytes: int, serial,
                 serial_args: tuple, run, run_args: tuple):
        self.config, self.dtype, self.in_features = config, like.dtype, like.shape[-1]
        self.out_features, self.row_bytes = out_features, row_bytes
        self.serial, self.serial_args, self.run, self.run_args = serial, serial_args, run, run_args

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """x (..., I) -> (..., O) on the kernels; None when they cannot take x as it is (not a
        contiguous CPU tensor of the weights' dtype with I features, or one that requires grad):
        the caller then converts x or raises."""
        try:
            xa = x.numpy()
        except (TypeError, RuntimeError):          # not a dense CPU tensor, or requires grad
            return None
        shape = xa.shape
        if xa.dtype is not self.dtype or not shape or shape[-1] != self.in_features or not xa.flags.c_contiguous:
            return None
        if len(shape) != 2:
            xa = xa.reshape(-1, self.in_features)
        rows = xa.shape[0]
        out = np.empty((rows, self.out_features), self.dtype)
        if rows < THROUGHPUT_MIN_ROWS and not _parallel(rows, self.row_bytes):
            self.serial(xa, *self.serial_args, out)
        else:
            self.run(xa, *self.run_args, out)
        y = torch.from_numpy(out)
        return y if len(shape) == 2 else y.view(*shape[:-1], self.out_features)


def prepare_neuron_tree(w_in, b_in, w_out, b_out, route_bias, activation: str, gate: bool = False) -> Prepared:
    """``Prepared`` NeuronTree (shapes as in ``neuron_tree``; b_out and route_bias may be None).
    Raises like ``check_tensors`` / ``functional.activation_code``."""
    check_tensors(w_in, b_in, w_out, b_out, route_bias)
    code = activation_code(activation)
    wi, bi, wo = _weight_np(w_in), _weight_np(b_in), _weight_np(w_out)
    bo = _NO_BIAS[wi.dtype] if b_out is None else _weight_np(b_out)
    rb = _NO_ROUTE_BIAS[wi.dtype] if route_bias is None else _weight_np(route_bias)
    levels = tree_levels(wi.shape[1])
    run = (neuron_tree_run if route_bias is None and not gate
           else functools.partial(neuron_tree_run, route_bias=rb, gate=gate))
    return Prepared((activation, gate), wi, wo.shape[2], _nt_row_bytes(wi, wo, levels), infer.nt_serial,
                    (wi, bi, wo, bo, rb, gate, levels, code), run, ((wi, bi, wo, bo), code))


def prepare_fff(node_w, node_b, w1, b1, w2, b2, activation: str, gated: bool) -> Prepared:
    """``Prepared`` hard FFF (shapes as in ``fff_hard``). Raises like ``prepare_neuron_tree``."""
    check_tensors(node_w, node_b, w1, b1, w2, b2)
    code = activation_code(activation)
    views = nw, nb, a1, c1, a2, c2 = tuple(map(_weight_np, (node_w, node_b, w1, b1, w2, b2)))
    depth = fff_depth(a1.shape[0])
    return Prepared((activation, gated), nw, a2.shape[2], _fff_row_bytes(depth, a1, a2),
                    infer.fff_serial, (nw, nb, depth, a1, c1, a2, c2, code, gated), fff_run, (views, code, gated))


# Prepared calls of recently used weights, so direct backend calls (and the custom ops) skip the
# checks and conversions: keyed by the id of the first weight, used while the weights keep their
# stamp, dropped when the first weight dies. Non-contiguous weights (copied) are not cached.
_cache: dict[int, tuple] = {}  # id(weights[0]) -> (stamp, weakref, Prepared)


def prepared(prepare, weights: tuple, activation: str, *flags) -> Prepared:
    """``prepare(*weights, activation, *flags)`` (``prepare_neuron_tree`` / ``prepare_fff``), or
    its cached result while the weights keep their ``stamp`` (pointer and size of each)."""
    key, st = id(weights[0]), stamp(weights)
    hit = _cache.get(key)
    if hit is not None and hit[0] == st and hit[2].config == (activation, *flags):
        return hit[2]
    p = prepare(*weights, activation, *flags)
    if all(w is None or w.is_contiguous() for w in weights):
        _cache[key] = (st, weakref.ref(weights[0], lambda _: _cache.pop(key, None)), p)
    return p


_PREPARERS = {"fff_hard": prepare_fff, "neuron_tree": prepare_neuron_tree}


def prepare(op: str, weights: tuple, activation: str, *flags) -> Prepared | None:
    """The backend's prepared fast path (see ``fastff.kernels``): inference op ``op``
    (``"fff_hard"`` / ``"neuron_tree"``) on ``weights`` (its weight arguments, then the activation
    and the op's flags) as a ``prepared`` call, or None unless the kernels run the weights as
    they are: CPU tensors of one dtype of ``DTYPES``, contiguous."""
    if not applies(*weights) or not all(w is None or w.is_contiguous() for w in weights):
        return None
    return prepared(_PREPARERS[op], weights, activation, *flags)


_NO_BIAS = {np.dtype(dt): np.zeros(0, dt) for dt in (np.float32, np.float64)}
_NO_ROUTE_BIAS = {np.dtype(dt): np.zeros((0, 0), dt) for dt in (np.float32, np.float64)}


def _tracing(x: torch.Tensor) -> bool:
    """True under torch.compile / torch.export tracing (then the custom op must be called)."""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor


# ----------------------------------------------------------------------------- inference

def _parallel(rows: int, bytes_per_row: int) -> bool:
    """Wake the thread pool only when the work amortises it (~0.5 MB of weights touched)."""
    return rows * bytes_per_row >= PARALLEL_MIN_BYTES and torch.get_num_threads() > 1


def _fff_row_bytes(depth: int, w1: np.ndarray, w2: np.ndarray) -> int:
    """Weight bytes one row's FFF walk touches: ``depth`` nodes and one leaf."""
    _, inp, hidden = w1.shape
    return (depth * inp + hidden * (inp + w2.shape[2])) * w1.itemsize


def _nt_row_bytes(w_in: np.ndarray, w_out: np.ndarray, levels: int) -> int:
    """Weight bytes one row's NeuronTree walk touches: ``levels`` neurons per tree."""
    return w_in.shape[0] * levels * (w_in.shape[2] + w_out.shape[2]) * w_in.itemsize


def fff_run(xa: np.ndarray, weights: tuple, code: int, gated: bool, out: np.ndarray) -> None:
    """The numba part of ``fff_hard``: out (B, O) = FFF(xa (B, I)) for ``weights`` = numpy
    (node_w, node_b, w1, b1, w2, b2) and an activation code (``functional.ACTIVATION_CODES``)."""
    nw, nb, a1, c1, a2, c2 = weights
    rows = xa.shape[0]
    if rows == 0:
        return
    depth = fff_depth(a1.shape[0])
    if rows >= THROUGHPUT_MIN_ROWS:
        _fff_throughput(xa, nw, nb, depth, a1, c1, a2, c2, code, gated, out)
        return
    if _parallel(rows, _fff_row_bytes(depth, a1, a2)):
        with_torch_threads(infer.fff_parallel, xa, nw, nb, depth, a1, c1, a2, c2, code, gated, out)
    else:
        infer.fff_serial(xa, nw, nb, depth, a1, c1, a2, c2, code, gated, out)


def _fff_throughput(xa, nw, nb, depth, a1, c1, a2, c2, code, gated, out) -> None:
    """Route every row (grouped descent, ``route``), group rows by leaf, evaluate tiles of one leaf: hand-written loops for
    narrow leaves, two BLAS GEMMs per tile from ``GEMM_MIN_LEAF`` on."""
    leaf, gate = np.empty(xa.shape[0], np.int64), np.empty(xa.shape[0], xa.dtype)
    pre, nodes, _, _ = route(xa, nw[None], nb[None], None, depth, nw.shape[1] * xa.itemsize)
    infer.fff_reached(pre, nodes, nw.shape[0], gated, leaf, gate)
    if a1.shape[2] < GEMM_MIN_LEAF:
        order, tiles = group_tiles(leaf, a1.shape[0], LEAF_TILE)
        with_torch_threads(infer.fff_tiles, xa, a1, c1, a2, c2, code, gated, gate, order, tiles, out)
        return
    order, tiles = group_tiles(leaf, a1.shape[0], GEMM_TILE)
    with single_threaded_blas():
        with_torch_threads(infer.fff_tiles_gemm, xa, a1, c1, a2, c2, code, gated, gate, order, tiles, out)


def nt_split(levels: int, node_bytes: int) -> int:
    """Level at which the grouped descent (``numba.common.route``) regroups rows: the shallowest
    one whose subtrees (``2**(levels - split) - 1`` neurons of ``node_bytes``) fit in
    ``SUBTREE_BYTES``; at most ``levels - 1``. 0 means the whole tree fits (one stage)."""
    fit = tree_levels(SUBTREE_BYTES // node_bytes)   # levels of a subtree that fits
    return min(levels - 1, max(0, levels - fit))


def tile_rows(rows: int, row_bytes: int) -> int:
    """Rows per tile of the grouped kernels: their inputs fit in ``TILE_BYTES`` (L2), and there
    are at least two tiles per thread when the batch allows."""
    per_thread = -(-rows // (2 * torch.get_num_threads()))
    return max(4, min(TILE_BYTES // max(1, row_bytes), per_thread))


def route(xa: np.ndarray, w: np.ndarray, b: np.ndarray, flip: np.ndarray | None, levels: int,
          node_bytes: int) -> tuple:
    """Grouped descent of K trees (``numba.common.route``) on torch's thread count. xa (B, I),
    w (K, M, I), b (K, M), flip (B, K, levels) bool or None -> (pre, nodes (B, K, levels),
    order, tiles: the rows grouped by the last tree's path)."""
    B, K = xa.shape[0], w.shape[0]
    pre, nodes = np.empty((B, K, levels), xa.dtype), np.empty((B, K, levels), np.int64)
    flip = np.zeros((0, K, levels), np.uint8) if flip is None else flip.view(np.uint8)
    order, tiles = with_torch_threads(common.route, xa, w, b, flip, nt_split(levels, node_bytes),
                                      tile_rows(B, xa.shape[1] * xa.itemsize), pre, nodes)
    return pre, nodes, order, tiles


def neuron_tree_run(xa: np.ndarray, weights: tuple, code: int, out: np.ndarray, route_bias: np.ndarray | None = None,
                    gate: bool = False) -> None:
    """The numba part of ``neuron_tree``: out (B, O) = NeuronTree(xa (B, I)) for ``weights`` =
    numpy (w_in, b_in, w_out, b_out or None), an activation code and the routing options
    (route_bias (K, M) or None, gate). Large batches of a plain tree run grouped by path; with
    routing options every batch runs the per-row walk (in parallel from ``_parallel``'s size)."""
    wi, bi, wo, bo = weights
    rows = xa.shape[0]
    if rows == 0:
        return
    if bo is None:
        bo = _NO_BIAS[xa.dtype]
    plain = route_bias is None or route_bias.shape[1] == 0
    rb = _NO_ROUTE_BIAS[xa.dtype] if plain else route_bias
    levels = tree_levels(wi.shape[1])
    if rows >= THROUGHPUT_MIN_ROWS and plain and not gate:
        _nt_grouped(xa, wi, bi, wo, bo, code, levels, out)
    elif rows >= THROUGHPUT_MIN_ROWS or _parallel(rows, _nt_row_bytes(wi, wo, levels)):
        with_torch_threads(infer.nt_parallel, xa, wi, bi, wo, bo, rb, gate, levels, code, out)
    else:
        infer.nt_serial(xa, wi, bi, wo, bo, rb, gate, levels, code, out)


def _nt_grouped(xa, wi, bi, wo, bo, code, levels, out) -> tuple:
    """NeuronTree by groups of rows sharing weights: ``route``, then the outputs in path order.
    -> (pre, nodes) (B, K, levels)."""
    pre, nodes, order, tiles = route(xa, wi, bi, None, levels, (wi.shape[2] + wo.shape[2]) * xa.itemsize)
    with_torch_threads(infer.nt_outputs, pre, nodes, wo, bo, code, order, tiles, out)
    return pre, nodes


def eager(p: Prepared, x: torch.Tensor) -> torch.Tensor:
    """``p(x)``, x made a contiguous tensor that needs no grad first if the kernels cannot take it
    as it is; raises like ``check_tensors`` for another device or dtype. x (B, I) -> (B, O)."""
    y = p(x)
    if y is None:
        check_tensors(x, torch.from_numpy(np.empty(0, p.dtype)))
        y = p(x.detach().contiguous())
        if y is None:
            raise ValueError(f"expected input of shape (B, {p.in_features}), got {tuple(x.shape)}")
    return y


# torch.library custom ops: torch.compile and torch.export see one opaque op per layer call.
@torch.library.custom_op("fastff::fff_hard", mutates_args=())
def fff_hard_op(x: torch.Tensor, node_w: torch.Tensor, node_b: torch.Tensor, w1: torch.Tensor,
                b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """``torch.ops.fastff.fff_hard``: hard FFF inference on the numba kernels. -> (B, O)."""
    return eager(prepared(prepare_fff, (node_w, node_b, w1, b1, w2, b2), activation, gated), x)


@fff_hard_op.register_fake
def _fff_hard_fake(x, node_w, node_b, w1, b1, w2, b2, activation, gated):
    return x.new_empty(x.shape[0], w2.shape[-1])


@torch.library.custom_op("fastff::neuron_tree_hard", mutates_args=())
def neuron_tree_op(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor,
                   b_out: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    """``torch.ops.fastff.neuron_tree_hard``: NeuronTree inference on the numba kernels. -> (B, O)."""
    return eager(prepared(prepare_neuron_tree, (w_in, b_in, w_out, b_out, None), activation, False), x)


@neuron_tree_op.register_fake
def _neuron_tree_fake(x, w_in, b_in, w_out, b_out, activation):
    return x.new_empty(x.shape[0], w_out.shape[-1])


def fff_hard(x, node_w, node_b, w1, b1, w2, b2, activation: str, gated: bool = False) -> torch.Tensor:
    """Hard FFF forward. x (B, I) -> (B, O); same result as ``reference.fff_hard``.

    Without gradients: eager calls run the kernels directly (the op dispatcher costs more than a
    batch-1 kernel) on ``prepared`` weights, traced calls go through ``torch.ops.fastff.fff_hard``.
    With gradients: ``routing.fff_hard_path`` on the training kernels (leaf gradients; node
    gradients through the gate when ``gated``)."""
    weights = (node_w, node_b, w1, b1, w2, b2)
    if routing.needs_grad(x, *weights):
        return routing.fff_hard_path(fff_walk, fff_leaves, x, *weights, activation, hardened=not gated)[0]
    if _tracing(x):
        return torch.ops.fastff.fff_hard(x, *weights, activation, gated)
    return eager(prepared(prepare_fff, weights, activation, gated), x)


def neuron_tree(x, w_in, b_in, w_out, b_out, activation: str, route_bias=None, gate: bool = False) -> torch.Tensor:
    """NeuronTree forward. x (B, I) -> (B, O); same result as ``reference.neuron_tree``.
    Without gradients as in ``fff_hard`` (op ``torch.ops.fastff.neuron_tree_hard``), the routing
    options ``route_bias`` / ``gate`` (as in ``neuron_tree_paths``) on the prepared walk too
    (traced: ``neuron_tree_paths``); with gradients ``neuron_tree_paths``."""
    weights = (w_in, b_in, w_out, b_out)
    routed = route_bias is not None or gate
    if routing.needs_grad(x, *weights) or (routed and _tracing(x)):
        return neuron_tree_paths(x, *weights, activation, route_bias, gate)[0]
    if _tracing(x):
        return torch.ops.fastff.neuron_tree_hard(x, *weights, activation)
    return eager(prepared(prepare_neuron_tree, (*weights, route_bias), activation, gate), x)


# ----------------------------------------------------------------------------- training

def _rows(m: int, nodes: np.ndarray) -> np.ndarray:
    """(B, K, T) node numbers -> (B, K·T) row numbers into the flattened (K·M, F) table."""
    B, K, T = nodes.shape
    return (nodes + np.arange(K)[None, :, None] * m).reshape(B, K * T)


def _sorted_paths(nodes: np.ndarray, m: int) -> tuple:
    """(order (K, B), starts, idx (B, K·T)): ``common.sort_by_deepest`` of nodes (B, K, T) and the
    visited rows of the flattened (K·m, F) weight tables."""
    B, K, T = nodes.shape
    order, starts = common.sort_by_deepest(nodes if T else np.zeros((B, K, 1), np.int64))
    return order, starts, _rows(m, nodes)


def _node_outer(c: np.ndarray, v: np.ndarray, nodes: np.ndarray, order: np.ndarray, starts: np.ndarray,
                gw: np.ndarray, gb: np.ndarray) -> None:
    """Weight gradients of visited pre-activations: gw[k, n] = Σ_{r visits n} c[r, k, t_n] · v[r],
    gb[k, n] = Σ c (zero for nodes no row visits). The levels whose nodes hold more rows than fit
    in ``TILE_BYTES`` are summed per row chunk (``train.top_partials``), the rest per subtree
    (``train.deep_outer``). Runs numba on the thread count set by the caller (autograd Functions
    under ``follow_torch_threads``). c, nodes (B, K, T), v (B, F), gw (K, M, F), gb (K, M)."""
    B, K, T = c.shape
    row_bytes = v.shape[1] * v.itemsize
    split = 0
    while split < T and -(-B // (1 << split)) * row_bytes > TILE_BYTES:
        split += 1
    if split:
        chunks = 2 * torch.get_num_threads()
        partial = np.empty((chunks, K, (1 << split) - 1, v.shape[1]), v.dtype)
        partial_b = np.empty(partial.shape[:3], v.dtype)
        train.top_partials(c, v, nodes, order, split, -(-B // chunks), partial, partial_b)
        gw[:, :partial.shape[2]] = partial.sum(0)
        gb[:, :partial.shape[2]] = partial_b.sum(0)
    with numba.parallel_chunksize(1):
        train.deep_outer(c, v, order, starts, split, gw, gb)


class _Walk(torch.autograd.Function):
    """Hard descent of K trees (``route``), differentiable in the visited pre-activations.
    x (B,F), w (K,M,F), b (K,M), flip (B,K,T) bool -> (pre (B,K,T), nodes (B,K,T) long)."""

    @staticmethod
    @follow_torch_threads
    def forward(ctx, x, w, b, flip):
        xa = _np(x)
        pre, nodes, _, _ = route(xa, _np(w), _np(b), _np(flip), flip.shape[2], w.shape[2] * xa.itemsize)
        nodes = torch.from_numpy(nodes)
        ctx.save_for_backward(x, w, nodes)
        ctx.mark_non_differentiable(nodes)
        return torch.from_numpy(pre), nodes

    @staticmethod
    @follow_torch_threads
    def backward(ctx, g, _):
        x, w, nodes = (_np(t) for t in ctx.saved_tensors)
        g = _np(g)
        K, M, F = w.shape
        order, starts, idx = _sorted_paths(nodes, M)
        gw, gb = np.empty_like(w), np.empty((K, M), w.dtype)
        _node_outer(g, x, nodes, order, starts, gw, gb)
        gx = np.empty_like(x)
        train.path_combine(g.reshape(idx.shape), w.reshape(K * M, F), idx, order[0], gx)
        return torch.from_numpy(gx), torch.from_numpy(gw), torch.from_numpy(gb), None


class _NeuronTree(torch.autograd.Function):
    """NeuronTree forward (the grouped inference kernels, recording the visited nodes and their
    pre-activations) and its conditional backward. -> (y (B,O), nodes (B,K,D+1), pre (B,K,D+1));
    y and the visited pre-activations are differentiable."""

    @staticmethod
    @follow_torch_threads
    def forward(ctx, x, w_in, b_in, w_out, b_out, code):
        xa, wi, wo = _np(x), _np(w_in), _np(w_out)
        y = np.empty((xa.shape[0], wo.shape[-1]), dtype=xa.dtype)
        pre, nodes = _nt_grouped(xa, wi, _np(b_in), wo, _np(b_out), code, tree_levels(wi.shape[1]), y)
        nodes, pre = torch.from_numpy(nodes), torch.from_numpy(pre)
        ctx.save_for_backward(x, w_in, w_out, nodes, pre)
        ctx.code = code
        ctx.mark_non_differentiable(nodes)
        return torch.from_numpy(y), nodes, pre

    @staticmethod
    @follow_torch_threads
    def backward(ctx, g, _, g_pre):
        x, w_in, w_out, nodes, pre = (_np(t) for t in ctx.saved_tensors)
        g = _np(g)
        (B, K, T), (M, F), O = nodes.shape, w_in.shape[1:], w_out.shape[-1]
        order, starts, idx = _sorted_paths(nodes, M)
        gh, da, h = np.empty_like(pre), np.empty_like(pre), np.empty_like(pre)
        train.path_dots(g, w_out.reshape(K * M, O), idx, order[0], gh.reshape(B, K * T))
        train.nt_act_grads(pre, gh, ctx.code, da, h)
        da += _np(g_pre)                                   # gradient reaching the pre-activations directly
        gw_in, gw_out = np.empty_like(w_in), np.empty_like(w_out)
        gb_in, gb_out = np.empty((K, M), w_in.dtype), np.empty((K, M), w_in.dtype)
        _node_outer(da, x, nodes, order, starts, gw_in, gb_in)
        _node_outer(h, g, nodes, order, starts, gw_out, gb_out)
        gx = np.empty_like(x)
        train.path_combine(da.reshape(B, K * T), w_in.reshape(K * M, F), idx, order[0], gx)
        return (torch.from_numpy(gx), torch.from_numpy(gw_in), torch.from_numpy(gb_in), torch.from_numpy(gw_out),
                torch.from_numpy(g.sum(0)), None)


class _Leaves(torch.autograd.Function):
    """Reached-leaf MLPs, rows grouped by leaf. -> (B, O) = gate · leaf(x)."""

    @staticmethod
    @follow_torch_threads
    def forward(ctx, x, w1, b1, w2, b2, gate, leaf, mask, code):
        order, starts = group_rows(_np(leaf), w1.shape[0])
        B, H = x.shape[0], w1.shape[-1]
        a = np.empty((B, H), dtype=_np(x).dtype)
        leaf_out, y = np.empty((B, w2.shape[-1]), dtype=a.dtype), np.empty((B, w2.shape[-1]), dtype=a.dtype)
        with numba.parallel_chunksize(1), single_threaded_blas():
            train.leaf_forward(_np(x), _np(w1), _np(b1), _np(w2), _np(b2), _np(gate), _np(mask), code,
                               order, starts, a, leaf_out, y)
        ctx.save_for_backward(x, w1, w2, gate, mask, torch.from_numpy(a), torch.from_numpy(leaf_out))
        ctx.grouping, ctx.code = (order, starts), code
        return torch.from_numpy(y)

    @staticmethod
    @follow_torch_threads
    def backward(ctx, g):
        x, w1, w2, gate, mask, a, leaf_out = (_np(t) for t in ctx.saved_tensors)
        gx, ggate = np.empty_like(x), np.empty_like(gate)
        dw1, dw2 = np.empty_like(w1), np.empty_like(w2)
        db1, db2 = np.empty(w1.shape[::2], dtype=x.dtype), np.empty(w2.shape[::2], dtype=x.dtype)
        with numba.parallel_chunksize(1), single_threaded_blas():
            train.leaf_backward(x, _np(g), w1, w2, gate, mask, ctx.code, *ctx.grouping, a, leaf_out,
                                gx, dw1, db1, dw2, db2, ggate)
        return tuple(map(torch.from_numpy, (gx, dw1, db1, dw2, db2, ggate))) + (None, None, None)


def _visited_preacts(x, w_in, b_in, route_bias):
    """The walk of the routing options: the grouped descent (no gradient; the offset joins b_in in
    the decisions), then the visited pre-activations on ``gathered.gathered_dots`` over the trees'
    flattened (K·M, I) table. -> (pre (B, K, D+1) differentiable, nodes (B, K, D+1) long)."""
    (K, M, I), B = w_in.shape, x.shape[0]
    levels = tree_levels(M)
    with torch.no_grad():
        bias = b_in if route_bias is None else b_in + route_bias
        xa = _np(x)
        _, nodes, _, _ = route(xa, _np(w_in), _np(bias), None, levels, I * xa.itemsize)
    nodes = torch.from_numpy(nodes)
    ids = tree_table_rows(nodes, M).view(B, K * levels)
    a = gathered.gathered_dots(x, w_in.reshape(K * M, I), ids) + b_in.reshape(K * M)[ids]
    return a.view(B, K, levels), nodes


def neuron_tree_paths(x, w_in, b_in, w_out, b_out, activation: str, route_bias=None, gate: bool = False,
                      preactivations: bool = False, straight_through: bool = False):
    """NeuronTree forward with O(K·(D+1)·(in+out)) forward and backward per row.

    x (B, I), w_in (K, M, I), b_in (K, M), w_out (K, M, O), b_out (O,) or None -> (y (B, O),
    nodes (B, K, D+1) long, the visited node per row, tree and level), and the visited
    pre-activations (B, K, D+1) (differentiable too) if ``preactivations``. x and every weight get
    gradients; weight gradients are nonzero only in visited rows. Equal (values and gradients) to
    ``reference.neuron_tree_paths``. ``route_bias`` (K, M) offsets the decisions only, ``gate``
    scales each visited neuron's term by its path gate (``straight_through``: value 1, the gate's
    gradient; as there); with either, the visited neurons
    run on the gathered ops (``routing.neuron_tree_visited``), else on the fused tree kernels."""
    check_tensors(x, w_in, b_in, w_out, b_out, route_bias)
    if route_bias is not None or gate:
        y, nodes, pre = routing.neuron_tree_visited(_visited_preacts, gathered.gathered_combine, x, w_in, b_in,
                                                    w_out, b_out, activation, route_bias, gate, straight_through)
    else:
        bias = w_out.new_zeros(w_out.shape[-1]) if b_out is None else b_out
        y, nodes, pre = _NeuronTree.apply(x, w_in, b_in, w_out, bias, activation_code(activation))
    return (y, nodes, pre) if preactivations else (y, nodes)


def fff_walk(x, node_w, node_b, flip):
    """Hard descent through FFF decision nodes (see ``functional.hard_path``).
    x (B, I), node_w (N, I), node_b (N,), flip (B, d) bool -> (nodes (B, d) long, logits (B, d))."""
    check_tensors(x, node_w, node_b)
    logits, nodes = _Walk.apply(x, node_w[None], node_b[None], flip[:, None])
    return nodes[:, 0], logits[:, 0]


def fff_leaves(x, w1, b1, w2, b2, gate, leaf, mask, activation: str):
    """gate · (act(x·w1[leaf] + b1[leaf]) · mask) · w2[leaf] + gate · b2[leaf], rows grouped by leaf.
    x (B, I), gate (B,), leaf (B,) long, mask (B, H) or (1, H) -> (B, O)."""
    check_tensors(x, w1, b1, w2, b2)
    return _Leaves.apply(x, w1, b1, w2, b2, gate, leaf, mask, activation_code(activation))
