"""A learned expert predictor (MoE-Beyond style), trained offline on activation traces.

For a token at MoE layer ``l`` it predicts the experts the token will route to at layer
``L = l + h`` (horizon ``h``), from what a runtime knows once layer ``l`` has run
(docs/predictors.md):

- the token's own experts at layers ``l, l-1, ..., l-S+1`` (``src_layers`` = S, default 8);
- the experts of the sequence's previous ``P`` tokens at the target layer ``L`` (``prev_tokens``,
  default 2), used only when those tokens ran in an earlier step (always in token-by-token
  decoding; never inside one prefill step, where layer ``L`` has not run yet for anyone);
- the token itself and the ``C`` tokens before it (text, or ``token_id``), through learned
  embeddings; tokens seen fewer than ``min_token_count`` times in training share one "unknown"
  row; plus the hashed character 3-grams of the token text (``subwords`` buckets), which give
  rare and unseen tokens something to go on;
- the target layer.

The network of a horizon is a small MLP over these sparse multi-hot features::

    z      = sum of the embedding rows of the active features   (H numbers)
    hidden = relu(z)                      [ -> relu(hidden @ W1 + b1) with hidden2 > 0 ]
    logits = hidden @ W2[L] + b2[L]       (one output matrix per target layer, E logits)

trained with softmax cross-entropy against the actual experts (each weighted 1/k) by mini-batch
Adam (lazy Adam for the embedding rows a batch touches), ``ensemble`` networks per horizon.
The prediction at horizon ``h`` ranks experts by the mean log-probability of the ``h``
networks plus ``horizon_mix`` times that of each longer horizon's (made even earlier, so
nothing the runtime would not know); the top-k are the prediction, best first. The sparse
first layer (gather and scatter of embedding rows, per row of the trace) runs in numba
kernels; the dense layers are numpy matrix products, in batches that share one target layer.
No torch.

A model is saved as one ``.npz`` file: the weights (float16), the token vocabulary and a JSON
header (``meta_json``) naming the model shape (layers, experts per layer), the horizons, the
features and the training settings. Loading checks the format; using it on a trace of another
shape is a one-line ConfigError.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from numba import njit, prange

from traces._jit import parallel_ok  # (also: numba's cache folder, set before any kernel)
from traces.errors import ConfigError, TraceError
from traces.format import TraceMeta
from traces.trace import Trace

FORMAT = "moesim-learned-predictor"
FORMAT_VERSION = 1
PRED_SOURCE = "moesim-learned"

_DT = np.float32
_NPOS = 12  # position buckets: 0, 1, 2, 3, 4-7, 8-15, ..., >= 512
_MAX_GRAMS = 16  # at most this many character 3-grams per token text


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

    _found: tuple | None = None  # the (set, get) pair once found: looked up once per process

    def __init__(self, n: int = 1):
        self.n = n
        self._set = self._get = None

    @classmethod
    def _functions(cls):
        if cls._found is None:
            found = cls._lookup()
            if found[0] is None:
                return found  # not loaded yet, perhaps: look again next time
            cls._found = found
        return cls._found

    @classmethod
    def _lookup(cls):
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
    src_layers: int = 8  # the token's experts at layers l .. l-src_layers+1
    prev_tokens: int = 2  # the previous tokens' experts at the target layer, one table each
    use_token: bool = True  # token text / id embedding (when the trace has it)
    token_context: int = 1  # also the ids of the previous C tokens (one table each)
    position: bool = False  # a log2 bucket of the token's index in its sequence
    subwords: int = 4096  # hash buckets for the character 3-grams of the token text (0: off)
    min_token_count: int = 2  # rarer tokens share the "unknown" embedding
    hidden: int = 512
    hidden2: int = 0  # a second hidden layer (0: none)
    epochs: float = 2.0  # passes over the training rows (fractions allowed)
    batch: int = 1024
    lr: float = 3e-3
    weight_decay: float = 0.0  # on the embedding rows, decoupled (AdamW-style)
    dropout: float = 0.0  # dropout on the last hidden layer while training
    ensemble: int = 1  # networks per horizon (different seeds), log-probabilities averaged
    horizon_mix: float = 0.5  # predict: + this x the log-probabilities of longer horizons
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
            "src_layers", "prev_tokens", "token_context", "subwords", "min_token_count", "hidden2",
            "max_rows",
        ):  # fmt: skip
            if getattr(self, key) < 0:
                bad(key, "an integer >= 0", getattr(self, key))
        if self.horizon_mix < 0:
            bad("horizon_mix", "a number >= 0", self.horizon_mix)
        for key in ("hidden", "batch", "ensemble"):
            if getattr(self, key) < 1:
                bad(key, "an integer >= 1", getattr(self, key))
        if not self.epochs > 0:
            bad("epochs", "a number > 0", self.epochs)
        if not self.lr > 0:
            bad("lr", "a number > 0", self.lr)
        if self.weight_decay < 0:
            bad("weight_decay", "a number >= 0", self.weight_decay)
        if not 0 <= self.dropout < 1:
            bad("dropout", "a number in [0, 1)", self.dropout)


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
        import pandas as pd

        text = np.asarray(trace.token[table.first_row], dtype=object)
        return np.where(pd.isna(text), "\x00", text).astype(str)  # null text: its own key
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


def subword_ids(keys: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR (offsets, bucket ids) of the hashed character 3-grams of each token text.

    The text is framed as ``<text>``; a text of 1 character gives one gram. Hashing is CRC-32,
    stable across runs and machines. Work is per distinct text, not per row.
    """
    import zlib

    uniq, inv = np.unique(np.asarray(keys).astype(str), return_inverse=True)
    lens = np.empty(uniq.shape[0], np.int64)
    ids: list[int] = []
    for i, text in enumerate(uniq.tolist()):  # distinct texts only
        w = f"<{text}>".encode()
        grams = {zlib.crc32(w[j : j + 3]) % buckets for j in range(max(1, len(w) - 2))}
        grams = sorted(grams)[:_MAX_GRAMS]
        lens[i] = len(grams)
        ids.extend(grams)
    u_off = np.zeros(uniq.shape[0] + 1, np.int64)
    np.cumsum(lens, out=u_off[1:])
    u_ids = np.asarray(ids, np.int32)
    # expand to tokens: token i takes the list of its text uniq[inv[i]]
    inv = inv.ravel()
    t_len = lens[inv]
    off = np.zeros(inv.shape[0] + 1, np.int64)
    np.cumsum(t_len, out=off[1:])
    start = np.repeat(u_off[inv] - off[:-1], t_len)
    return off, u_ids[np.arange(off[-1]) + start]


@dataclass
class _Prep:
    """What the feature kernel needs of one trace besides its own arrays."""

    table: TokenTable
    tokvoc: np.ndarray  # int32[ntok]: vocabulary index + 1 (0 unknown); empty: no token feature
    sub_off: np.ndarray  # int64[ntok + 1]: CSR offsets of each token's subword buckets
    sub_ids: np.ndarray  # int32[...]: subword buckets


# --------------------------------------------------------------------------------------------
# numba kernels: sparse features, embedding gather / scatter with lazy Adam, targets
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _features(
    rows, layer, step, offsets, experts, tok, tok_seq, tok_rank, rowidx, tokvoc, sub_off,
    sub_ids, h, S, P, C, E, b_layer, b_src, b_prev, b_tok, n_tok, b_sub, b_pos,
    feats, vals, nf,
):  # fmt: skip
    """Active features (rows of the embedding table) and their values, per target row.

    A base of -1 switches a feature group off. Previous tokens' experts count only when that
    token's row ran in an earlier step than the target row (not inside one prefill step).
    """
    for b in range(rows.shape[0]):
        r = rows[b]
        L = np.int64(layer[r])
        t = tok[r]
        c = 0
        feats[b, c] = b_layer + L
        vals[b, c] = 1.0
        c += 1
        for k in range(S):  # the token's own experts at layers L-h, L-h-1, ...
            m = L - h - k
            if m < 0:
                break
            rr = rowidx[t, m]
            if rr < 0:
                continue
            base = b_src + (L * S + k) * E
            for i in range(offsets[rr], offsets[rr + 1]):
                feats[b, c] = base + experts[i]
                vals[b, c] = 1.0
                c += 1
        for j in range(1, P + 1):  # the previous tokens' experts at layer L
            pt = t - j
            if pt < 0 or tok_seq[pt] != tok_seq[t]:
                break
            rr = rowidx[pt, L]
            if rr < 0 or step[rr] >= step[r]:
                continue
            base = b_prev + (L * P + j - 1) * E
            for i in range(offsets[rr], offsets[rr + 1]):
                feats[b, c] = base + experts[i]
                vals[b, c] = 1.0
                c += 1
        if tokvoc.shape[0] > 0:  # the token and the C tokens before it
            feats[b, c] = b_tok + tokvoc[t]
            vals[b, c] = 1.0
            c += 1
            for j in range(1, C + 1):
                pt = t - j
                if pt < 0 or tok_seq[pt] != tok_seq[t]:
                    break
                feats[b, c] = b_tok + j * n_tok + tokvoc[pt]
                vals[b, c] = 1.0
                c += 1
        if b_sub >= 0:  # the token text's character 3-grams (hashed), mean
            n = sub_off[t + 1] - sub_off[t]
            for i in range(sub_off[t], sub_off[t + 1]):
                feats[b, c] = b_sub + sub_ids[i]
                vals[b, c] = 1.0 / n
                c += 1
        if b_pos >= 0:
            q = tok_rank[t]
            bucket = q if q < 4 else min(_NPOS - 1, 2 + int(math.log2(q)))
            feats[b, c] = b_pos + bucket
            vals[b, c] = 1.0
            c += 1
        nf[b] = c


@njit(cache=True, nogil=True, fastmath=True)
def _gather(emb, feats, vals, nf, z):
    """z[b] = sum of vals[b, i] * emb[feats[b, i]]."""
    for b in range(feats.shape[0]):
        _gather_row(emb, feats, vals, nf, z, b)


@njit(cache=True, nogil=True, fastmath=True, parallel=True)
def _gather_parallel(emb, feats, vals, nf, z):
    """:func:`_gather` with the rows spread over the cores (each row summed by one thread in
    the same order: the same numbers)."""
    for b in prange(feats.shape[0]):
        _gather_row(emb, feats, vals, nf, z, b)


@njit(inline="always", nogil=True, fastmath=True)
def _gather_row(emb, feats, vals, nf, z, b):
    H = emb.shape[1]
    zb = z[b]
    zb[:] = 0.0
    for i in range(nf[b]):
        w = vals[b, i]
        row = emb[feats[b, i]]
        for j in range(H):
            zb[j] += w * row[j]


@njit(cache=True, nogil=True, fastmath=True)
def _sparse_adam(
    emb, m, v, gbuf, mark, touched, feats, vals, nf, gz, b1, b2, a1, a2, step, inv_c2, eps, lrwd
):  # fmt: skip
    """Accumulate d(loss)/d(embedding rows) of a batch and apply lazy Adam to those rows.

    All constants are float32 (a float64 one would turn the whole update into float64):
    ``a1 = 1 - b1``, ``a2 = 1 - b2``, ``step = lr / (1 - b1**t)``, ``inv_c2 = 1 / (1 - b2**t)``,
    ``lrwd = lr * weight_decay``.
    """
    H = emb.shape[1]
    nt = 0
    for b in range(feats.shape[0]):
        gzb = gz[b]
        for i in range(nf[b]):
            f = feats[b, i]
            w = vals[b, i]
            if not mark[f]:
                mark[f] = True
                touched[nt] = f
                nt += 1
            gr = gbuf[f]
            for j in range(H):
                gr[j] += w * gzb[j]
    for q in range(nt):
        f = touched[q]
        mark[f] = False
        gr = gbuf[f]
        mr = m[f]
        vr = v[f]
        er = emb[f]
        for j in range(H):
            g = gr[j]
            mj = b1 * mr[j] + a1 * g
            vj = b2 * vr[j] + a2 * g * g
            mr[j] = mj
            vr[j] = vj
            er[j] -= step * mj / (np.sqrt(vj * inv_c2) + eps) + lrwd * er[j]
        gr[:] = 0.0


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
    """The weights of one horizon's network."""

    KEYS = ("emb", "W1", "b1", "W2", "b2")

    def __init__(self, n_emb: int, cfg: LearnedConfig, nl: int, E: int, rng=None):
        H, H2 = cfg.hidden, cfg.hidden2
        Hout = H2 or H
        if rng is None:
            rng = np.random.default_rng(0)
        self.emb = (rng.standard_normal((n_emb, H)) * 0.1).astype(_DT)
        self.W1 = (rng.standard_normal((H, H2)) * math.sqrt(2.0 / H)).astype(_DT)
        self.b1 = np.zeros(H2, _DT)
        self.W2 = (rng.standard_normal((nl, Hout, E)) / math.sqrt(Hout)).astype(_DT)
        self.b2 = np.zeros((nl, E), _DT)

    def arrays(self, prefix: str) -> dict:
        return {f"{prefix}{k}": getattr(self, k) for k in self.KEYS}

    @classmethod
    def from_arrays(cls, arrays: dict, prefix: str) -> _Net:
        net = cls.__new__(cls)
        for k in cls.KEYS:
            setattr(net, k, np.ascontiguousarray(arrays[f"{prefix}{k}"], dtype=_DT))
        return net

    def round_to_float16(self) -> None:
        for k in self.KEYS:
            setattr(self, k, getattr(self, k).astype(np.float16).astype(_DT))

    def forward(self, feats, vals, nf, L: int, keep=None, parallel: bool = False):
        """(logits, z, a, z1, a1) of a batch whose rows all target layer L.

        ``keep``: a dropout mask (already scaled by 1 / (1 - p)) on the last hidden layer.
        ``parallel``: gather the embeddings on all cores (inference; same numbers).
        """
        z = np.empty((feats.shape[0], self.emb.shape[1]), _DT)
        (_gather_parallel if parallel else _gather)(self.emb, feats, vals, nf, z)
        a = np.maximum(z, 0)
        z1 = a1 = a
        if self.W1.shape[1]:
            z1 = a @ self.W1 + self.b1
            a1 = np.maximum(z1, 0)
        if keep is not None:
            a1 = a1 * keep
        return a1 @ self.W2[L] + self.b2[L], z, a, z1, a1


class LearnedPredictor:
    """Learned expert predictor: ``train``, ``predict``, ``save`` / ``load``."""

    def __init__(self, shape: dict, cfg: LearnedConfig, token_kind: str | None, vocab, nets):
        self.shape = shape
        self.cfg = cfg
        self.token_kind = token_kind  # 'text', 'id' or None (no token feature)
        self.vocab = vocab  # sorted keys (str or int64); index + 1 = embedding row
        self.nets: dict[int, list[_Net]] = nets  # horizon -> its network(s)
        self.info: dict = {}

    # ---- layout of the embedding table -----------------------------------------------------
    @property
    def horizons(self) -> list[int]:
        return sorted(self.nets)

    def _layout(self) -> dict:
        """Where each feature group starts in the embedding table (-1: group off), and its size."""
        cfg = self.cfg
        nl = self.shape["num_layers"]
        E = max(self.shape["experts_per_layer"])
        n_tok = (self.vocab.shape[0] + 1) if self.token_kind else 0
        sizes = {
            "layer": nl,
            "src": nl * cfg.src_layers * E,
            "prev": nl * cfg.prev_tokens * E,
            "tok": n_tok * (1 + cfg.token_context),
            "sub": cfg.subwords if self.token_kind == "text" else 0,
            "pos": _NPOS if cfg.position else 0,
        }
        out = {"E": E, "n_tok": n_tok}
        base = 0
        for name, size in sizes.items():
            out[name] = base if size else -1
            base += size
        out["rows"] = base
        return out

    def _max_feats(self, trace: Trace) -> int:
        lens = np.diff(trace.offsets)
        mx = int(lens.max()) if lens.size else 0
        cfg = self.cfg
        sub = _MAX_GRAMS if cfg.subwords else 0
        return 3 + cfg.token_context + (cfg.src_layers + cfg.prev_tokens) * mx + sub

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
    def _prepare(self, trace: Trace) -> _Prep:
        table = token_table(trace)
        keys = token_keys(trace, self.token_kind, table) if self.token_kind else None
        return self._prep_keys(table, keys)

    def _prep_keys(self, table: TokenTable, keys) -> _Prep:
        none = np.zeros(0, np.int32)
        if keys is None:
            return _Prep(table, none, np.zeros(1, np.int64), none)
        tokvoc = vocab_ids(keys, self.vocab)
        if self.token_kind == "text" and self.cfg.subwords:
            sub_off, sub_ids = subword_ids(keys, self.cfg.subwords)
        else:
            sub_off, sub_ids = np.zeros(1, np.int64), none
        return _Prep(table, tokvoc, sub_off, sub_ids)

    def _feats(self, prep: _Prep, trace, rows, h, feats, vals, nf):
        lay = self._layout()
        cfg = self.cfg
        t = prep.table
        _features(
            rows, trace.layer, trace.step, trace.offsets, trace.experts, t.tok, t.tok_seq,
            t.tok_rank, t.rowidx, prep.tokvoc, prep.sub_off, prep.sub_ids, h, cfg.src_layers,
            cfg.prev_tokens, cfg.token_context, lay["E"], lay["layer"], lay["src"], lay["prev"],
            lay["tok"], lay["n_tok"], lay["sub"], lay["pos"], feats, vals, nf,
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
        keys = None
        if kind:
            keys = token_keys(trace, kind, table)
            uniq, counts = np.unique(keys, return_counts=True)
            model.vocab = np.ascontiguousarray(uniq[counts >= max(cfg.min_token_count, 1)])
        prep = model._prep_keys(table, keys)
        n_emb = model._layout()["rows"]
        rng = np.random.default_rng(cfg.seed)
        stats = {
            "rows": min(cfg.max_rows, trace.num_rows) if cfg.max_rows else trace.num_rows,
            "trace_rows": trace.num_rows,
            "tokens": table.num_tokens,
            "vocab": len(model.vocab),
            "mean_k": max(1, int(round(trace.num_activations / trace.num_rows))),
        }
        nl, E = trace.meta.num_layers, max(trace.meta.experts_per_layer)
        for h in cfg.horizons:
            th = time.perf_counter()
            model.nets[h] = []
            losses = []
            for _ in range(cfg.ensemble):
                net = _Net(n_emb, cfg, nl, E, rng)
                with blas_threads(1):
                    losses.append(model._fit_one(prep, trace, h, net, rng, log))
                net.round_to_float16()  # what save() stores: a loaded model predicts the same
                model.nets[h].append(net)
            stats[f"h{h}_s"] = round(time.perf_counter() - th, 1)
            stats[f"h{h}_loss"] = round(float(np.mean(losses)), 4)
        stats["train_s"] = round(time.perf_counter() - t0, 1)
        model.info = {"trained_on": trace.path, **stats}
        return model

    def _fit_one(self, prep: _Prep, trace: Trace, h: int, net: _Net, rng, log) -> float:
        """Mini-batch Adam on softmax cross-entropy; returns the final (smoothed) loss."""
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
        warm = max(1, min(200, total // 20))
        H_last = net.W2.shape[1]
        F = self._max_feats(trace)
        feats = np.empty((B, F), np.int32)
        vals = np.empty((B, F), _DT)
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
        ema = float("nan")
        t_start = time.perf_counter()
        next_log = t_start + 10
        while step < total:
            plan = []
            for L in range(nl):
                r = rng.permutation(by_layer[L])
                plan += [(L, r[i : i + B]) for i in range(0, len(r), B)]
            for pi in rng.permutation(len(plan)):
                if step >= total:
                    break
                L, rows = plan[pi]
                nb = rows.shape[0]
                fb, vb, nfb, yb = feats[:nb], vals[:nb], nf[:nb], y[:nb]
                self._feats(prep, trace, rows, h, fb, vb, nfb)
                _targets(rows, trace.offsets, trace.experts, yb)
                keep = None
                if cfg.dropout:
                    keep = rng.random((nb, H_last), dtype=_DT) >= cfg.dropout
                    keep = keep.astype(_DT) * _DT(1 / (1 - cfg.dropout))
                logits, z, a, z1, a1 = net.forward(fb, vb, nfb, L, keep)
                if masks[L].any():
                    logits[:, masks[L]] = -1e30
                logits -= logits.max(axis=1, keepdims=True)
                p = np.exp(logits)
                p /= p.sum(axis=1, keepdims=True)
                loss = -float(np.sum(yb * np.log(np.maximum(p, 1e-30)))) / nb
                ema = loss if step == 0 else 0.99 * ema + 0.01 * loss
                # backward
                g = (p - yb) / nb
                grads = [("W2", a1.T @ g, L), ("b2", g.sum(axis=0), L)]
                ga = g @ net.W2[L].T
                if keep is not None:
                    ga *= keep
                if net.W1.shape[1]:
                    gz1 = ga * (z1 > 0)
                    grads += [("W1", a.T @ gz1, None), ("b1", gz1.sum(axis=0), None)]
                    ga = gz1 @ net.W1.T
                gz = np.ascontiguousarray(ga * (z > 0), dtype=_DT)
                step += 1
                # learning rate: linear warm-up, then linear decay to 5%
                lr = cfg.lr * min(1.0, step / warm) * max(0.05, 1.0 - step / total)
                c1 = 1 - b1**step
                c2 = 1 - b2**step
                for k, gk, idx in grads:
                    w = getattr(net, k)
                    m, v = adam[k]
                    if idx is not None:  # the batch's layer only (a view: updated in place)
                        w, m, v = w[idx], m[idx], v[idx]
                    m *= b1
                    m += (1 - b1) * gk
                    v *= b2
                    v += (1 - b2) * gk * gk
                    w -= (lr * (m / c1) / (np.sqrt(v / c2) + eps)).astype(_DT)
                me, ve = adam["emb"]
                _sparse_adam(
                    net.emb, me, ve, gbuf, mark, touched, fb, vb, nfb, gz, _DT(b1), _DT(b2),
                    _DT(1 - b1), _DT(1 - b2), _DT(lr / c1), _DT(1 / c2), _DT(eps),
                    _DT(lr * cfg.weight_decay),
                )  # fmt: skip
                if log and time.perf_counter() >= next_log:
                    next_log += 30
                    log(
                        f"  h={h}: batch {step:,}/{total:,}, loss {ema:.4f} "
                        f"({time.perf_counter() - t_start:.0f} s)"
                    )
        if log:
            took = time.perf_counter() - t_start
            log(f"  h={h}: {total:,} batches of {B}, loss {ema:.4f}, {took:.1f} s")
        return ema

    # ---- inference -------------------------------------------------------------------------------
    def log_probs(self, trace: Trace, horizon: int, _prep=None) -> np.ndarray:
        """float32[n, E]: log-probabilities of each row's experts from the ``horizon`` network(s)
        (the mean over an ensemble); -inf for expert ids a layer does not have."""
        self._net(horizon)
        self.check_trace(trace)
        prep = _prep or self._prepare(trace)
        out = np.zeros((trace.num_rows, max(self.shape["experts_per_layer"])), _DT)
        for sel, lps in self._block_log_probs(trace, prep, [int(horizon)]):
            out[sel] = lps[int(horizon)]
        return out

    def _block_log_probs(self, trace: Trace, prep, horizons):
        """Yields ``(rows, {h: float32[len(rows), E]})``: :meth:`log_probs` of each horizon in
        ``horizons`` for one block of rows at a time (rows of one target layer, at most 8,192),
        the same numbers as over the whole trace; every horizon's networks see each block."""
        n_e = max(self.shape["experts_per_layer"])
        F = self._max_feats(trace)
        chunk = 8192
        feats = np.empty((chunk, F), np.int32)
        vals = np.empty((chunk, F), _DT)
        nf = np.empty(chunk, np.int32)
        order = np.argsort(trace.layer, kind="stable")
        bounds = np.searchsorted(trace.layer[order], np.arange(trace.meta.num_layers + 1))
        epl = self.shape["experts_per_layer"]
        par = parallel_ok()  # off the main thread the gather stays on the calling thread
        for L in range(trace.meta.num_layers):
            idx = order[bounds[L] : bounds[L + 1]]
            for i in range(0, idx.shape[0], chunk):
                sel = idx[i : i + chunk]
                nb = sel.shape[0]
                lps = {}
                for h in horizons:
                    nets = self._net(h)
                    self._feats(prep, trace, sel, h, feats[:nb], vals[:nb], nf[:nb])
                    acc = np.zeros((nb, n_e), _DT)
                    for net in nets:
                        with blas_threads(1):
                            lg = net.forward(feats[:nb], vals[:nb], nf[:nb], L, parallel=par)[0]
                        lg[:, epl[L] :] = -np.inf
                        lg -= lg.max(axis=1, keepdims=True)
                        lg -= np.log(np.exp(lg).sum(axis=1, keepdims=True))
                        acc += lg
                    lps[h] = acc / len(nets)
                yield sel, lps

    def _mix(self, mix) -> float:
        mix = self.cfg.horizon_mix if mix is None else float(mix)
        if mix < 0:
            raise ConfigError(f"horizon mix: expected a number >= 0, got {mix}")
        return mix

    def _mixed(self, lps: dict, horizon: int, mix: float) -> np.ndarray:
        """The ranking scores at ``horizon`` from the horizons' log-probabilities (see
        :meth:`scores`): a new array, the longer horizons added in increasing order."""
        out = lps[horizon].copy()
        if mix > 0:
            for h in self.horizons:
                if h > horizon:
                    out += mix * lps[h]
        return out

    def scores(self, trace: Trace, horizon: int, mix: float | None = None) -> np.ndarray:
        """float32[n, E]: the ranking scores of each row's experts at ``horizon``.

        The log-probabilities of the ``horizon`` network plus ``mix`` (default: the model's
        ``horizon_mix``) times those of each longer horizon the model has: their predictions
        were made even earlier, from less, so the mix uses nothing the runtime would not know
        ``horizon`` layers ahead; it averages out part of each network's error.
        """
        horizon = int(horizon)
        self._net(horizon)
        mix = self._mix(mix)
        self.check_trace(trace)
        need = [horizon] + ([h for h in self.horizons if h > horizon] if mix > 0 else [])
        out = np.zeros((trace.num_rows, max(self.shape["experts_per_layer"])), _DT)
        for sel, lps in self._block_log_probs(trace, self._prepare(trace), need):
            out[sel] = self._mixed(lps, horizon, mix)
        return out

    def predict(self, trace: Trace, horizon: int, k: int | None = None, mix=None):
        """Top-k predicted experts of every row, best first, as CSR (offsets, ids)."""
        return self.predict_many(trace, [horizon], k, mix)[int(horizon)]

    def predict_many(self, trace: Trace, horizons, k: int | None = None, mix=None) -> dict:
        """:meth:`predict` at each of ``horizons``: ``{h: (offsets, ids)}``, the same as one call
        per horizon, in one pass over the rows. Each network runs once per row, where separate
        calls ran a network once for its own horizon and once more for every shorter horizon
        whose mix uses it (at horizons 1, 2, 4: six passes, here three), and no (rows x
        experts) score matrix of the whole trace is held."""
        if k is None:
            k = self.shape["top_k"] or self.info.get("mean_k") or 1
        k = int(k)
        if k < 1:
            raise ConfigError(f"top_k: expected an integer >= 1, got {k}")
        want = sorted({int(h) for h in horizons})
        for h in want:
            self._net(h)
        mix = self._mix(mix)
        self.check_trace(trace)
        n = trace.num_rows
        E = max(self.shape["experts_per_layer"])
        kk = min(k, E)
        epl = np.asarray(self.shape["experts_per_layer"])
        klen = np.minimum(kk, epl[trace.layer])  # a layer with fewer experts than k
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(klen, out=offsets[1:])
        if n == 0:
            return {h: (np.zeros(1, np.int64), np.zeros(0, np.int16)) for h in want}
        need = set(want)
        if mix > 0:
            need |= {h for h in self.horizons if h > want[0]}
        ranked = {h: np.empty((n, kk), np.int64) for h in want}
        for sel, lps in self._block_log_probs(trace, self._prepare(trace), sorted(need)):
            for h in want:
                lg = self._mixed(lps, h, mix)
                part = np.argpartition(-lg, kk - 1, axis=1)[:, :kk]
                ps = np.take_along_axis(lg, part, axis=1)
                ranked[h][sel] = np.take_along_axis(part, np.argsort(-ps, axis=1, kind="stable"),
                                                    axis=1)  # fmt: skip
        keep = np.arange(kk)[None, :] < klen[:, None]
        return {h: (offsets.copy(), ranked[h][keep].astype(np.int16)) for h in want}

    def _net(self, horizon: int) -> list[_Net]:
        h = int(horizon)
        if h not in self.nets:
            raise ConfigError(
                f"horizon {h}: the model was trained for horizons {self.horizons} "
                "(train it with --horizons including it)"
            )
        return self.nets[h]

    # ---- save / load ---------------------------------------------------------------------------
    def header(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "shape": self.shape,
            "horizons": self.horizons,
            "token_kind": self.token_kind,
            "vocab_size": int(self.vocab.shape[0]),
            "embedding_rows": int(self._layout()["rows"]),
            "weights_dtype": "float16",
            "config": asdict(self.cfg),
            "info": self.info,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as one .npz (weights, vocabulary, JSON header), atomically."""
        from traces.io import atomic_path

        path = Path(path)
        arrays = {"meta_json": np.array(json.dumps(self.header()))}
        arrays["vocab"] = self.vocab
        for h, nets in self.nets.items():  # float16 on disk: the weights are rounded to it
            for i, net in enumerate(nets):
                w = net.arrays(f"h{h}_{i}_")
                arrays.update({k: v.astype(np.float16) for k, v in w.items()})
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
                model.nets[int(h)] = [
                    _Net.from_arrays(arrays, f"h{h}_{i}_") for i in range(cfg.ensemble)
                ]
            model.info = head.get("info", {})
            lay = model._layout()
            for h, net in ((h, n) for h, nets in model.nets.items() for n in nets):
                want = {
                    "emb": (lay["rows"], cfg.hidden),
                    "W2": (shape["num_layers"], cfg.hidden2 or cfg.hidden, lay["E"]),
                }
                for k, shp in want.items():
                    got = getattr(net, k).shape
                    if got != shp:
                        raise ValueError(f"weights h{h}_{k} of shape {got}, expected {shp}")
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: damaged model file: {exc}") from None
        return model


def _shape_text(num_layers, experts_per_layer) -> str:
    epl = list(experts_per_layer)
    e = epl[0] if len(set(epl)) == 1 else epl
    return f"{num_layers} MoE layers x {e} experts"
