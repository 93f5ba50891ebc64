"""``moesim capture``: record a trace from a Hugging Face MoE model (docs/capture.md)."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from traces.capture import loading
from traces.errors import ConfigError, MoesimError


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _pos_int(text: str) -> int:
    value = _nonneg_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "capture",
        help="record a trace from a Hugging Face MoE model (needs the 'capture' extra)",
        description="Run batched generation with a Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, "
        "DeepSeek-V2/V3, GPT-OSS or Switch Transformers model (transformers' implementation) "
        "and record, for every real token of the prefill and of each decode step and every MoE "
        "layer, the experts its router chose and their gate weights: a moesim trace, streamed "
        "to Parquet batch by batch. The model is loaded from a local folder or the local "
        "Hugging Face cache only; nothing is downloaded. Needs: pip install 'moesim[capture]'. "
        "See docs/capture.md.",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="ID_OR_PATH",
        help="model folder, or a Hugging Face id already in the local cache",
    )
    p.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help="prompts: plain text (one per line) or JSONL (.jsonl: strings, or "
        "objects with 'prompt'/'text', 'messages' or 'input_ids')",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="TRACE",
        help="trace file (.parquet), or a folder (existing, or ending in '/') for "
        "one part per batch, which survives even a killed capture",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_nonneg_int,
        default=64,
        metavar="N",
        help="tokens generated per prompt (default 64; 0 = prefill only)",
    )
    p.add_argument(
        "--batch-size",
        type=_pos_int,
        default=1,
        metavar="B",
        help="prompts generated together, sharing steps (default 1)",
    )
    p.add_argument(
        "--lookahead",
        type=_nonneg_int,
        default=0,
        metavar="H",
        help="also record the experts the gates of layers l+1..l+H pick from layer "
        "l's hidden state (pred_h1..pred_hH columns; default 0 = none)",
    )
    loading.add_device_args(p, "weight dtype to load (default: the checkpoint's)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="format text prompts with the tokenizer's chat template (as a user turn)",
    )
    p.add_argument(
        "--max-prompts",
        type=_pos_int,
        default=None,
        metavar="N",
        help="use only the first N prompts",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=_pos_int,
        default=None,
        metavar="N",
        help="cut each prompt to its first N tokens",
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="always generate --max-new-tokens tokens (end-of-sequence suppressed)",
    )
    p.add_argument(
        "--sample",
        action="store_true",
        help="sample with the model's generation settings (default: greedy)",
    )
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed for --sample (default 0)")
    p.add_argument(
        "--no-text",
        action="store_true",
        help="do not store token texts (the 'token' column); ids are always stored",
    )
    p.add_argument("--quiet", action="store_true", help="no per-batch progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from traces.capture.deps import require

    torch, transformers = require()
    from traces.capture import prompts
    from traces.capture.meta import build_meta
    from traces.capture.recorder import BatchReport, capture, model_eos, optional_columns
    from traces.capture.routers import find_moe_layers, get_arch
    from traces.capture.sink import TraceSink, check_target

    transformers.utils.logging.disable_progress_bar()
    items = prompts.read_prompts(args.prompts)[: args.max_prompts]
    check_target(args.output)
    device = loading.resolve_device(args.device)
    config = loading.load_config(args.model)
    arch = get_arch(getattr(config, "model_type", ""), f"model {args.model!r}")
    tokenizer = loading.load_tokenizer(args.model, required=prompts.needs_tokenizer(items))
    vocab = int(getattr(config.get_text_config(), "vocab_size", 0) or 0) or 1 << 31
    ids = prompts.tokenize(
        items,
        tokenizer,
        chat=args.chat,
        vocab_size=vocab,
        max_tokens=args.max_prompt_tokens,
        where=args.prompts,
    )
    t_load = time.perf_counter()
    model = loading.load_model(args.model, config, device, args.dtype)
    t_load = time.perf_counter() - t_load
    layers = find_moe_layers(model, arch, f"model {args.model!r}")
    per_stack = min(sum(x.stack == s for x in layers) for s in {x.stack for x in layers})
    if args.lookahead >= per_stack:
        raise ConfigError(
            f"--lookahead {args.lookahead}: the model has {per_stack} MoE layers per stack, "
            f"expected a horizon of at most {per_stack - 1}"
        )
    eos = () if args.ignore_eos else model_eos(model)
    pad = _pad_id(tokenizer, config, eos)
    token_text = None
    if tokenizer is not None and not args.no_text:

        def token_text(uniq):
            return [t or "" for t in tokenizer.convert_ids_to_tokens(uniq.tolist())]

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    source = (
        f"moesim capture --model {args.model} --prompts {args.prompts} --max-new-tokens "
        f"{args.max_new_tokens} --batch-size {args.batch_size} --lookahead {args.lookahead} "
        f"--device {device} --dtype {args.dtype}"
        + "".join(
            f" --{f.replace('_', '-')}"
            for f in ("chat", "ignore_eos", "sample")
            if getattr(args, f)
        )
        + (f" --seed {args.seed}" if args.sample else "")
    )
    extra = {
        "prompts": len(ids),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "decoding": f"sample (seed {args.seed})" if args.sample else "greedy",
        "eos_token_ids": list(eos),
        "padding": "right" if config.is_encoder_decoder else "left",
        "device": f"{device} ({device_name})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    meta = build_meta(args.model, config, arch, layers, source=source, extra=extra)
    if args.lookahead:
        meta.pred_source = "gate-lookahead"
    sink = TraceSink(args.output, meta, optional_columns(args.lookahead, token_text is not None))
    print(
        f"moesim capture: {arch.label} {args.model} on {device} ({device_name}), loaded in "
        f"{t_load:.1f} s: {len(layers)} MoE layers x {meta.max_experts} experts, top-k "
        f"{meta.top_k or 'dynamic'}, {meta.expert_bytes[0]:,} bytes/expert ({meta.dtype}); "
        f"{len(ids)} prompts in batches of {args.batch_size}",
        file=sys.stderr,
    )

    def progress(r: BatchReport) -> None:
        if not args.quiet:
            tokens = r.prefill_tokens + r.decode_tokens
            print(
                f"  batch {r.index + 1}/{r.batches}: {r.sequences} sequences, "
                f"{r.prefill_tokens:,} prefill + {r.decode_tokens:,} decode tokens, "
                f"{r.rows:,} rows, {r.seconds:.2f} s ({tokens / max(r.seconds, 1e-9):,.0f} "
                "tokens/s)",
                file=sys.stderr,
            )

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        summary = capture(
            model,
            arch,
            layers,
            ids,
            sink,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            lookahead=args.lookahead,
            eos_ids=eos,
            pad_id=pad,
            sample=args.sample,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
            token_text=token_text,
            on_batch=progress,
        )
    except KeyboardInterrupt:
        print(f"moesim capture: interrupted; {_kept(sink)}", file=sys.stderr)
        return 130
    except torch.cuda.OutOfMemoryError:
        raise ConfigError(
            f"out of device memory: lower --batch-size or --max-new-tokens; {_kept(sink)}"
        ) from None
    except MoesimError as exc:
        raise type(exc)(f"{exc}; {_kept(sink)}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    tokens = summary.prefill_tokens + summary.decode_tokens
    print(
        f"wrote {sink.path}: {summary.rows:,} rows, {summary.steps:,} steps, "
        f"{summary.sequences} sequences ({summary.prefill_tokens:,} prefill + "
        f"{summary.decode_tokens:,} decode tokens) in {summary.seconds:.1f} s "
        f"({tokens / max(summary.seconds, 1e-9):,.0f} tokens/s)"
    )
    return 0


def _pad_id(tokenizer, config, eos: tuple[int, ...]) -> int:
    """The id used for padding (masked out, never recorded)."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None)):
        if isinstance(value, int):
            return value
    return eos[0] if eos else 0


def _kept(sink) -> str:
    if sink.batches == 0:
        return "no batch had finished: nothing written"
    return f"kept the {sink.batches} finished batches ({sink.rows:,} rows) in {sink.path}"


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
