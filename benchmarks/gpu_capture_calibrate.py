"""The prepared GPU check of `moesim capture` and `moesim calibrate` (issue #6), in one run.

On a machine with an NVIDIA GPU (about 3-5 minutes; nothing is downloaded):

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_capture_calibrate.py --device cuda --out "$OUT"

Check it anywhere on the CPU (tiny models only, about a minute):

    python benchmarks/gpu_capture_calibrate.py --device cpu

What it does, all through the `moesim` command line (run as `python -m simulator.cli` from
this checkout, so no install is needed where torch and transformers already are):

1. builds a tiny random Mixtral (hidden 64, 4 layers, 8 experts, top-2, with a word-level
   tokenizer) and `moesim capture`s 16 prompts on DEVICE: batches of 4, 32 new tokens,
   lookahead 2; reads the trace back and checks its row count;
2. `moesim calibrate`s DEVICE: on cuda with a Mixtral-8x7B-shaped model (the real hidden size
   4096 and expert width 14336, so experts of 352,321,536 bytes in bfloat16; 2 layers of 4
   experts, random weights, about 3.4 GB built on the GPU), on cpu with the tiny model and
   small settings; the profile is written to OUT/profile.toml;
3. replays the captured trace with that profile (`moesim replay --config`), unless
   `--no-replay` (the replay compiles moesim's kernels on first use, ~1 minute);
4. prints a summary (device, torch, copy bandwidth and latency pinned/pageable, per-expert and
   dense compute, capture speed) and writes it to OUT/summary.md, ready for
   benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def moesim(*args) -> str:
    """Run ``moesim ARGS`` from this checkout; print and return its output (stop on failure)."""
    cmd = [sys.executable, "-m", "simulator.cli", *map(str, args)]
    print("$ moesim " + " ".join(map(str, args)), flush=True)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    print(r.stdout + r.stderr, flush=True)
    if r.returncode != 0:
        sys.exit(f"moesim {args[0]} failed with exit code {r.returncode}")
    return r.stdout + r.stderr


def save_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer: <pad> <s> </s> <unk> w0 w1 ... (vocab ids in all)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )  # fmt: skip
    fast.save_pretrained(folder)


def build_model(folder: Path, device: str, shaped: bool) -> None:
    """Save a random Mixtral: tiny, or with Mixtral-8x7B's widths (2 layers, 4 experts)."""
    import torch
    import transformers

    torch.manual_seed(0)
    if shaped:
        config = transformers.MixtralConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
            num_attention_heads=32, num_key_value_heads=8, num_local_experts=4,
            num_experts_per_tok=2, max_position_embeddings=4096, pad_token_id=0,
            bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        with torch.device(device):
            model = transformers.MixtralForCausalLM._from_config(config, dtype=torch.bfloat16)
    else:
        config = transformers.MixtralConfig(
            vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
            num_experts_per_tok=2, initializer_range=0.2, pad_token_id=0, bos_token_id=1,
            eos_token_id=2,
        )  # fmt: skip
        model = transformers.MixtralForCausalLM(config)
    model.save_pretrained(folder)
    save_tokenizer(folder, config.vocab_size)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def write_prompts(path: Path, n: int = 16) -> None:
    import random

    rng = random.Random(0)
    lines = [" ".join(f"w{rng.randrange(990)}" for _ in range(rng.randint(16, 48)))
             for _ in range(n)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "results" / "gpu-check"),
                    help="folder for capture.parquet, profile.toml, summary.md")  # fmt: skip
    ap.add_argument("--work", default=None, help="folder for the built models (default: temp)")
    ap.add_argument("--no-replay", action="store_true", help="skip the replay with the profile")
    args = ap.parse_args()
    import torch
    import transformers

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no GPU here (use --device cpu to check the script)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="moesim-gpu-check-"))
    t_all = time.perf_counter()

    # 1. capture a tiny model
    tiny = work / "tiny-mixtral"
    build_model(tiny, args.device, shaped=False)
    prompts = work / "prompts.txt"
    write_prompts(prompts)
    trace = out / "capture.parquet"
    t0 = time.perf_counter()
    log = moesim("capture", "--model", tiny, "--prompts", prompts, "-o", trace, "--device",
                 args.device, "--batch-size", 4, "--max-new-tokens", 32, "--lookahead", 2,
                 "--ignore-eos")  # fmt: skip
    t_capture = time.perf_counter() - t0
    sys.path.insert(0, str(REPO))
    from traces.io import read_trace

    tr = read_trace(trace)
    words = [len(line.split()) for line in prompts.read_text().splitlines()]
    expected = 4 * (sum(words) + len(words) * 31)  # 4 MoE layers, 31 decode tokens each
    assert len(tr.step) == expected, (len(tr.step), expected)
    speed = re.search(r"wrote .*\(([\d,]+) tokens/s\)", log)

    # 2. calibrate
    profile = out / "profile.toml"
    if cuda:
        shaped = work / "mixtral-8x7b-shaped"
        t0 = time.perf_counter()
        build_model(shaped, args.device, shaped=True)
        print(f"built {shaped} in {time.perf_counter() - t0:.1f} s", flush=True)
        moesim("calibrate", "--model", shaped, "--device", args.device, "--dtype", "bfloat16",
               "-o", profile)  # fmt: skip
    else:
        moesim("calibrate", "--model", tiny, "--device", args.device, "--repeats", 3,
               "--tokens", "1,4,16", "--batch-sizes", "1,4", "--context", 16,
               "--decode-steps", 4, "-o", profile)  # fmt: skip
    text = profile.read_text()
    values = tomllib.loads(text)

    # 3. replay the capture on this machine's profile
    if not args.no_replay:
        moesim("replay", trace, "--config", profile, "--policy", "lru", "--policy", "belady",
               "--cache-fraction", 0.25)  # fmt: skip

    # 4. summary
    name = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    fits = dict(re.findall(r"# link, (\w+(?: \w+)?) host buffers.*?: fit latency (\S+ s, \S+ GB/s)",
                           text))  # fmt: skip
    link, comp = values["link"], values.get("compute", {})
    lines = [
        f"### `moesim capture` and `moesim calibrate` on {name} ({args.device})",
        "",
        f"`python benchmarks/gpu_capture_calibrate.py --device {args.device}`, "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; total {time.perf_counter() - t_all:.0f} s.",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    for kind, fit in fits.items():
        lines.append(
            f"| host-to-{'GPU' if cuda else 'host'} copies, {kind} buffers (fit) | {fit} |"
        )
    lines += [
        f"| `[link]` written | bandwidth_gbps = {link['bandwidth_gbps']:g}, "
        f"latency_s = {link['latency_s']:g} |",
    ]
    if comp:
        model = "Mixtral-8x7B-shaped expert, bf16" if cuda else "tiny model, float32"
        lines += [
            f"| one routed expert ({model}) | expert_s = {comp['expert_s']:g} s + "
            f"{comp['expert_per_token_s']:g} s/token |",
            f"| dense work per MoE layer | dense_s = {comp['dense_s']:g} s + "
            f"{comp['dense_per_token_s']:g} s/token |",
        ]
    lines += [
        f"| capture of the tiny model (16 prompts, batches of 4, 32 new tokens, lookahead 2) | "
        f"{len(tr.step):,} rows, {trace.stat().st_size:,} bytes, "
        f"{speed.group(1) if speed else '?'} tokens/s, {t_capture:.1f} s with start-up |",
        "",
        "Raw measurements: the comments of profile.toml.",
    ]
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    print(summary)
    print(f"wrote {trace}, {profile}, {out / 'summary.md'}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
