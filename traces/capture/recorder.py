"""The recorder: read-only hooks on the routers, step bookkeeping, and the generation loop.

One **step** is one forward pass of the model (``docs/trace-format.md``): the prefill of a
batch of prompts (all their tokens), then one decode step per generated token (one token of
each unfinished sequence). An encoder-decoder model (Switch) runs its encoder once per batch
(the prefill step, its encoder layers) and then one decoder pass per generated token (decode
steps, its decoder layers).

Rows are recorded for **real tokens only**: the pad positions of a batch (its attention mask)
are skipped, and so are the forward passes a batch keeps making for sequences that have
already finished (after an end-of-sequence token: generation pads them until the whole batch
is done). A sequence is ``seq`` = its prompt's index in the prompt list (from 0) and ``pos`` =
the token's position within it (prompt tokens 0..n-1, then one per generated token; the
decoder of an encoder-decoder model counts its own positions from its start token).

Hooks never change an output: the stack pre-hooks only read ``input_ids`` and the router
hooks only read the routers' outputs (tests check the logits are bit-identical). Router outputs
stay on the device during a batch; they are copied to the host once per batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
import torch

from traces.capture import CaptureError
from traces.capture.lookahead import lookahead, targets
from traces.capture.routers import Arch, MoeLayer, read_choice
from traces.format import PHASE_DECODE, PHASE_PREFILL, pred_column


@dataclass
class _Step:
    """One recorded forward pass: where its real tokens are and who they are."""

    step: int
    stack: str
    batch: int
    length: int
    phase: int
    rows: np.ndarray  # flat (batch-major) indices of the real tokens among batch x length
    seq: np.ndarray
    pos: np.ndarray
    token_id: np.ndarray


@dataclass
class _Record:
    """What one router chose in one step (tensors on the device until the batch ends)."""

    step: _Step
    layer: int
    experts: torch.Tensor  # int64[batch * length, k], -1 = no expert
    weights: torch.Tensor  # float32[batch * length, k]
    preds: dict[int, torch.Tensor] = field(default_factory=dict)  # j -> experts of layer + j


def optional_columns(lookahead: int, text: bool) -> list[str]:
    """The optional trace columns a capture writes: weights, token ids, texts, predictions."""
    cols = ["weights", "token_id"] + (["token"] if text else [])
    return cols + [pred_column(j) for j in range(1, lookahead + 1)]


class Recorder:
    """Hooks a model's routers and turns each batch's forward passes into trace rows.

    Use as a context manager (hooks are attached inside, removed on exit), and bracket each
    batch's generation with :meth:`begin_batch` and :meth:`end_batch`.

    Args:
        model: the loaded transformers model (eval mode).
        arch: its architecture; layers: its MoE layers (:func:`routers.find_moe_layers`).
        lookahead: gate-lookahead horizon H (0 = none): adds ``pred_h1..pred_hH``.
        eos_ids: end-of-sequence token ids (a sequence that generated one is finished).
        max_new_tokens: tokens generated per sequence (bounds the decode steps recorded).
        token_text: maps an ``int64`` array of token ids to their texts (adds ``token``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        arch: Arch,
        layers: list[MoeLayer],
        *,
        lookahead: int = 0,
        eos_ids: tuple[int, ...] = (),
        max_new_tokens: int,
        token_text: Callable[[np.ndarray], list[str]] | None = None,
    ):
        self.model = model
        self.arch = arch
        self.layers = layers
        self.horizon = int(lookahead)
        self.eos = np.asarray(sorted(set(eos_ids)), np.int64)
        self.max_new_tokens = int(max_new_tokens)
        self.token_text = token_text
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self._ahead = targets(layers, self.horizon)
        self._handles: list = []
        self._active = False
        self._suspended = False
        self._next_step = 0
        self._records: list[_Record] = []
        self._batch_steps: list[_Step] = []
        self._current: _Step | None = None

    # ------------------------------------------------------------------ columns
    @property
    def optional_columns(self) -> list[str]:
        """The optional trace columns this recorder writes."""
        return optional_columns(self.horizon, self.token_text is not None)

    @property
    def steps(self) -> int:
        """Steps recorded so far (the next step id)."""
        return self._next_step

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> Recorder:
        if self.encoder_decoder:
            stacks = [("encoder", self.model.get_encoder()), ("decoder", self.model.get_decoder())]
        else:
            stacks = [("decoder", self.model)]
        for kind, module in stacks:
            self._handles.append(
                module.register_forward_pre_hook(partial(self._on_stack, kind), with_kwargs=True)
            )
        for layer, ahead in zip(self.layers, self._ahead, strict=True):
            self._handles.append(
                layer.router.register_forward_hook(
                    partial(self._on_router, layer, ahead), with_kwargs=True
                )
            )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False

    # ------------------------------------------------------------------ batches
    def begin_batch(self, seq_ids: np.ndarray, mask: np.ndarray) -> None:
        """Start a batch: ``seq_ids[b]`` is row ``b``'s sequence id, ``mask`` its prompt mask
        (``bool[batch, padded length]``, True at real tokens)."""
        self._seq = np.asarray(seq_ids, np.int64)
        self._mask = np.asarray(mask, bool)
        self._n_real = self._mask.sum(axis=1).astype(np.int64)
        self._finished = np.zeros(self._seq.shape[0], bool)
        self._prefilled = False
        self._decoder_calls = 0
        self._records = []
        self._batch_steps = []
        self._current = None
        self._active = True

    def end_batch(self) -> pa.Table | None:
        """The batch's rows as an Arrow table in trace order (None when it recorded none)."""
        self._active = False
        self._current = None
        records, self._records = self._records, []
        self._check_complete(records)
        return self._assemble(records) if records else None

    def _check_complete(self, records: list[_Record]) -> None:
        """Every recorded step must have one router call per MoE layer of its stack: a router
        that did not run (a fused kernel bypassing the module) would leave silent gaps."""
        seen: dict[int, set[int]] = {}
        for r in records:
            seen.setdefault(r.step.step, set()).add(r.layer)
        for step in self._batch_steps:
            want = {x.index for x in self.layers if x.stack == step.stack}
            missing = sorted(want - seen.get(step.step, set()))
            if missing:
                name = self.layers[missing[0]].name
                raise CaptureError(
                    f"{name}: its router did not run in a forward pass ({len(missing)} MoE "
                    "layers missing): a fused MoE kernel may bypass the router module that "
                    "capture reads; load the model without such kernels"
                )

    # ------------------------------------------------------------------ step bookkeeping
    def _on_stack(self, kind: str, module, args, kwargs):
        if not self._active:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise CaptureError(
                f"{kind} forward pass without 2-D input_ids (inputs_embeds are not supported)"
            )
        self._current = self._new_step(kind, ids.detach().to("cpu").numpy().astype(np.int64))
        return None

    def _new_step(self, kind: str, ids: np.ndarray) -> _Step | None:
        batch, length = ids.shape
        if batch != self._seq.shape[0]:
            raise CaptureError(f"forward pass over {batch} sequences, expected {len(self._seq)}")
        prefill = kind == "encoder" or (not self.encoder_decoder and not self._prefilled)
        if prefill:
            if self._prefilled:
                raise CaptureError("the encoder ran twice for one batch")
            if length != self._mask.shape[1]:
                raise CaptureError(
                    f"prefill over {length} tokens per sequence, expected the padded prompt "
                    f"length {self._mask.shape[1]} (prefill chunking is not supported)"
                )
            self._prefilled = True
            valid = self._mask
            pos = np.cumsum(valid, axis=1) - 1
            phase = PHASE_PREFILL
        else:
            if length != 1:
                raise CaptureError(
                    f"decode step over {length} tokens per sequence, expected 1 (assisted, "
                    "speculative or beam decoding are not supported)"
                )
            if self.encoder_decoder:  # decoder token d (0 = start token) makes token d + 1
                d = self._decoder_calls
                pos = np.full((batch, 1), d, np.int64)
            else:  # decode step d feeds generated token d (1-based) at pos n + d - 1
                d = self._decoder_calls + 1
                pos = (self._n_real + d - 1)[:, None]
            self._decoder_calls += 1
            if d >= 1 and self.eos.size:
                self._finished |= np.isin(ids[:, -1], self.eos)
            valid = (~self._finished & (d <= self.max_new_tokens - 1))[:, None]
            phase = PHASE_DECODE
        rows = np.flatnonzero(valid.reshape(-1))
        if rows.size == 0:
            return None
        step = _Step(
            step=self._next_step,
            stack="encoder" if kind == "encoder" else "decoder",
            batch=batch,
            length=length,
            phase=phase,
            rows=rows,
            seq=np.repeat(self._seq, length)[rows],
            pos=np.broadcast_to(pos, (batch, length)).reshape(-1)[rows].astype(np.int64),
            token_id=ids.reshape(-1)[rows],
        )
        self._next_step += 1
        self._batch_steps.append(step)
        return step

    def _on_router(self, layer: MoeLayer, ahead, module, args, kwargs, output):
        if not self._active or self._suspended or self._current is None:
            return None
        step = self._current
        if step.stack != layer.stack:
            raise CaptureError(f"{layer.name}: ran during a forward pass of the {step.stack}")
        experts, weights = read_choice(self.arch, output, layer.name)
        if experts.shape[0] != step.batch * step.length:
            raise CaptureError(
                f"{layer.name}: router saw {experts.shape[0]} tokens, expected "
                f"{step.batch} x {step.length}"
            )
        preds = {}
        if ahead:
            hidden = args[0] if args else kwargs.get("hidden_states")
            self._suspended = True  # the lookahead's router calls are not recorded
            try:
                preds = lookahead(self.arch, hidden.detach(), ahead)
            finally:
                self._suspended = False
        self._records.append(_Record(step, layer.index, experts, weights, preds))
        return None

    # ------------------------------------------------------------------ rows
    def _assemble(self, records: list[_Record]) -> pa.Table:
        """Copy a batch's router choices to the host (one copy per kind) and build its rows."""
        experts = torch.cat([r.experts.reshape(-1) for r in records]).cpu().numpy()
        weights = torch.cat([r.weights.reshape(-1) for r in records]).cpu().numpy()
        pred_list = [t.reshape(-1) for r in records for t in r.preds.values()]
        preds = torch.cat(pred_list).cpu().numpy() if pred_list else np.zeros(0, np.int64)

        by_key = {(r.step.step, r.layer): r for r in records}
        pred_at: dict[tuple[int, int], np.ndarray] = {}  # (record id, j) -> experts[N, k]
        start = 0
        for r in records:
            for j, t in r.preds.items():
                pred_at[(id(r), j)] = preds[start : start + t.numel()].reshape(t.shape)
                start += t.numel()

        cols: dict[str, list[np.ndarray]] = {
            k: [] for k in ("step", "seq", "pos", "phase", "layer", "token_id")
        }
        exp_len, exp_val, w_val = [], [], []
        p_len = {j: [] for j in range(1, self.horizon + 1)}
        p_val = {j: [] for j in range(1, self.horizon + 1)}
        p_ok = {j: [] for j in range(1, self.horizon + 1)}
        start = 0
        for r in records:
            st, (n, k) = r.step, r.experts.shape
            e = experts[start : start + n * k].reshape(n, k)[st.rows]
            w = weights[start : start + n * k].reshape(n, k)[st.rows]
            start += n * k
            m = st.rows.shape[0]
            cols["step"].append(np.full(m, st.step, np.int64))
            cols["seq"].append(st.seq)
            cols["pos"].append(st.pos)
            cols["phase"].append(np.full(m, st.phase, np.int8))
            cols["layer"].append(np.full(m, r.layer, np.int16))
            cols["token_id"].append(st.token_id)
            keep = e >= 0
            exp_len.append(keep.sum(axis=1))
            exp_val.append(e[keep])
            w_val.append(w[keep])
            for j in p_len:
                src = by_key.get((st.step, r.layer - j))
                p = pred_at.get((id(src), j)) if src is not None else None
                if p is None:
                    p_len[j].append(np.zeros(m, np.int64))
                    p_ok[j].append(np.zeros(m, bool))
                else:
                    p = p[st.rows]
                    p_len[j].append(np.full(m, p.shape[1], np.int64))
                    p_val[j].append(p.reshape(-1))
                    p_ok[j].append(np.ones(m, bool))

        table = {name: np.concatenate(parts) for name, parts in cols.items()}
        table["experts"] = _list_array(exp_len, exp_val, pa.int16())
        table["weights"] = _list_array(exp_len, w_val, pa.float32())
        if self.token_text is not None:
            ids = table["token_id"]
            uniq, inverse = np.unique(ids, return_inverse=True)
            texts = np.asarray(self.token_text(uniq), dtype=object)
            table["token"] = pa.array(texts[inverse], pa.string())
        table["token_id"] = table["token_id"].astype(np.int32)
        table["pos"] = table["pos"].astype(np.int32)
        for j in p_len:
            table[pred_column(j)] = _list_array(p_len[j], p_val[j], pa.int16(), p_ok[j])
        return pa.table(table)


def _list_array(lengths: list[np.ndarray], values: list[np.ndarray], typ, valid=None) -> pa.Array:
    """An Arrow list array from per-row lengths and flat values (null where ``valid`` is False)."""
    length = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.zeros(length.shape[0] + 1, np.int32)
    np.cumsum(length, out=offsets[1:])
    flat = np.concatenate(values) if values else np.zeros(0)
    mask = None if valid is None else pa.array(~np.concatenate(valid))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, typ), mask=mask)


# --------------------------------------------------------------------------- the loop
@dataclass
class BatchReport:
    """What one finished batch recorded (handed to the ``on_batch`` callback)."""

    index: int
    batches: int
    sequences: int
    rows: int
    prefill_tokens: int
    decode_tokens: int
    seconds: float


@dataclass
class CaptureSummary:
    """Totals of a finished capture."""

    batches: int = 0
    sequences: int = 0
    rows: int = 0
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    seconds: float = 0.0


def pad_batch(prompts: list[list[int]], pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids int64[B, L], mask bool[B, L])``, padded on the left (decoder-only
    generation) or on the right (an encoder's input)."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), bool)
    for b, p in enumerate(prompts):
        sl = slice(width - len(p), width) if left else slice(0, len(p))
        ids[b, sl] = p
        mask[b, sl] = True
    return ids, mask


def capture(
    model: torch.nn.Module,
    arch: Arch,
    layers: list[MoeLayer],
    prompts: list[list[int]],
    sink,
    *,
    batch_size: int = 1,
    max_new_tokens: int = 64,
    lookahead: int = 0,
    eos_ids: tuple[int, ...] | None = None,
    pad_id: int = 0,
    sample: bool = False,
    seed: int = 0,
    ignore_eos: bool = False,
    token_text: Callable[[np.ndarray], list[str]] | None = None,
    on_batch: Callable[[BatchReport], None] | None = None,
) -> CaptureSummary:
    """Generate from ``prompts`` (token-id lists) in batches and stream the trace to ``sink``.

    Each batch is written to ``sink`` (:class:`traces.capture.sink.TraceSink`) as soon as its
    generation ends. On any exception, KeyboardInterrupt included, the batches already
    written are kept (``sink.stop()``) and the exception propagates.

    Args:
        batch_size: prompts generated together (sequences of one batch share steps).
        max_new_tokens: tokens generated per prompt; 0 records the prefill only.
        lookahead: gate-lookahead horizon (``pred_h1..pred_hH`` columns), 0 = none.
        eos_ids: end-of-sequence ids; None = the model's (``generation_config.eos_token_id``);
            an empty tuple = none (as ``ignore_eos``).
        sample: sample with the model's generation settings instead of greedy decoding.
        ignore_eos: generate exactly ``max_new_tokens`` tokens (end-of-sequence suppressed).
        on_batch: called after each batch is written (progress; raising stops the capture).
    """
    if eos_ids is None:
        eos_ids = model_eos(model)
    ignore_eos = ignore_eos or not eos_ids
    eos = () if ignore_eos else tuple(int(e) for e in eos_ids)
    rec = Recorder(
        model,
        arch,
        layers,
        lookahead=lookahead,
        eos_ids=eos,
        max_new_tokens=max_new_tokens,
        token_text=token_text,
    )
    enc_dec = rec.encoder_decoder
    device = next(model.parameters()).device
    summary = CaptureSummary()
    first_layer = layers[0].index  # tokens are counted once, at their stack's first MoE layer
    first_decoder = next(x.index for x in layers if x.stack == "decoder")
    n_batches = (len(prompts) + batch_size - 1) // batch_size
    if sample:
        torch.manual_seed(seed)
    try:
        with rec, torch.no_grad():
            for b in range(n_batches):
                chunk = prompts[b * batch_size : (b + 1) * batch_size]
                ids, mask = pad_batch(chunk, pad_id, left=not enc_dec)
                rec.begin_batch(np.arange(b * batch_size, b * batch_size + len(chunk)), mask)
                t0 = time.perf_counter()
                _generate(
                    model,
                    torch.from_numpy(ids).to(device),
                    torch.from_numpy(mask.astype(np.int64)).to(device),
                    enc_dec,
                    max_new_tokens,
                    eos,
                    pad_id,
                    sample,
                    ignore_eos,
                )
                table = rec.end_batch()
                seconds = time.perf_counter() - t0
                rows = 0
                prefill = decode = 0
                if table is not None:
                    sink.write(table)
                    rows = table.num_rows
                    layer = np.asarray(table.column("layer"))
                    phase = np.asarray(table.column("phase"))
                    prefill = int(((layer == first_layer) & (phase == PHASE_PREFILL)).sum())
                    decode = int(((layer == first_decoder) & (phase == PHASE_DECODE)).sum())
                    summary.steps = rec.steps
                summary.batches += 1
                summary.sequences += len(chunk)
                summary.rows += rows
                summary.prefill_tokens += prefill
                summary.decode_tokens += decode
                summary.seconds += seconds
                if on_batch is not None:
                    on_batch(BatchReport(b, n_batches, len(chunk), rows, prefill, decode, seconds))
    except BaseException:
        sink.stop()
        raise
    sink.close()
    return summary


def model_eos(model) -> tuple[int, ...]:
    """The model's end-of-sequence ids (its generation config, else its config)."""
    for cfg in (getattr(model, "generation_config", None), model.config):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            return tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]))
    return ()


def _generate(model, ids, mask, enc_dec, max_new_tokens, eos, pad_id, sample, ignore_eos):
    """Run one batch: greedy (or sampled) generation, or only the prefill when
    ``max_new_tokens`` is 0 (an encoder-decoder model then runs its encoder alone)."""
    if max_new_tokens == 0 and enc_dec:
        model.get_encoder()(input_ids=ids, attention_mask=mask)
        return
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max(1, max_new_tokens),  # 1 token = the prefill forward pass alone
        do_sample=sample,
        num_beams=1,
        pad_token_id=pad_id,
        use_cache=True,
    )
    if eos:
        kwargs["eos_token_id"] = list(eos)
    if ignore_eos:
        kwargs["min_new_tokens"] = max_new_tokens
    if not sample:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    model.generate(**kwargs)
