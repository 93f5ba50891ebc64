"""Regenerate the bundled sample trace ``traces/sample/sample.parquet``.

The sample is synthetic (``moesim synth``), never a copy of real data: DeepSeek-V2-Lite's shape
(26 layers x 64 experts, top-6), 8 sequences with short jittered prompts and decodes served
4 at a time, so decode steps batch several sequences. It is about 0.2 MB and replays in well
under a second. Run ``python -m traces.make_sample`` after changing the generator, and
``python -m traces.make_sample --check`` to verify the bundled file is current.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from traces.io import write_trace
from traces.synth import SynthKnobs, synth_trace
from traces.trace import Trace

SAMPLE_PATH = Path(__file__).resolve().parent / "sample" / "sample.parquet"
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
    args = parser.parse_args(argv)
    out = Path(args.output)
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
