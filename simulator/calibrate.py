"""Measure a machine for the timed simulation: host-to-device copies and a model's compute.

``moesim calibrate`` runs these on the machine where the model would run and writes a
hardware profile: a configuration file with the ``[link]`` and ``[compute]`` keys of
``sim.toml`` (``simulator/config.py``), so that ``moesim replay --config PROFILE`` simulates
that machine. What is measured, in the simulator's own cost model:

- **link** (``latency_s + bytes / (bandwidth_gbps x 1e9)`` per transfer): copies of
  expert-sized host buffers to the device, pinned (what offloading runtimes use; written to
  ``[link]``) and pageable (in the comments), median of ``repeats`` per size, then a line fitted
  through (bytes, seconds). On ``--device cpu`` there is no link: the same copies are host
  memcpy, and the profile says so.
- **experts** (``expert_s + expert_per_token_s x tokens`` per expert and layer-step): the
  model's own routed-experts module of each MoE layer, called on ``n`` tokens all routed to
  one expert, for several ``n``; median per ``n``, a line fitted per layer and over all layers.
- **dense** (``dense_s + dense_per_token_s x tokens`` per layer-step): real generation with the
  model (random prompts, several batch sizes): the time of each forward pass outside the
  routed experts (attention, norms, routers, shared experts, dense layers, embeddings, LM head)
  divided by its MoE layers, so that a simulated step lasts what the measured one did; the
  line is fitted through the median per token count (decode passes of each batch size and the
  prefill passes). The time of each decoder layer less its experts is reported per layer too.

Lines are fitted by least squares on **relative** errors (each point weighs the same whether
it takes microseconds or seconds), with non-negative coefficients. Times on a GPU come from
CUDA events; on the CPU from ``time.perf_counter``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from traces.errors import ConfigError


# --------------------------------------------------------------------------- fitting
def fit_line(x, y) -> tuple[float, float]:
    """``(intercept, slope)``, both >= 0, of ``y ~ intercept + slope * x``, minimising the
    squared relative errors ``((intercept + slope * x - y) / y)^2``.

    A negative coefficient is pinned to 0 and the other refitted (a flat or a proportional
    line). One distinct ``x`` gives a flat line at the mean of ``y``.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape or x.size == 0 or np.any(y <= 0):
        raise ConfigError("fit_line: expected equally many x and positive y values")
    w = 1.0 / y
    if np.unique(x).size < 2:
        return float(np.sum(w * w * y) / np.sum(w * w)), 0.0
    a = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    (c0, c1), *_ = np.linalg.lstsq(a, np.ones_like(y), rcond=None)
    if c1 < 0:  # flat: minimise sum((c0 - y)^2 / y^2)
        return float(np.sum(1 / y) / np.sum(1 / y**2)), 0.0
    if c0 < 0:  # proportional: minimise sum((c1 x - y)^2 / y^2)
        return 0.0, float(np.sum(x / y) / np.sum((x / y) ** 2))
    return float(c0), float(c1)


# --------------------------------------------------------------------------- clocks
class Clock:
    """Times intervals on a device: CUDA events on a GPU (no sync while recording), else
    ``perf_counter``. ``mark()`` returns a token; ``seconds(a, b)`` reads an interval after
    :meth:`sync`."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


# --------------------------------------------------------------------------- link
@dataclass
class LinkMeasure:
    """Copies of host buffers to the device: ``points`` = (bytes, median seconds)."""

    kind: str  # "pinned", "pageable" or "host memcpy"
    points: list[tuple[int, float]]
    repeats: int

    @property
    def fit(self) -> tuple[float, float]:
        """``(latency_s, bandwidth_gbps)``."""
        latency, slope = fit_line([b for b, _ in self.points], [s for _, s in self.points])
        return latency, (1.0 / slope / 1e9) if slope > 0 else float("inf")


def link_sizes(expert_bytes: int) -> list[int]:
    """Buffer sizes to copy: 4 KiB (the latency end), then 1/8 .. 2 experts (at most 2 GiB)."""
    sizes = {4096} | {int(expert_bytes * f) for f in (0.125, 0.25, 0.5, 1.0, 2.0)}
    return sorted(s for s in sizes if 4096 <= s <= 2 << 30)


def measure_link(device, sizes: list[int], repeats: int, pinned: bool) -> LinkMeasure:
    """Median seconds to copy each size from a host buffer to ``device`` (one buffer per
    size, reused; a warm-up copy first). On a CPU device: host-to-host memcpy."""
    import torch

    clock = Clock(device)
    cuda = device.type == "cuda"
    kind = ("pinned" if pinned else "pageable") if cuda else "host memcpy"
    points = []
    for size in sizes:
        src = torch.empty(size, dtype=torch.uint8, pin_memory=pinned and cuda)
        src.fill_(1)
        dst = torch.empty(size, dtype=torch.uint8, device=device)
        dst.copy_(src, non_blocking=pinned)
        clock.sync()
        times = []
        for _ in range(repeats):
            a = clock.mark()
            dst.copy_(src, non_blocking=pinned)
            b = clock.mark()
            clock.sync()
            times.append(clock.seconds(a, b))
        points.append((size, statistics.median(times)))
        del src, dst
    return LinkMeasure(kind, points, repeats)


# --------------------------------------------------------------------------- experts
@dataclass
class ExpertMeasure:
    """One MoE layer's routed experts: ``points`` = (tokens, median seconds) for one expert."""

    layer: int
    name: str
    points: list[tuple[int, float]]

    @property
    def fit(self) -> tuple[float, float]:
        """``(expert_s, expert_per_token_s)``."""
        return fit_line([n for n, _ in self.points], [s for _, s in self.points])


def _call_experts(arch, layer, x, expert: int):
    """Run ``layer``'s routed-experts module with every token of ``x`` routed to ``expert``
    (gate weight 1), through the architecture's own call signature."""
    import torch

    from traces.capture.routers import SWITCH

    n = x.shape[0]
    ones = torch.ones(n, 1, dtype=x.dtype, device=x.device)
    if arch.output == SWITCH:
        chosen = torch.zeros(n, 1, layer.num_experts, dtype=torch.long, device=x.device)
        chosen[:, 0, expert] = 1
        return layer.experts(x, chosen, ones)
    index = torch.full((n, 1), expert, dtype=torch.long, device=x.device)
    return layer.experts(x, index, ones)


def measure_experts(model, arch, layers, tokens: list[int], repeats: int) -> list[ExpertMeasure]:
    """Median seconds of one expert on ``n`` tokens, for each ``n`` and each layer (experts
    taken in turn, so consecutive calls do not reuse the same weights)."""
    import torch

    device = next(model.parameters()).device
    dtype = next(layers[0].experts.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    hidden = _hidden_size(model, layers[0])
    clock = Clock(device)
    out = []
    with torch.no_grad():
        for layer in layers:
            gen = torch.Generator(device="cpu").manual_seed(layer.index)
            points = []
            for n in tokens:
                x = torch.randn(n, hidden, generator=gen).to(device=device, dtype=dtype)
                _call_experts(arch, layer, x, 0)  # warm-up
                clock.sync()
                times = []
                for r in range(repeats):
                    a = clock.mark()
                    _call_experts(arch, layer, x, r % layer.num_experts)
                    b = clock.mark()
                    clock.sync()
                    times.append(clock.seconds(a, b))
                points.append((n, statistics.median(times)))
            out.append(ExpertMeasure(layer.index, layer.name, points))
    return out


def _hidden_size(model, layer) -> int:
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    for key in ("hidden_size", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"{layer.name}: cannot tell the model's hidden size from its config")


# --------------------------------------------------------------------------- dense
@dataclass
class DenseMeasure:
    """Forward passes of real generation, split into routed experts and everything else.

    ``points``: (tokens in the pass, seconds outside the routed experts per MoE layer), one per
    forward pass; ``per_layer``: layer -> median seconds of its decoder layer less its experts
    in decode passes of batch ``batch_sizes[0]``.
    """

    points: list[tuple[int, float]]
    per_layer: dict[int, float]
    batch_sizes: list[int]
    context: int
    decode_steps: int

    @property
    def medians(self) -> list[tuple[int, float]]:
        """(tokens per pass, median seconds per MoE layer) for each distinct token count."""
        by_tokens: dict[int, list[float]] = {}
        for n, s in self.points:
            by_tokens.setdefault(n, []).append(s)
        return [(n, statistics.median(v)) for n, v in sorted(by_tokens.items())]

    @property
    def fit(self) -> tuple[float, float]:
        """``(dense_s, dense_per_token_s)``, fitted through :attr:`medians`."""
        med = self.medians
        return fit_line([n for n, _ in med], [s for _, s in med])

    @property
    def uneven(self) -> str | None:
        """A warning when some decoder layer's dense time is over 5x the fastest layer's.

        The layers of an MoE model do the same dense work, so such a layer holds something
        else: host-side work of the generation loop landing inside it (seen on a sandboxed
        H200, where layer 0 of each decode step took 36 ms and layer 1 0.8 ms). ``dense_s`` is
        averaged over the layers and then overstates the per-layer GPU work.
        """
        if len(self.per_layer) < 2:
            return None
        fastest = min(self.per_layer.values())
        slow = {i: s for i, s in self.per_layer.items() if s > 5 * fastest}
        if not slow or fastest <= 0:
            return None
        typical = statistics.median(s for i, s in self.per_layer.items() if i not in slow)
        which = ", ".join(f"{i} ({s:.3g} s)" for i, s in slow.items())
        return (
            f"uneven layers: decoder layer {which} took over 5x the fastest layer; the others "
            f"took {typical:.3g} s (median); dense_s includes that time (host-side stalls of the "
            "generation loop?); for the GPU work alone set [compute] dense_s to the others' median"
        )


def _outer_layer(model, name: str):
    """The decoder (or encoder) layer holding the MoE block ``name``: the outermost module of
    its path that is an element of a ModuleList (``model.layers.3`` for
    ``model.layers.3.mlp``)."""
    import torch

    parts = name.split(".")
    modules = dict(model.named_modules())
    for i in range(1, len(parts)):
        parent, child = ".".join(parts[:i]), ".".join(parts[: i + 1])
        if isinstance(modules.get(parent), torch.nn.ModuleList) and child in modules:
            return modules[child]
    return None


def measure_dense(
    model, layers, *, batch_sizes: list[int], context: int, decode_steps: int, seed: int = 0
) -> DenseMeasure:
    """Generate ``decode_steps`` + 1 tokens from random prompts of ``context`` tokens at each
    batch size, timing every forward pass, its routed-experts calls and its MoE layers."""
    import torch

    device = next(model.parameters()).device
    clock = Clock(device)
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    stacks = (
        [("encoder", model.get_encoder()), ("decoder", model.get_decoder())]
        if enc_dec
        else [("decoder", model)]
    )
    per_stack = {s: sum(1 for x in layers if x.stack == s) for s, _ in stacks}
    passes: list[dict] = []  # one per forward pass of a stack
    state = {"current": None}

    def on_stack_pre(kind, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        tokens = int(ids.numel()) if ids is not None else 0
        entry = {
            "kind": kind,
            "tokens": tokens,
            "start": clock.mark(),
            "experts": [],
            "layers": {},
            "batch": int(ids.shape[0]) if ids is not None else 0,
        }
        passes.append(entry)
        state["current"] = entry

    def on_stack_post(kind, module, args, output):
        state["current"]["end"] = clock.mark()

    def pair(key):
        def pre(module, args):
            state[key] = clock.mark()

        return pre

    def on_experts_post(module, args, output):
        state["current"]["experts"].append((state["experts"], clock.mark()))

    def on_layer_post(index, module, args, output):
        cur = state["current"]
        cur["layers"][index] = (state[f"layer{index}"], clock.mark(), len(cur["experts"]))

    handles = []
    for kind, module in stacks:
        handles.append(
            module.register_forward_pre_hook(
                lambda m, a, k, kind=kind: on_stack_pre(kind, m, a, k), with_kwargs=True
            )
        )
        handles.append(
            module.register_forward_hook(lambda m, a, o, kind=kind: on_stack_post(kind, m, a, o))
        )
    for layer in layers:
        handles.append(layer.experts.register_forward_pre_hook(pair("experts")))
        handles.append(layer.experts.register_forward_hook(on_experts_post))
        outer = _outer_layer(model, layer.name)
        if outer is not None:
            handles.append(outer.register_forward_pre_hook(pair(f"layer{layer.index}")))
            handles.append(
                outer.register_forward_hook(
                    lambda m, a, o, i=layer.index: on_layer_post(i, m, a, o)
                )
            )
    vocab = int(getattr(model.config.get_text_config(), "vocab_size", 32) or 32)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pad = getattr(model.config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else 0

    def generate(batch: int, length: int, new: int):
        ids = torch.randint(3, max(4, vocab), (batch, length), generator=gen).to(device)
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            temperature=None,
            top_p=None,
            top_k=None,
        )

    try:
        with torch.no_grad():
            generate(1, min(8, context), 2)  # warm-up: lazy initialisation, kernels, caches
            passes.clear()
            for batch in batch_sizes:
                generate(batch, context, decode_steps + 1)
        clock.sync()
    finally:
        for h in handles:
            h.remove()

    points, per_layer_times = [], {}
    first_decode = None
    for p in passes:
        if "end" not in p or not per_stack.get(p["kind"]):
            continue
        total = clock.seconds(p["start"], p["end"])
        experts = sum(clock.seconds(a, b) for a, b in p["experts"])
        points.append((p["tokens"], max(total - experts, 1e-9) / per_stack[p["kind"]]))
        decode = p["tokens"] == p["batch"] and p["kind"] == "decoder"
        if decode and (first_decode is None or p["batch"] == first_decode):
            first_decode = p["batch"]
            for index, (a, b, n_exp) in p["layers"].items():
                ex = p["experts"][n_exp - 1] if n_exp else None
                inner = clock.seconds(*ex) if ex is not None else 0.0
                per_layer_times.setdefault(index, []).append(clock.seconds(a, b) - inner)
    if not points:
        raise ConfigError("calibrate: generation ran no timed forward pass")
    per_layer = {i: statistics.median(t) for i, t in sorted(per_layer_times.items())}
    return DenseMeasure(points, per_layer, list(batch_sizes), context, decode_steps)


# --------------------------------------------------------------------------- profile
@dataclass
class Profile:
    """Everything ``moesim calibrate`` measured, and the config values it derives."""

    device: str
    device_name: str
    versions: str
    link: list[LinkMeasure]
    model: str = ""
    model_summary: str = ""
    experts: list[ExpertMeasure] = field(default_factory=list)
    dense: DenseMeasure | None = None
    when: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))

    @property
    def values(self) -> dict[str, dict[str, float]]:
        """The ``[link]`` and ``[compute]`` values (only those measured)."""
        latency, bw = self.link[0].fit
        out = {"link": {"bandwidth_gbps": bw, "latency_s": latency}}
        compute = {}
        if self.dense is not None:
            compute["dense_s"], compute["dense_per_token_s"] = self.dense.fit
        if self.experts:
            pts = [pt for m in self.experts for pt in m.points]
            compute["expert_s"], compute["expert_per_token_s"] = fit_line(
                [n for n, _ in pts], [s for _, s in pts]
            )
        if compute:
            out["compute"] = compute
        return out


def _sig(x: float) -> float:
    """``x`` rounded to 4 significant digits (profiles stay readable)."""
    return float(f"{x:.4g}")


def render_profile(profile: Profile, base: dict | None = None) -> str:
    """The profile as TOML: comments with the device and raw measurements, then the tables.

    With ``base`` (a configuration read from TOML), every section of it is written too, with
    the measured keys replaced: a complete configuration for that machine.
    """
    cpu = profile.device == "cpu"
    lines = [
        f"# moesim hardware profile, written by `moesim calibrate` on {profile.when}.",
        "# Use it for timed replays: moesim replay TRACE --config THIS_FILE",
        "# (or copy its [link] and [compute] tables into your sim.toml).",
        "#",
        f"# device: {profile.device} ({profile.device_name}); {profile.versions}",
    ]
    if profile.model:
        lines.append(f"# model:  {profile.model}: {profile.model_summary}")
    if cpu:
        lines += [
            "# NOTE: measured on the CPU (--device cpu): [link] is host memcpy bandwidth, not a",
            "# host-to-GPU link, and [compute] is CPU compute. Use --device cuda on a GPU machine.",
        ]
    lines.append("#")
    for m in profile.link:
        latency, bw = m.fit
        lines.append(
            f"# link, {m.kind} host buffers -> {profile.device} "
            f"(median of {m.repeats} copies each): fit latency {latency:.3g} s, "
            f"{bw:.4g} GB/s"
        )
        lines.append("#   bytes            seconds      GB/s")
        for size, sec in m.points:
            lines.append(f"#   {size:<16,} {sec:<12.4g} {size / sec / 1e9:.3f}")
    if profile.experts:
        lines.append("#")
        lines.append(
            "# routed experts: one expert on n tokens (the model's experts module), median seconds"
        )
        tokens = [n for n, _ in profile.experts[0].points]
        lines.append(
            "#   layer  "
            + " ".join(f"{'n=' + str(n):>10}" for n in tokens)
            + "   expert_s    per_token_s"
        )
        for m in profile.experts:
            a, b = m.fit
            lines.append(
                f"#   {m.layer:<6} "
                + " ".join(f"{s:>10.3g}" for _, s in m.points)
                + f"   {a:<11.3g} {b:.3g}"
            )
    if profile.dense is not None:
        d = profile.dense
        lines.append("#")
        lines.append(
            f"# dense: generation from random prompts of {d.context} tokens, batches "
            f"{', '.join(map(str, d.batch_sizes))}, {d.decode_steps} decode steps each; "
            "seconds outside the routed experts per forward pass / MoE layers"
        )
        passes = {}
        for n, _ in d.points:
            passes[n] = passes.get(n, 0) + 1
        lines.append("#   tokens/pass  passes  median s/layer")
        for n, sec in d.medians:
            lines.append(f"#   {n:<12} {passes[n]:<7} {sec:.4g}")
        if d.per_layer:
            lines.append(
                f"# per decoder layer, decode steps of batch {d.batch_sizes[0]}: layer "
                "time less its routed experts (attention, norms, router, shared), s"
            )
            lines.append("#   " + ", ".join(f"{i}: {s:.3g}" for i, s in d.per_layer.items()))
            if d.uneven:
                lines.append(f"# WARNING: {d.uneven}")
    values = profile.values
    sections = dict(base or {})
    for sec, kv in values.items():
        sections[sec] = {**(sections.get(sec) or {}), **{k: _sig(v) for k, v in kv.items()}}
    for sec, kv in sections.items():
        if not isinstance(kv, dict):
            continue
        lines.append("")
        lines.append(f"[{sec}]")
        for key, value in kv.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == float("inf"):
            return "inf"
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} as TOML")
