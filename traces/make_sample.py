"""Regenerate the bundled sample trace ``traces/sample/sample.parquet``.

The sample is synthetic (``moesim synth``), never a copy of real data: DeepSeek-V2-Lite's shape
(26 layers x 64 experts, top-6), 8 sequences with short jittered prompts and decodes served
4 at a time, so decode steps batch several sequences. It is about 0.2 MB and replays in well
under a second. Run ``python -m traces.make_sample`` after changing the generator, and
``python -m traces.make_sample --check`` to verify the bundled file is current.

Beside it, ``traces/sample/sample-predictor.npz`` is a small learned expert predictor (moesim's
``moesim train`` model, horizons 1 and 2, about 1.2 MB) for the sample's model, so the default
sweep can compare a learned prefetcher out of the box. It is trained on 64 *other* sequences of
the same synthetic model (same seed, so the same routing tables; sequences 8..71 of a larger
draw, the sample being sequences 0..7), never on the sample itself. ``--predictor`` rewrites it
(a few seconds); on the sample its top-6 guesses recover about 44% of the experts at horizon 1
(chance: 9%).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from traces.io import write_trace
from traces.synth import SynthKnobs, synth_trace
from traces.trace import Trace

SAMPLE_PATH = Path(__file__).resolve().parent / "sample" / "sample.parquet"
PREDICTOR_PATH = SAMPLE_PATH.parent / "sample-predictor.npz"
SAMPLE_MODEL = "deepseek-v2-lite"
#: Knobs of the sample: routing about what ``synth --fit`` finds on DeepSeek-V2-Lite prompts.
SAMPLE_KNOBS = SynthKnobs(
    skew=0.6,
    reuse=0.1,
    cross_layer=0.8,
    sequences=8,
    prefill_len=32,
    prefill_jitter=0.5,
    decode_len=48,
    decode_jitter=0.25,
    batch_size=4,
    seed=0,
)


def build_sample() -> Trace:
    """The sample trace, in memory."""
    knobs = SynthKnobs(**SAMPLE_KNOBS.to_dict())
    source = f"moesim synth --model {SAMPLE_MODEL} --seed {knobs.seed} (traces/make_sample.py)"
    return synth_trace(SAMPLE_MODEL, knobs, source=source + "; synthetic")


def build_training() -> Trace:
    """Training trace of the sample's predictor: sequences 8..71 of a 72-sequence draw with the
    sample's knobs (the first 8 are the sample's own and are left out)."""
    import numpy as np

    from traces.io import trace_from_arrays

    knobs = SynthKnobs(**{**SAMPLE_KNOBS.to_dict(), "sequences": 72})
    big = synth_trace(SAMPLE_MODEL, knobs)
    keep = np.nonzero(big.seq >= SAMPLE_KNOBS.sequences)[0]
    lens = np.diff(big.offsets)[keep]
    take = np.concatenate([np.arange(big.offsets[r], big.offsets[r + 1]) for r in keep])
    return trace_from_arrays(
        big.meta, step=big.step[keep], seq=big.seq[keep], pos=big.pos[keep],
        phase=big.phase[keep], layer=big.layer[keep], offsets=np.r_[0, np.cumsum(lens)],
        experts=big.experts[take], weights=None if big.weights is None else big.weights[take],
    )  # fmt: skip


def write_predictor(path: str | Path = PREDICTOR_PATH) -> Path:
    """Train the sample's learned predictor (small settings) and save it to ``path``."""
    from policies.learned import LearnedConfig, LearnedPredictor

    cfg = LearnedConfig(horizons=[1, 2], hidden=32, hidden2=0, src_layers=4, prev_tokens=1,
                        epochs=6, seed=0)  # fmt: skip
    return LearnedPredictor.train(build_training(), cfg).save(path)


def write_sample(path: str | Path = SAMPLE_PATH) -> Path:
    """Write the sample trace to ``path`` (default: the bundled file)."""
    return write_trace(build_sample(), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m traces.make_sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-o", "--output", default=str(SAMPLE_PATH), help="where to write it")
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check that the file equals a fresh regeneration (exit 1 if not)",
    )
    parser.add_argument(
        "--predictor",
        action="store_true",
        help=f"also retrain the sample's learned predictor ({PREDICTOR_PATH.name})",
    )
    args = parser.parse_args(argv)
    out = Path(args.output)
    if args.predictor:
        saved = write_predictor(out.parent / PREDICTOR_PATH.name)
        print(f"wrote {saved} ({saved.stat().st_size:,} bytes)")
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            fresh = write_sample(Path(tmp) / "sample.parquet").read_bytes()
        same = out.exists() and out.read_bytes() == fresh
        print(f"{out}: {'up to date' if same else 'differs from a fresh regeneration'}")
        return 0 if same else 1
    write_sample(out)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
