"""A learned expert predictor (MoE-Beyond style), trained offline on activation traces.

For a token at MoE layer ``l`` it predicts the experts the token will route to at layer
``L = l + h`` (horizon ``h``), from what a runtime knows once layer ``l`` has run:

- the token's own experts at layers ``l, l-1, ..., l-S+1`` (``src_layers`` = S, default 4);
- the experts of the sequence's previous ``P`` tokens at the target layer ``L`` (``prev_tokens``,
  default 2), used only when those tokens ran in an earlier step (always in token-by-token
  decoding; never inside one prefill step, where layer ``L`` has not run yet for anyone);
- the token itself (its text, or its vocabulary id), through a learned embedding; tokens seen
  fewer than ``min_token_count`` times in training share one "unknown" embedding;
- the target layer.

The model, one per horizon, is a small MLP over these sparse multi-hot features::

    z      = sum of the embedding rows of the active features   (H numbers)
    hidden = relu(z)                      [ -> relu(hidden @ W1 + b1) with hidden2 > 0 ]
    logits = hidden @ W2[L] + b2[L]       (one output matrix per target layer, E logits)

trained with softmax cross-entropy against the actual experts (each weighted 1/k) by mini-batch
Adam (lazy Adam for the embedding rows a batch touches). The top-k logits are the prediction,
ranked by score. The sparse first layer (gather and scatter of embedding rows, per row of the
trace) runs in numba kernels; the dense layers are numpy matrix products, in batches that share
one target layer. No torch.

A model is saved as one ``.npz`` file: the weights, the token vocabulary and a JSON header
(``meta_json``) naming the model shape (layers, experts per layer), the horizons, the features
and the training settings. Loading checks the format; using it on a trace of another shape is a
one-line ConfigError.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from numba import njit

import traces._jit  # noqa: F401  (numba cache folder; must run before any kernel is defined)
from traces.errors import ConfigError, TraceError
from traces.format import TraceMeta
from traces.trace import Trace

FORMAT = "moesim-learned-predictor"
FORMAT_VERSION = 1
PRED_SOURCE = "moesim-learned"

_DT = np.float32
_NPOS = 12  # position buckets: 0, 1, 2, 3, 4-7, 8-15, ..., >= 512


class blas_threads:
    """Context manager: run numpy's BLAS (OpenBLAS) with ``n`` threads inside the block.

    The training step's matrix products are small (batch x hidden x experts); on a shared
    machine with busy cores, OpenBLAS's own threads slow them down more than tenfold (measured
    18 ms instead of 3 ms per batch on 2 busy cores). Best effort: where the library or its
    symbol cannot be found (another BLAS, not Linux) this does nothing.
    """

    _NAMES = (
        "scipy_openblas_set_num_threads64_",
        "scipy_openblas_set_num_threads_64_",
        "openblas_set_num_threads64_",
        "openblas_set_num_threads",
    )

    def __init__(self, n: int = 1):
        self.n = n
        self._set = self._get = None

    @classmethod
    def _functions(cls):
        import ctypes

        try:
            with open("/proc/self/maps") as f:
                libs = {line.split()[-1] for line in f if "openblas" in line.lower()}
        except OSError:
            return None, None
        for lib in sorted(libs):
            try:
                dll = ctypes.CDLL(lib)
            except OSError:
                continue
            for name in cls._NAMES:
                if hasattr(dll, name):
                    get = name.replace("set_num", "get_num")
                    return getattr(dll, name), getattr(dll, get, None)
        return None, None

    def __enter__(self):
        self._set, self._get = self._functions()
        if self._set is not None and self._get is not None:
            self._old = int(self._get())
            self._set(int(self.n))
        return self

    def __exit__(self, *exc):
        if self._set is not None and self._get is not None:
            self._set(self._old)


@dataclass
class LearnedConfig:
    """Features, network size and training settings of a learned predictor."""

    horizons: list[int] = field(default_factory=lambda: [1, 2, 4])
    src_layers: int = 4  # the token's experts at layers l .. l-src_layers+1
    prev_tokens: int = 2  # previous tokens' experts at the target layer
    use_token: bool = True  # token text / id embedding (when the trace has it)
    token_context: int = 0  # also the ids of the previous C tokens (own embedding tables)
    position: bool = False  # a log2 bucket of the token's index in its sequence
    loss: str = "softmax"  # softmax cross-entropy, or "bce" (independent sigmoids)
    min_token_count: int = 2  # rarer tokens share the "unknown" embedding
    hidden: int = 256
    hidden2: int = 0  # a second hidden layer (0: none)
    epochs: float = 1.0  # passes over the training rows (fractions allowed)
    batch: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.0  # on the embedding rows, decoupled (AdamW-style)
    max_rows: int = 0  # train on at most this many rows per horizon (0: all)
    seed: int = 0

    def check(self) -> None:
        def bad(key, want, got):
            raise ConfigError(f"train: {key}: expected {want}, got {got!r}")

        if not self.horizons:
            bad("horizons", "at least one horizon", self.horizons)
        for h in self.horizons:
            if not isinstance(h, int | np.integer) or h < 1:
                bad("horizons", "integers >= 1", self.horizons)
        if len(set(self.horizons)) != len(self.horizons):
            bad("horizons", "distinct horizons", self.horizons)
        for key in (
            "src_layers", "prev_tokens", "token_context", "min_token_count", "hidden2", "max_rows",
        ):  # fmt: skip
            if getattr(self, key) < 0:
                bad(key, "an integer >= 0", getattr(self, key))
        for key in ("hidden", "batch"):
            if getattr(self, key) < 1:
                bad(key, "an integer >= 1", getattr(self, key))
        if not self.epochs > 0:
            bad("epochs", "a number > 0", self.epochs)
        if not self.lr > 0:
            bad("lr", "a number > 0", self.lr)
        if self.weight_decay < 0:
            bad("weight_decay", "a number >= 0", self.weight_decay)


# --------------------------------------------------------------------------------------------
# Token table: which row holds each (token, layer), previous tokens, token vocabulary ids
# --------------------------------------------------------------------------------------------


@dataclass
class TokenTable:
    """Per-trace index arrays used by the feature kernel (all vectorised, built once)."""

    tok: np.ndarray  # int32[n]: token number of each row (tokens numbered in (seq, pos) order)
    tok_seq: np.ndarray  # int64[ntok]: sequence of each token
    tok_rank: np.ndarray  # int32[ntok]: index of the token in its sequence (0 = first)
    rowidx: np.ndarray  # int32[ntok, num_layers]: row of (token, layer), -1 if not recorded
    first_row: np.ndarray  # int64[ntok]: one row of each token (to read its text / id)

    @property
    def num_tokens(self) -> int:
        return int(self.tok_seq.shape[0])


def token_table(trace: Trace) -> TokenTable:
    n = trace.num_rows
    nl = int(trace.meta.num_layers)
    if n == 0:
        return TokenTable(
            np.zeros(0, np.int32),
            np.zeros(0, np.int64),
            np.zeros(0, np.int32),
            np.zeros((0, nl), np.int32),
            np.zeros(0, np.int64),
        )
    order = np.lexsort((trace.pos, trace.seq))
    s, p = trace.seq[order], trace.pos[order]
    new = np.ones(n, np.bool_)
    new[1:] = (s[1:] != s[:-1]) | (p[1:] != p[:-1])
    tok_sorted = np.cumsum(new) - 1
    tok = np.empty(n, np.int32)
    tok[order] = tok_sorted
    ntok = int(tok_sorted[-1]) + 1
    rowidx = np.full((ntok, nl), -1, np.int32)
    rowidx[tok, trace.layer] = np.arange(n, dtype=np.int32)
    tok_seq = np.ascontiguousarray(s[new])
    first = np.ones(ntok, np.bool_)
    first[1:] = tok_seq[1:] != tok_seq[:-1]
    tnum = np.arange(ntok)
    tok_rank = (tnum - np.maximum.accumulate(np.where(first, tnum, 0))).astype(np.int32)
    return TokenTable(tok, tok_seq, tok_rank, rowidx, order[new])


def token_keys(trace: Trace, kind: str, table: TokenTable) -> np.ndarray:
    """The key of each token (str for 'text', int64 for 'id'): what the vocabulary maps."""
    if kind == "text":
        return np.asarray(trace.token[table.first_row]).astype(str)
    return trace.token_id[table.first_row].astype(np.int64)


def token_kind(trace: Trace) -> str | None:
    """'text' if the trace carries token text, 'id' if token ids, None if neither."""
    if trace.token is not None and trace.num_rows:
        return "text"
    if trace.token_id is not None and trace.num_rows and np.any(trace.token_id >= 0):
        return "id"
    return None


def vocab_ids(keys: np.ndarray, vocab: np.ndarray) -> np.ndarray:
    """Vocabulary index + 1 of each key (0 = unknown). ``vocab`` is sorted."""
    if vocab.shape[0] == 0 or keys.shape[0] == 0:
        return np.zeros(keys.shape[0], np.int32)
    if vocab.dtype.kind == "U":
        keys = keys.astype(str)
    else:
        keys = keys.astype(np.int64)
    i = np.searchsorted(vocab, keys)
    i = np.minimum(i, vocab.shape[0] - 1)
    found = vocab[i] == keys
    return np.where(found, i + 1, 0).astype(np.int32)


# --------------------------------------------------------------------------------------------
# numba kernels: sparse features, embedding gather / scatter with lazy Adam, targets
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _features(
    rows, layer, step, offsets, experts, tok, tok_seq, tok_rank, rowidx, tokvoc,
    h, S, P, C, E, base_src, base_prev, base_tok, n_tok, base_pos, base_layer, feats, nf,
):  # fmt: skip
    """Active feature ids (rows of the embedding table) of each target row, -1 padded."""
    for b in range(rows.shape[0]):
        r = rows[b]
        L = np.int64(layer[r])
        t = tok[r]
        c = 0
        feats[b, c] = base_layer + L
        c += 1
        for k in range(S):
            m = L - h - k
            if m < 0:
                break
            rr = rowidx[t, m]
            if rr < 0:
                continue
            base = base_src + (L * S + k) * E
            for i in range(offsets[rr], offsets[rr + 1]):
                feats[b, c] = base + experts[i]
                c += 1
        for j in range(1, P + 1):
            pt = t - j
            if pt < 0 or tok_seq[pt] != tok_seq[t]:
                break
            rr = rowidx[pt, L]
            if rr < 0 or step[rr] >= step[r]:
                continue
            base = base_prev + (L * P + j - 1) * E
            for i in range(offsets[rr], offsets[rr + 1]):
                feats[b, c] = base + experts[i]
                c += 1
        if tokvoc.shape[0] > 0:
            feats[b, c] = base_tok + tokvoc[t]
            c += 1
            for j in range(1, C + 1):
                pt = t - j
                if pt < 0 or tok_seq[pt] != tok_seq[t]:
                    break
                feats[b, c] = base_tok + j * n_tok + tokvoc[pt]
                c += 1
        if base_pos >= 0:
            q = tok_rank[t]
            bucket = q if q < 4 else min(_NPOS - 1, 2 + int(math.log2(q)))
            feats[b, c] = base_pos + bucket
            c += 1
        nf[b] = c
        for i in range(c, feats.shape[1]):
            feats[b, i] = -1


@njit(cache=True, nogil=True, fastmath=True)
def _gather(emb, feats, nf, z):
    H = emb.shape[1]
    for b in range(feats.shape[0]):
        for j in range(H):
            z[b, j] = 0.0
        for i in range(nf[b]):
            f = feats[b, i]
            for j in range(H):
                z[b, j] += emb[f, j]


@njit(cache=True, nogil=True, fastmath=True)
def _sparse_adam(emb, m, v, gbuf, mark, touched, feats, nf, gz, lr, b1, b2, eps, c1, c2, wd):
    """Accumulate d(loss)/d(embedding rows) of a batch and apply lazy Adam to those rows."""
    H = emb.shape[1]
    nt = 0
    for b in range(feats.shape[0]):
        for i in range(nf[b]):
            f = feats[b, i]
            if not mark[f]:
                mark[f] = True
                touched[nt] = f
                nt += 1
            for j in range(H):
                gbuf[f, j] += gz[b, j]
    for q in range(nt):
        f = touched[q]
        mark[f] = False
        for j in range(H):
            g = gbuf[f, j]
            gbuf[f, j] = 0.0
            mj = b1 * m[f, j] + (1.0 - b1) * g
            vj = b2 * v[f, j] + (1.0 - b2) * g * g
            m[f, j] = mj
            v[f, j] = vj
            emb[f, j] -= lr * ((mj / c1) / (math.sqrt(vj / c2) + eps) + wd * emb[f, j])


@njit(cache=True, nogil=True)
def _targets(rows, offsets, experts, y):
    """y[b] = the row's actual experts, each 1/k (a distribution over experts)."""
    for b in range(rows.shape[0]):
        r = rows[b]
        for j in range(y.shape[1]):
            y[b, j] = 0.0
        k = offsets[r + 1] - offsets[r]
        for i in range(offsets[r], offsets[r + 1]):
            y[b, experts[i]] = 1.0 / k


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def _shape_of(meta: TraceMeta) -> dict:
    return {
        "num_layers": int(meta.num_layers),
        "experts_per_layer": [int(e) for e in meta.experts_per_layer],
        "top_k": None if meta.top_k is None else int(meta.top_k),
        "model": meta.model,
    }


class _Net:
    """The weights of one horizon's network and its Adam state."""

    KEYS = ("emb", "W2", "b2", "W1", "b1")

    def __init__(self, n_emb: int, cfg: LearnedConfig, nl: int, E: int, rng=None):
        H, H2 = cfg.hidden, cfg.hidden2
        Hout = H2 or H
        if rng is None:
            rng = np.random.default_rng(0)
        self.emb = (rng.standard_normal((n_emb, H)) * 0.1).astype(_DT)
        self.W2 = (rng.standard_normal((nl, Hout, E)) / math.sqrt(Hout)).astype(_DT)
        self.b2 = np.zeros((nl, E), _DT)
        self.W1 = (rng.standard_normal((H, H2)) * math.sqrt(2.0 / H)).astype(_DT)
        self.b1 = np.zeros(H2, _DT)

    def arrays(self, prefix: str) -> dict:
        return {f"{prefix}{k}": getattr(self, k) for k in self.KEYS}

    @classmethod
    def from_arrays(cls, arrays: dict, prefix: str) -> _Net:
        net = cls.__new__(cls)
        for k in cls.KEYS:
            setattr(net, k, np.ascontiguousarray(arrays[f"{prefix}{k}"], dtype=_DT))
        return net

    def logits(self, feats, nf, L: int) -> np.ndarray:
        z = np.empty((feats.shape[0], self.emb.shape[1]), _DT)
        _gather(self.emb, feats, nf, z)
        a = np.maximum(z, 0)
        if self.W1.shape[1]:
            a = np.maximum(a @ self.W1 + self.b1, 0)
        return a @ self.W2[L] + self.b2[L]


class LearnedPredictor:
    """Learned expert predictor: ``train``, ``predict``, ``save`` / ``load``."""

    def __init__(self, shape: dict, cfg: LearnedConfig, token_kind: str | None, vocab, nets):
        self.shape = shape
        self.cfg = cfg
        self.token_kind = token_kind  # 'text', 'id' or None (no token feature)
        self.vocab = vocab  # sorted keys (str or int64); index + 1 = embedding row
        self.nets: dict[int, _Net] = nets
        self.info: dict = {}

    # ---- layout of the embedding table -----------------------------------------------------
    @property
    def horizons(self) -> list[int]:
        return sorted(self.nets)

    def _layout(self):
        nl = self.shape["num_layers"]
        E = max(self.shape["experts_per_layer"])
        S, P = self.cfg.src_layers, self.cfg.prev_tokens
        base_src = 0
        base_prev = base_src + nl * S * E
        base_tok = base_prev + nl * P * E
        n_tok = (self.vocab.shape[0] + 1) if self.token_kind else 0
        base_pos = base_tok + n_tok * (1 + self.cfg.token_context)
        base_layer = base_pos + (_NPOS if self.cfg.position else 0)
        if not self.cfg.position:
            base_pos = -1
        return E, base_src, base_prev, base_tok, n_tok, base_pos, base_layer, base_layer + nl

    def _max_feats(self, trace: Trace) -> int:
        lens = np.diff(trace.offsets)
        mx = int(lens.max()) if lens.size else 0
        return 3 + self.cfg.token_context + (self.cfg.src_layers + self.cfg.prev_tokens) * mx

    # ---- compatibility -----------------------------------------------------------------------
    def check_trace(self, trace: Trace, where: str = "model") -> None:
        """Refuse a trace of another model shape, or one without the token column it needs."""
        m = trace.meta
        s = self.shape
        if (
            int(m.num_layers) != s["num_layers"]
            or [int(e) for e in m.experts_per_layer] != s["experts_per_layer"]
        ):
            raise ConfigError(
                f"{where}: trained for {_shape_text(s['num_layers'], s['experts_per_layer'])}"
                f" ({s['model']}), but {trace.path} has "
                f"{_shape_text(m.num_layers, m.experts_per_layer)} ({m.model}): "
                "expected a trace of the model it was trained on"
            )
        if self.token_kind:
            have = token_kind(trace)
            if have is None or (self.token_kind == "text" and trace.token is None):
                col = "token" if self.token_kind == "text" else "token_id"
                raise TraceError(
                    f"{trace.path}: no column '{col}': {where} uses the token "
                    f"{'text' if col == 'token' else 'ids'} as a feature (read the trace with "
                    "its text, or train a model with --no-token)"
                )
            if self.token_kind == "id" and have != "id":
                raise TraceError(
                    f"{trace.path}: column 'token_id' is absent or all null: {where} uses "
                    "token ids as a feature (or train a model with --no-token)"
                )

    # ---- features ------------------------------------------------------------------------------
    def _prepare(self, trace: Trace):
        table = token_table(trace)
        if self.token_kind:
            tokvoc = vocab_ids(token_keys(trace, self.token_kind, table), self.vocab)
        else:
            tokvoc = np.zeros(0, np.int32)
        return table, tokvoc

    def _feats(self, trace, table, tokvoc, rows, h, feats, nf):
        E, base_src, base_prev, base_tok, n_tok, base_pos, base_layer, _ = self._layout()
        cfg = self.cfg
        _features(
            rows, trace.layer, trace.step, trace.offsets, trace.experts, table.tok,
            table.tok_seq, table.tok_rank, table.rowidx, tokvoc, h, cfg.src_layers,
            cfg.prev_tokens, cfg.token_context, E, base_src, base_prev, base_tok, n_tok,
            base_pos, base_layer, feats, nf,
        )  # fmt: skip

    # ---- training --------------------------------------------------------------------------------
    @classmethod
    def train(cls, trace: Trace, cfg: LearnedConfig | None = None, log=None) -> LearnedPredictor:
        """Fit one network per horizon on every row of ``trace``; returns the model."""
        cfg = cfg or LearnedConfig()
        cfg.check()
        cfg.horizons = [int(h) for h in cfg.horizons]
        if trace.num_rows == 0:
            raise TraceError(f"{trace.path}: no rows to train on")
        kind = token_kind(trace) if cfg.use_token else None
        if cfg.use_token and kind is None and log:
            log("  (the trace has no token text or ids: training without the token feature)")
        model = cls(_shape_of(trace.meta), cfg, kind, np.zeros(0, np.int64), {})
        t0 = time.perf_counter()
        table = token_table(trace)
        if kind:
            keys = token_keys(trace, kind, table)
            uniq, counts = np.unique(keys, return_counts=True)
            model.vocab = np.ascontiguousarray(uniq[counts >= max(cfg.min_token_count, 1)])
            tokvoc = vocab_ids(keys, model.vocab)
        else:
            tokvoc = np.zeros(0, np.int32)
        *_, n_emb = model._layout()
        rng = np.random.default_rng(cfg.seed)
        stats = {"rows": trace.num_rows, "tokens": table.num_tokens, "vocab": len(model.vocab)}
        for h in cfg.horizons:
            th = time.perf_counter()
            net = _Net(n_emb, cfg, trace.meta.num_layers, max(trace.meta.experts_per_layer), rng)
            with blas_threads(1):
                loss = model._fit_one(trace, table, tokvoc, h, net, rng, log)
            model.nets[h] = net
            stats[f"h{h}_s"] = round(time.perf_counter() - th, 1)
            stats[f"h{h}_loss"] = round(float(loss), 4)
        stats["train_s"] = round(time.perf_counter() - t0, 1)
        model.info = {"trained_on": trace.path, **stats}
        return model

    def _fit_one(self, trace, table, tokvoc, h, net: _Net, rng, log) -> float:
        cfg = self.cfg
        nl = trace.meta.num_layers
        epl = np.asarray(trace.meta.experts_per_layer)
        E = net.W2.shape[2]
        B = cfg.batch
        # batches that share one target layer: rows grouped by layer, shuffled within
        rows_all = np.arange(trace.num_rows, dtype=np.int64)
        if cfg.max_rows and cfg.max_rows < rows_all.shape[0]:
            rows_all = np.sort(rng.choice(rows_all, cfg.max_rows, replace=False))
        lens = np.diff(trace.offsets)
        rows_all = rows_all[lens[rows_all] > 0]  # a row without experts teaches nothing
        by_layer = [rows_all[trace.layer[rows_all] == L] for L in range(nl)]
        n_batches = sum(math.ceil(len(r) / B) for r in by_layer)
        total = max(1, int(round(cfg.epochs * n_batches)))
        F = self._max_feats(trace)
        feats = np.empty((B, F), np.int32)
        nf = np.empty(B, np.int32)
        y = np.empty((B, E), _DT)
        adam = {
            k: (np.zeros_like(getattr(net, k)), np.zeros_like(getattr(net, k))) for k in net.KEYS
        }
        gbuf = np.zeros_like(net.emb)
        mark = np.zeros(net.emb.shape[0], np.bool_)
        touched = np.empty(net.emb.shape[0], np.int64)
        b1, b2, eps = 0.9, 0.999, 1e-8
        masks = [np.arange(E) >= epl[L] for L in range(nl)]
        step = 0
        ema = None
        bce = cfg.loss == "bce"
        t_start = time.perf_counter()
        next_log = t_start + 10
        while step < total:
            plan = []
            for L in range(nl):
                r = rng.permutation(by_layer[L])
                plan += [(L, r[i : i + B]) for i in range(0, len(r), B)]
            order = rng.permutation(len(plan))
            for pi in order:
                if step >= total:
                    break
                L, rows = plan[pi]
                nb = rows.shape[0]
                fb, nfb, yb = feats[:nb], nf[:nb], y[:nb]
                self._feats(trace, table, tokvoc, rows, h, fb, nfb)
                _targets(rows, trace.offsets, trace.experts, yb)
                # forward
                z = np.empty((nb, net.emb.shape[1]), _DT)
                _gather(net.emb, fb, nfb, z)
                a = np.maximum(z, 0)
                if net.W1.shape[1]:
                    z1 = a @ net.W1 + net.b1
                    a1 = np.maximum(z1, 0)
                else:
                    a1 = a
                logits = a1 @ net.W2[L] + net.b2[L]
                if masks[L].any():
                    logits[:, masks[L]] = -1e30
                if bce:
                    yt = (yb > 0).astype(_DT)
                    p = 1.0 / (1.0 + np.exp(-logits))
                    lp = np.log(np.maximum(p, 1e-30))
                    lq = np.log(np.maximum(1 - p, 1e-30))
                    loss = -float(np.sum(yt * lp + (1 - yt) * lq)) / nb
                    g = (p - yt) / nb
                else:
                    logits -= logits.max(axis=1, keepdims=True)
                    p = np.exp(logits)
                    p /= p.sum(axis=1, keepdims=True)
                    loss = -float(np.sum(yb * np.log(np.maximum(p, 1e-30)))) / nb
                    g = (p - yb) / nb
                ema = loss if ema is None else 0.99 * ema + 0.01 * loss
                # backward
                gW2 = a1.T @ g
                gb2 = g.sum(axis=0)
                ga = g @ net.W2[L].T
                step += 1
                frac = step / total
                lr = cfg.lr * min(1.0, step / 200) * max(0.05, 1.0 - frac)  # warm-up, linear decay
                c1 = 1 - b1**step
                c2 = 1 - b2**step
                grads = [("W2", gW2, L), ("b2", gb2, L)]
                if net.W1.shape[1]:
                    gz1 = ga * (z1 > 0)
                    grads += [("W1", a.T @ gz1, None), ("b1", gz1.sum(axis=0), None)]
                    ga = gz1 @ net.W1.T
                gz = np.ascontiguousarray(ga * (z > 0), dtype=_DT)
                for k, gk, idx in grads:
                    w = getattr(net, k)
                    m, v = adam[k]
                    if idx is not None:
                        w, m, v = w[idx], m[idx], v[idx]
                    m *= b1
                    m += (1 - b1) * gk
                    v *= b2
                    v += (1 - b2) * gk * gk
                    w -= (lr * (m / c1) / (np.sqrt(v / c2) + eps)).astype(_DT)
                me, ve = adam["emb"]
                _sparse_adam(
                    net.emb, me, ve, gbuf, mark, touched, fb, nfb, gz, _DT(lr), _DT(b1),
                    _DT(b2), _DT(eps), _DT(c1), _DT(c2), _DT(cfg.weight_decay),
                )  # fmt: skip
                if log and time.perf_counter() >= next_log:
                    next_log += 10
                    log(
                        f"  h={h}: batch {step:,}/{total:,} loss {ema:.4f} "
                        f"({time.perf_counter() - t_start:.0f} s)"
                    )
        if log:
            log(
                f"  h={h}: {total:,} batches, loss {ema:.4f}, {time.perf_counter() - t_start:.1f} s"
            )
        return ema if ema is not None else float("nan")

    # ---- inference -------------------------------------------------------------------------------
    def scores(self, trace: Trace, horizon: int, rows: np.ndarray | None = None, _prep=None):
        """Logits float32[len(rows), E] of the rows (all rows by default), for ``horizon``."""
        net = self._net(horizon)
        self.check_trace(trace)
        table, tokvoc = _prep or self._prepare(trace)
        rows = np.arange(trace.num_rows, dtype=np.int64) if rows is None else np.asarray(rows)
        rows = rows.astype(np.int64)
        E = net.W2.shape[2]
        out = np.empty((rows.shape[0], E), _DT)
        F = self._max_feats(trace)
        chunk = 8192
        feats = np.empty((chunk, F), np.int32)
        nf = np.empty(chunk, np.int32)
        lay = trace.layer[rows]
        order = np.argsort(lay, kind="stable")
        bounds = np.searchsorted(lay[order], np.arange(trace.meta.num_layers + 1))
        epl = self.shape["experts_per_layer"]
        for L in range(trace.meta.num_layers):
            idx = order[bounds[L] : bounds[L + 1]]
            for i in range(0, idx.shape[0], chunk):
                sel = idx[i : i + chunk]
                nb = sel.shape[0]
                self._feats(trace, table, tokvoc, rows[sel], horizon, feats[:nb], nf[:nb])
                lg = net.logits(feats[:nb], nf[:nb], L)
                lg[:, epl[L] :] = -np.inf
                out[sel] = lg
        return out

    def predict(self, trace: Trace, horizon: int, k: int | None = None):
        """Top-k predicted experts of every row, best first, as CSR (offsets, ids)."""
        if k is None:
            k = self.shape["top_k"] or self.info.get("mean_k") or 1
        k = int(k)
        if k < 1:
            raise ConfigError(f"top_k: expected an integer >= 1, got {k}")
        lg = self.scores(trace, horizon)
        n, E = lg.shape
        kk = min(k, E)
        if n == 0:
            return np.zeros(1, np.int64), np.zeros(0, np.int16)
        part = np.argpartition(-lg, kk - 1, axis=1)[:, :kk]
        ps = np.take_along_axis(lg, part, axis=1)
        ranked = np.take_along_axis(part, np.argsort(-ps, axis=1, kind="stable"), axis=1)
        epl = np.asarray(self.shape["experts_per_layer"])
        klen = np.minimum(kk, epl[trace.layer])  # a layer with fewer experts than k
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(klen, out=offsets[1:])
        keep = np.arange(kk)[None, :] < klen[:, None]
        return offsets, ranked[keep].astype(np.int16)

    def _net(self, horizon: int) -> _Net:
        h = int(horizon)
        if h not in self.nets:
            raise ConfigError(
                f"horizon {h}: the model was trained for horizons {self.horizons} "
                "(train it with --horizons including it)"
            )
        return self.nets[h]

    # ---- save / load ---------------------------------------------------------------------------
    def header(self) -> dict:
        E, *_, n_emb = self._layout()
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "shape": self.shape,
            "horizons": self.horizons,
            "token_kind": self.token_kind,
            "vocab_size": int(self.vocab.shape[0]),
            "embedding_rows": int(n_emb),
            "config": asdict(self.cfg),
            "info": self.info,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as one .npz (weights, vocabulary, JSON header), atomically."""
        from traces.io import atomic_path

        path = Path(path)
        arrays = {"meta_json": np.array(json.dumps(self.header()))}
        arrays["vocab"] = self.vocab
        for h, net in self.nets.items():
            arrays.update(net.arrays(f"h{h}_"))
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LearnedPredictor:
        """Read a model written by ``save``; a file of any other kind is a one-line ConfigError."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such model file") from None
        except Exception as exc:
            raise ConfigError(
                f"{path}: not a moesim learned-predictor model (.npz): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
        try:
            head = json.loads(str(arrays["meta_json"]))
        except (KeyError, ValueError):
            raise ConfigError(
                f"{path}: not a moesim learned-predictor model (no JSON header 'meta_json')"
            ) from None
        if head.get("format") != FORMAT:
            raise ConfigError(
                f"{path}: not a moesim learned-predictor model (format {head.get('format')!r})"
            )
        if head.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"{path}: model format version {head.get('format_version')!r}, expected "
                f"{FORMAT_VERSION} (written by another moesim?)"
            )
        try:
            cfg = LearnedConfig(**head["config"])
            shape = head["shape"]
            model = cls(shape, cfg, head["token_kind"], arrays["vocab"], {})
            for h in head["horizons"]:
                model.nets[int(h)] = _Net.from_arrays(arrays, f"h{h}_")
            model.info = head.get("info", {})
            E, *_, n_emb = model._layout()
            for h, net in model.nets.items():
                want = (n_emb, cfg.hidden)
                if net.emb.shape != want or net.W2.shape != (
                    shape["num_layers"],
                    cfg.hidden2 or cfg.hidden,
                    E,
                ):
                    raise ValueError(f"h{h} weights of shape {net.emb.shape}, expected {want}")
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: damaged model file: {exc}") from None
        return model


def _shape_text(num_layers, experts_per_layer) -> str:
    epl = list(experts_per_layer)
    e = epl[0] if len(set(epl)) == 1 else epl
    return f"{num_layers} MoE layers x {e} experts"
