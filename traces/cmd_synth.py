"""``moesim synth``: write a synthetic trace from a model preset, or fit its knobs to a trace."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from traces.errors import ConfigError
from traces.presets import PRESETS, ModelPreset, get_preset
from traces.synth import SynthKnobs

DESCRIPTION = """\
Write a synthetic expert-activation trace with the shape of a model preset (layers, experts,
top-k, expert bytes) and routing drawn from a seeded model with researcher knobs: per-layer
popularity skew, token-to-token reuse and cross-layer correlation; sequences are served by
continuous batching (one prefill step per prompt, then decode steps of every running sequence).
The same knobs and seed always give the same file, bit for bit. docs/synth.md has the model.

Knobs are taken, later ones winning: defaults, --knobs FILE, what --fit estimates from a
trace, then the individual flags."""

EPILOG = """\
examples:
  moesim synth --model deepseek-v2-lite -o ds.parquet --sequences 64 --batch-size 16
  moesim synth --model mixtral-8x7b --skew 1.0 --reuse 0.3 --cross-layer 0.6 --seed 3
  moesim synth --fit real.parquet --save-knobs real-knobs.json
  moesim synth --model deepseek-v2-lite --knobs real-knobs.json --sequences 1000 -o big.parquet"""

#: (flag, knob attribute, type, metavar, help)
_KNOB_FLAGS = [
    ("--sequences", "sequences", int, "N", "number of sequences (requests)"),
    ("--prefill-len", "prefill_len", int, "N", "prompt tokens per sequence (mean, >= 1)"),
    ("--prefill-jitter", "prefill_jitter", float, "F",
     "relative spread of prompt lengths: uniform in prefill-len x [1-F, 1+F] (0..1)"),
    ("--decode-len", "decode_len", int, "N", "generated (decode) tokens per sequence (mean)"),
    ("--decode-jitter", "decode_jitter", float, "F", "relative spread of decode lengths (0..1)"),
    ("--batch-size", "batch_size", int, "B", "most sequences decoding together (>= 1)"),
    ("--skew", "skew", float, "X",
     "Zipf exponent of expert popularity in every layer (0 = uniform; about 0.1-0.9 in real "
     "traces)"),
    ("--reuse", "reuse", float, "P",
     "probability that an expert slot re-uses the previous token's expert (same sequence and "
     "layer)"),
    ("--cross-layer", "cross_layer", float, "P",
     "probability that an expert slot follows the token's experts at the previous layer "
     "(draws from its cross-layer group)"),
    ("--cross-group", "cross_group", int, "N",
     "experts per cross-layer group (0 = 2 x top-k)"),
    ("--seed", "seed", int, "S", "seed (same knobs and seed, same file)"),
]  # fmt: skip


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic trace from a model preset (or fit its knobs to a real trace)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="PRESET",
                   help=f"model preset: {', '.join(PRESETS)} (with --fit, default: the preset "
                   "matching the fitted trace)")  # fmt: skip
    p.add_argument("-o", "--output", metavar="OUT",
                   help="trace file to write (default: synth-PRESET.parquet; with --save-knobs "
                   "and no -o, no trace is written)")  # fmt: skip
    g = p.add_argument_group("knobs")
    for flag, dest, typ, metavar, text in _KNOB_FLAGS:
        g.add_argument(flag, dest=dest, type=typ, metavar=metavar, default=None,
                       help=f"{text} (default {getattr(SynthKnobs(), dest)})")  # fmt: skip
    f = p.add_argument_group("knob files and fitting")
    f.add_argument("--knobs", metavar="FILE", help="read knobs from a JSON file")
    f.add_argument(
        "--fit",
        metavar="REAL_TRACE",
        help="estimate the knobs from a trace (moesim Parquet file or folder)",
    )
    f.add_argument("--save-knobs", metavar="FILE", help="write the final knobs as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    knobs = SynthKnobs.load(args.knobs) if args.knobs else SynthKnobs()
    fitted_trace = None
    if args.fit:
        from traces.fit import fit_knobs
        from traces.io import read_trace

        t0 = time.perf_counter()
        fitted_trace = read_trace(args.fit)
        result = fit_knobs(fitted_trace, base=knobs)
        knobs = result.knobs
        print(f"fit {args.fit} ({time.perf_counter() - t0:.1f} s):")
        for line in result.summary_lines():
            print(f"  {line}")
    for _flag, dest, *_ in _KNOB_FLAGS:
        value = getattr(args, dest)
        if value is not None:
            setattr(knobs, dest, value)
    knobs.validate()
    if args.save_knobs:
        knobs.save(args.save_knobs)
        print(f"wrote knobs {args.save_knobs}")
        if not args.output:
            return 0

    preset = _preset(args.model, fitted_trace)
    out = Path(args.output or f"synth-{preset.name}.parquet")
    from traces.io import write_trace
    from traces.synth import synth_trace

    t0 = time.perf_counter()
    trace = synth_trace(preset, knobs, source=_source(preset, knobs, args))
    t_gen = time.perf_counter() - t0
    write_trace(trace, out)
    t_all = time.perf_counter() - t0
    print(
        f"wrote {out}: {preset.name} ({preset.num_layers} layers x {preset.experts} experts, "
        f"top-{preset.top_k}), {trace.num_sequences} sequences, {trace.num_steps:,} steps, "
        f"{trace.num_rows:,} rows, {trace.num_activations:,} activations, "
        f"{out.stat().st_size / 1e6:.2f} MB (generated in {t_gen:.2f} s, {t_all:.2f} s in all)"
    )
    return 0


def _preset(name: str | None, fitted_trace) -> ModelPreset:
    if name:
        try:
            return get_preset(name)
        except ConfigError as exc:
            raise ConfigError(f"--model: {exc}") from None
    if fitted_trace is not None:
        found = match_preset(fitted_trace.meta)
        if found is not None:
            return found
        raise ConfigError(
            f"--model: expected a preset (the fitted trace's model '{fitted_trace.meta.model}' "
            f"matches none of {', '.join(PRESETS)})"
        )
    raise ConfigError(f"--model: expected a model preset, one of {', '.join(PRESETS)}")


def match_preset(meta) -> ModelPreset | None:
    """The preset a trace's metadata describes: by Hugging Face id, else by unique shape."""
    model = meta.model.lower()
    shape = (meta.num_layers, meta.max_experts, meta.top_k)
    for p in PRESETS.values():
        if model.startswith(p.hf_id.lower()) and shape == (p.num_layers, p.experts, p.top_k):
            return p
    same = [p for p in PRESETS.values() if shape == (p.num_layers, p.experts, p.top_k)]
    return same[0] if len(same) == 1 else None


def _source(preset: ModelPreset, knobs: SynthKnobs, args: argparse.Namespace) -> str:
    how = f"moesim synth --model {preset.name} --seed {knobs.seed}"
    if args.fit:
        how += f" (knobs fitted to {Path(args.fit).name})"
    elif args.knobs:
        how += f" --knobs {Path(args.knobs).name}"
    return how + "; synthetic"
