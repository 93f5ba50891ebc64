"""Loading a model, its config and tokenizer from local files only (never the network).

``moesim capture`` and ``moesim calibrate`` take a local folder (what ``save_pretrained`` or
``hf download --local-dir`` writes) or a Hugging Face id that is already in the local cache
(``HF_HOME``/``HF_HUB_CACHE``). Everything is loaded with ``local_files_only=True``, so a
machine without network works, and a model that is not there is a one-line error.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from traces.capture.deps import require
from traces.errors import ConfigError

#: ``--dtype`` choices: "auto" keeps the checkpoint's dtype.
DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_device_args(parser, dtype_help: str) -> None:
    """``--device`` and ``--dtype``, as ``moesim capture`` and ``moesim calibrate`` take them."""
    parser.add_argument(
        "--device",
        default="auto",
        metavar="DEV",
        help="cuda, cuda:N, cpu or auto (default: cuda where available)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help=dtype_help,
    )


def resolve_device(name: str):
    """The torch device for ``--device`` (``auto``: cuda where available, else cpu)."""
    torch, _ = require()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name}: no CUDA device is visible to torch {torch.__version__} "
            "(a CPU-only build, or no GPU): use --device cpu"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


def _absent(name: str, exc: BaseException) -> ConfigError:
    from huggingface_hub import constants

    detail = " ".join(str(exc).split())[:160]
    if _looks_like_path(name):
        return ConfigError(
            f"model {name!r}: no such model folder, or it lacks config.json/weights ({detail})"
        )
    return ConfigError(
        f"model {name!r}: not found locally (not a folder, and not in the Hugging Face cache "
        f"{constants.HF_HUB_CACHE}); moesim never downloads models: fetch it on a machine with "
        f"network (hf download {name}) and copy the cache, or pass the model's folder"
    )


def _looks_like_path(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~"))


def _where(name: str) -> str:
    p = Path(name).expanduser()
    return str(p) if p.exists() else name


def load_config(name: str):
    """The model's transformers config, from local files."""
    _, transformers = require()
    try:
        return transformers.AutoConfig.from_pretrained(_where(name), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise _absent(name, exc) from None


def load_model(name: str, config, device, dtype: str = "auto"):
    """The model (eval mode, on ``device``) with its weights, from local files.

    With ``accelerate`` installed the weights load straight onto the device; without it they
    pass through host memory first (which then needs room for the whole model). MXFP4
    checkpoints (gpt-oss) are dequantised to bfloat16: transformers' MXFP4 kernels route tokens
    without calling the router module, which the recorder reads.
    """
    torch, transformers = require()
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    auto = (
        transformers.AutoModelForSeq2SeqLM
        if getattr(config, "is_encoder_decoder", False)
        else transformers.AutoModelForCausalLM
    )
    kwargs = {}
    if importlib.util.find_spec("accelerate") is not None:
        kwargs["device_map"] = str(device)  # weights straight onto the device
    if _quant_method(config) == "mxfp4":
        # transformers' MXFP4 kernels route GPT-OSS tokens without calling the router module:
        # dequantised experts keep the router (whose weights are not quantised) in the path
        kwargs["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    try:
        model = auto.from_pretrained(
            _where(name),
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            dtype="auto" if dtype == "auto" else getattr(torch, dtype),
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise _absent(name, exc) from None
    if "device_map" not in kwargs:
        model = model.to(device)
    return model.eval()


def _quant_method(config) -> str | None:
    quant = getattr(config, "quantization_config", None)
    method = (
        quant.get("quant_method")
        if isinstance(quant, dict)
        else getattr(quant, "quant_method", None)
    )
    return None if method is None else str(getattr(method, "value", method))


def load_tokenizer(name: str, required: bool):
    """The model's tokenizer from local files; None when absent and not ``required``."""
    _, transformers = require()
    try:
        return transformers.AutoTokenizer.from_pretrained(_where(name), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if not required:
            return None
        detail = " ".join(str(exc).split())[:160]
        raise ConfigError(
            f"model {name!r}: no tokenizer found locally ({detail}); text prompts need one "
            '(or give token ids in a JSONL prompt file: {"input_ids": [...]})'
        ) from None
