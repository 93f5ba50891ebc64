"""Validation of a trace's rows: a numba kernel finds the first bad row, Python words the error.

Every check raises :class:`traces.format.TraceError` with one line naming the file, the column
and what was expected, so that no bad trace reaches the simulator kernels.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from traces.format import TraceError
from traces.trace import Trace

_OK = 0
_LAYER = 1
_PHASE = 2
_POS = 3
_STEP = 4
_UNSORTED = 5
_DUPLICATE = 6
_TOKEN_ORDER = 7
_TOPK = 8
_EXPERT_RANGE = 9
_EXPERT_DUP = 10


@njit(cache=True)
def _check_rows(step, seq, seq_idx, n_seq, pos, phase, layer, offsets, experts,
                experts_per_layer, top_k):  # fmt: skip
    """Return (code, row, detail) of the first bad row, or (0, -1, 0)."""
    n = step.shape[0]
    n_layers = experts_per_layer.shape[0]
    last_pos = np.full(n_seq * n_layers, -1, np.int64)
    max_e = 0
    for e in experts_per_layer:
        max_e = max(max_e, e)
    seen = np.zeros(max_e, np.int64)
    for i in range(n):
        lay = layer[i]
        if lay < 0 or lay >= n_layers:
            return _LAYER, i, lay
        if phase[i] != 0 and phase[i] != 1:
            return _PHASE, i, phase[i]
        if pos[i] < 0:
            return _POS, i, pos[i]
        if step[i] < 0:
            return _STEP, i, step[i]
        if i > 0:
            a0, a1, a2, a3 = step[i - 1], layer[i - 1], seq[i - 1], pos[i - 1]
            b0, b1, b2, b3 = step[i], lay, seq[i], pos[i]
            if (a0, a1, a2, a3) == (b0, b1, b2, b3):
                return _DUPLICATE, i, 0
            if (a0, a1, a2, a3) > (b0, b1, b2, b3):
                return _UNSORTED, i, 0
        k = seq_idx[i] * n_layers + lay
        if pos[i] <= last_pos[k]:
            return _TOKEN_ORDER, i, last_pos[k]
        last_pos[k] = pos[i]
        cnt = offsets[i + 1] - offsets[i]
        if top_k > 0 and cnt != top_k:
            return _TOPK, i, cnt
        n_e = experts_per_layer[lay]
        for j in range(offsets[i], offsets[i + 1]):
            e = experts[j]
            if e < 0 or e >= n_e:
                return _EXPERT_RANGE, i, e
            if seen[e] == i + 1:
                return _EXPERT_DUP, i, e
            seen[e] = i + 1
    return _OK, -1, 0


@njit(cache=True)
def _check_ids(layer, offsets, ids, experts_per_layer):
    """First row whose listed ids fall outside its layer's expert range, or -1."""
    for i in range(layer.shape[0]):
        n_e = experts_per_layer[layer[i]]
        for j in range(offsets[i], offsets[i + 1]):
            if ids[j] < 0 or ids[j] >= n_e:
                return i, ids[j]
    return -1, 0


def validate_trace(trace: Trace) -> None:
    """Raise TraceError on the first problem in ``trace``; return None when it is sound."""
    where = trace.path
    meta = trace.meta
    meta.validate(where)
    n = trace.num_rows
    for name in ("step", "seq", "pos", "phase", "layer", "offsets", "experts"):
        arr = getattr(trace, name)
        if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype.kind not in "iu":
            got = (
                f"{arr.dtype} of shape {arr.shape}"
                if isinstance(arr, np.ndarray)
                else type(arr).__name__
            )
            raise TraceError(
                f"{where}: column '{name}': expected a 1-D {np.dtype(_DTYPES[name])} array, "
                f"got {got} (build traces with trace_from_arrays)"
            )
    for name in ("seq", "pos", "phase", "layer", "token_id", "token"):
        arr = getattr(trace, name)
        if arr is not None and arr.shape[0] != n:
            raise TraceError(f"{where}: column '{name}': expected {n} rows, got {arr.shape[0]}")
    _check_offsets(where, "experts", trace.offsets, trace.experts.shape[0], n)
    epl = np.asarray(meta.experts_per_layer, dtype=np.int64)
    seq_values, seq_idx = np.unique(trace.seq, return_inverse=True)
    top_k = -1 if meta.top_k is None else int(meta.top_k)
    code, row, detail = _check_rows(
        trace.step, trace.seq, seq_idx.astype(np.int64), len(seq_values), trace.pos,
        trace.phase, trace.layer, trace.offsets, trace.experts, epl, top_k,
    )  # fmt: skip
    if code != _OK:
        raise TraceError(f"{where}: {_describe(trace, code, int(row), int(detail))}")
    if trace.weights is not None and trace.weights.shape[0] != trace.experts.shape[0]:
        raise TraceError(f"{where}: column 'weights': expected one weight per routed expert")
    if trace.weights is not None and not np.all(np.isfinite(trace.weights)):
        bad = int(np.flatnonzero(~np.isfinite(trace.weights))[0])
        row = int(np.searchsorted(trace.offsets, bad, side="right") - 1)
        raise TraceError(f"{where}: column 'weights': row {row}: expected finite gate weights")
    for h, (offs, ids) in sorted(trace.preds.items()):
        offs = np.asarray(offs, dtype=np.int64)
        ids = np.asarray(ids, dtype=np.int16)
        _check_offsets(where, f"pred_h{h}", offs, ids.shape[0], n)
        row, value = _check_ids(trace.layer, offs, ids, epl)
        if row >= 0:
            lay = int(trace.layer[row])
            raise TraceError(
                f"{where}: column 'pred_h{h}': row {row}: expected expert ids in "
                f"0..{meta.experts_per_layer[lay] - 1} for layer {lay}, got {value}"
            )


_DTYPES = {"step": np.int64, "seq": np.int64, "pos": np.int32, "phase": np.int8,
           "layer": np.int16, "offsets": np.int64, "experts": np.int16}  # fmt: skip


def _check_offsets(where: str, name: str, offsets: np.ndarray, nnz: int, n: int) -> None:
    """CSR offsets of a list column: n+1 of them, from 0, non-decreasing, ending at nnz."""
    if offsets.ndim != 1 or offsets.shape[0] != n + 1:
        raise TraceError(
            f"{where}: column '{name}': expected {n + 1} list offsets (rows + 1), "
            f"got {offsets.shape[0] if offsets.ndim == 1 else offsets.shape}"
        )
    if offsets[0] != 0 or offsets[-1] != nnz:
        raise TraceError(
            f"{where}: column '{name}': expected list offsets from 0 to {nnz} (the number of "
            f"values), got {offsets[0]}..{offsets[-1]}"
        )
    steps = np.diff(offsets)
    if steps.size and steps.min() < 0:
        row = int(np.argmax(steps < 0))
        raise TraceError(
            f"{where}: column '{name}': row {row}: expected non-decreasing list offsets, "
            f"got {offsets[row]} then {offsets[row + 1]}"
        )


def _describe(trace: Trace, code: int, row: int, detail: int) -> str:
    meta = trace.meta
    key = (
        f"(step={trace.step[row]}, layer={trace.layer[row]}, seq={trace.seq[row]}, "
        f"pos={trace.pos[row]})"
    )
    if code == _LAYER:
        return f"column 'layer': row {row}: expected 0..{meta.num_layers - 1}, got {detail}"
    if code == _PHASE:
        return f"column 'phase': row {row}: expected 0 (prefill) or 1 (decode), got {detail}"
    if code == _POS:
        return f"column 'pos': row {row}: expected a position >= 0, got {detail}"
    if code == _STEP:
        return f"column 'step': row {row}: expected a step >= 0, got {detail}"
    if code == _DUPLICATE:
        return (
            f"row {row}: duplicated (step, layer, seq, pos) {key}: expected each key once "
            f"(as in row {row - 1})"
        )
    if code == _UNSORTED:
        prev = (
            f"(step={trace.step[row - 1]}, layer={trace.layer[row - 1]}, "
            f"seq={trace.seq[row - 1]}, pos={trace.pos[row - 1]})"
        )
        return (
            f"row {row}: expected rows sorted by (step, layer, seq, pos), but {key} "
            f"comes after {prev}"
        )
    if code == _TOKEN_ORDER:
        return (
            f"row {row}: duplicated or out-of-order (seq, pos, layer): {key}: expected pos > "
            f"{detail}, the pos of seq {trace.seq[row]} at layer {trace.layer[row]} in an "
            f"earlier row (positions of a sequence rise with step)"
        )
    if code == _TOPK:
        return (
            f"column 'experts': row {row}: expected top_k={meta.top_k} experts "
            f"(metadata), got {detail}"
        )
    if code == _EXPERT_RANGE:
        lay = int(trace.layer[row])
        return (
            f"column 'experts': row {row}: expected expert ids in "
            f"0..{meta.experts_per_layer[lay] - 1} for layer {lay}, got {detail}"
        )
    if code == _EXPERT_DUP:
        return f"column 'experts': row {row}: expert {detail} listed twice"
    return f"row {row}: invalid (code {code})"
