"""``moesim calibrate``: measure this machine and write a hardware profile (docs/capture.md)."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from traces.capture import loading
from traces.errors import ConfigError


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected integers >= 1 separated by commas, got {text!r}"
        )
    return values


def _pos_int(text: str) -> int:
    values = _int_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one integer >= 1, got {text!r}")
    return values[0]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="measure host-to-GPU copies and a model's compute; write a hardware profile",
        description="On the machine where the model would run: measure host-to-device copy "
        "time of expert-sized pinned and pageable buffers, and (with --model) the model's "
        "per-expert and per-layer dense compute during real generation, then write a hardware "
        "profile: a configuration with [link] and [compute] (the keys of sim.toml) for "
        "'moesim replay --config PROFILE'. On --device cpu the figures are host memcpy and "
        "CPU compute, and the profile says so. Needs: pip install 'moesim[capture]'. See "
        "docs/capture.md.",
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="PROFILE", help="profile to write (TOML)"
    )
    p.add_argument(
        "--model",
        metavar="ID_OR_PATH",
        help="model folder or cached Hugging Face id (local only); without it only "
        "[link] is measured",
    )
    loading.add_device_args(p, "weight dtype to load the model in (default: the checkpoint's)")
    p.add_argument(
        "--expert-bytes",
        type=_pos_int,
        default=None,
        metavar="BYTES",
        help="expert size for the copy sizes (default: the model's, else 64 MiB)",
    )
    p.add_argument(
        "--tokens",
        type=_int_list,
        default=[1, 2, 4, 8, 16, 32, 64],
        metavar="N,N",
        help="tokens per expert call (default 1,2,4,8,16,32,64)",
    )
    p.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=[1, 4, 16],
        metavar="B,B",
        help="generation batch sizes for the dense timing (default 1,4,16)",
    )
    p.add_argument(
        "--context",
        type=_pos_int,
        default=64,
        metavar="N",
        help="prompt tokens for the dense timing (default 64)",
    )
    p.add_argument(
        "--decode-steps",
        type=_pos_int,
        default=8,
        metavar="N",
        help="decode steps per batch size for the dense timing (default 8)",
    )
    p.add_argument(
        "--repeats",
        type=_pos_int,
        default=10,
        metavar="R",
        help="timed repetitions per copy size and per expert call (default 10)",
    )
    p.add_argument(
        "--layers",
        type=_pos_int,
        default=None,
        metavar="N",
        help="time the experts of the first N MoE layers only (default: all)",
    )
    p.add_argument(
        "--base",
        metavar="CONFIG",
        help="also write every other setting of this configuration (e.g. sim.toml; "
        "its comments are not kept): a complete config for this machine",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from traces.capture.deps import require

    torch, transformers = require()
    from simulator.calibrate import (
        Profile,
        link_sizes,
        measure_dense,
        measure_experts,
        measure_link,
        render_profile,
    )
    from simulator.config import load_config
    from traces.capture.meta import build_meta
    from traces.capture.routers import find_moe_layers, get_arch
    from traces.io import atomic_path

    base = None
    if args.base:
        load_config(args.base).validate()  # a bad base is reported before measuring
        base = tomllib.loads(Path(args.base).read_text())
    transformers.utils.logging.disable_progress_bar()
    device = loading.resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    cuda_version = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    versions = f"torch {torch.__version__}{cuda_version}, transformers {transformers.__version__}"
    say = lambda text: print(text, file=sys.stderr)  # noqa: E731

    model = arch = layers = meta = None
    if args.model:
        config = loading.load_config(args.model)
        arch = get_arch(getattr(config, "model_type", ""), f"model {args.model!r}")
        model = loading.load_model(args.model, config, device, args.dtype)
        layers = find_moe_layers(model, arch, f"model {args.model!r}")
        meta = build_meta(args.model, config, arch, layers, source="calibrate", extra={})
    expert_bytes = args.expert_bytes or (meta.expert_bytes[0] if meta else 64 << 20)

    say(f"moesim calibrate: {device} ({name}); copies of {expert_bytes:,}-byte experts")
    sizes = link_sizes(expert_bytes)
    link = []
    if device.type == "cuda":
        link.append(measure_link(device, sizes, args.repeats, pinned=True))
        link.append(measure_link(device, sizes, args.repeats, pinned=False))
    else:
        link.append(measure_link(device, sizes, args.repeats, pinned=False))
    profile = Profile(device=str(device), device_name=name, versions=versions, link=link)
    if model is not None:
        profile.model = args.model
        profile.model_summary = (
            f"{arch.label}, {meta.num_layers} MoE layers x {meta.max_experts} experts, "
            f"top-k {meta.top_k or 'dynamic'}, {meta.expert_bytes[0]:,} bytes/expert ({meta.dtype})"
        )
        timed = layers[: args.layers] if args.layers else layers
        say(f"  experts of {len(timed)} MoE layers on {', '.join(map(str, args.tokens))} tokens")
        profile.experts = measure_experts(model, arch, timed, args.tokens, args.repeats)
        say(
            f"  generation: batches {', '.join(map(str, args.batch_sizes))} x {args.context} "
            f"prompt tokens, {args.decode_steps} decode steps"
        )
        profile.dense = measure_dense(
            model,
            layers,
            batch_sizes=args.batch_sizes,
            context=args.context,
            decode_steps=args.decode_steps,
        )
    text = render_profile(profile, base)
    out = Path(args.output)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
        try:
            load_config(tmp).validate()
        except ConfigError as exc:  # cannot happen with measured values; never leave a bad file
            raise ConfigError(str(exc).replace(str(tmp), str(out))) from None
    print(f"wrote {out}")
    for section, values in profile.values.items():
        print(f"[{section}] " + ", ".join(f"{k} = {v:.4g}" for k, v in values.items()))
    if profile.dense is not None and profile.dense.uneven:
        say(f"moesim calibrate: warning: {profile.dense.uneven}")
    return 0


def _cpu_name() -> str:
    """The CPU's model name (Linux), else 'cpu'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"
