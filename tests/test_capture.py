"""moesim capture: tiny random models of every supported architecture, checked against routing
recomputed independently here from the routers' inputs and weights.

Needs the optional 'capture' extra (torch, transformers >= 5); skipped cleanly without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from traces.capture.deps import available
from traces.capture.prompts import read_prompts
from traces.errors import ConfigError
from traces.io import read_meta, read_trace

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- prompt files
# (no torch needed)


def test_read_prompts_text_and_jsonl(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n  second one \n")
    got = read_prompts(text)
    assert [(p.line, p.text) for p in got] == [(1, "first prompt"), (3, "  second one ")]
    jl = tmp_path / "p.jsonl"
    jl.write_text(
        '"plain"\n{"prompt": "a"}\n{"text": "b"}\n\n{"input_ids": [3, 4]}\n'
        '{"messages": [{"role": "user", "content": "hi"}]}\n'
    )
    got = read_prompts(jl)
    assert [p.text for p in got[:3]] == ["plain", "a", "b"]
    assert got[3].token_ids == [3, 4] and got[3].line == 5
    assert got[4].messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{bad json", "line 1: expected a JSON string or object"),
        ('{"input_ids": [1, -2]}', "line 1: key 'input_ids': expected a list of token ids"),
        ('{"colour": 1}', "expected one of the keys 'prompt', 'text', 'messages'"),
        ("[1, 2]", "expected a JSON string or object, got list"),
    ],
)
def test_read_prompts_errors(tmp_path, line, message):
    p = tmp_path / "p.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(ConfigError, match=message):
        read_prompts(p)
    with pytest.raises(ConfigError, match="no such prompt file"):
        read_prompts(tmp_path / "absent.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


# ----------------------------------------------------------------------------- models

#: The optional extra (torch, transformers >= 5) is there: the model tests run (CI installs it).
CAPTURE = available()
needs_capture = pytest.mark.skipif(
    not CAPTURE, reason="needs the capture extra: pip install 'moesim[capture]'"
)
if CAPTURE:
    import torch
    import transformers

    from traces.capture.meta import build_meta
    from traces.capture.recorder import capture, optional_columns
    from traces.capture.routers import find_moe_layers, get_arch
    from traces.capture.sink import TraceSink

    # one thread: tiny models gain nothing from more, and on a shared 2-core machine
    # (pytest -n 2) torch's thread pools spin against each other (a 4 x 8 softmax: ~10 ms)
    torch.set_num_threads(1)

H, I, E, V = 32, 24, 8, 101  # hidden, expert intermediate, experts, vocabulary
COMMON = dict(
    vocab_size=V,
    hidden_size=H,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,
)
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
MLA = dict(
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    num_key_value_heads=4,
    rope_parameters=ROPE,
    first_k_dense_replace=1,
)


def make_config(arch: str):
    t = transformers
    if arch == "mixtral":
        return t.MixtralConfig(
            **COMMON,
            num_key_value_heads=2,
            intermediate_size=I,
            num_local_experts=E,
            num_experts_per_tok=2,
        )
    if arch == "qwen2_moe":
        return t.Qwen2MoeConfig(
            **COMMON,
            num_key_value_heads=2,
            intermediate_size=40,
            moe_intermediate_size=I,
            shared_expert_intermediate_size=40,
            num_experts=E,
            num_experts_per_tok=3,
            norm_topk_prob=False,
        )
    if arch == "qwen3_moe":
        return t.Qwen3MoeConfig(
            **COMMON,
            num_key_value_heads=2,
            head_dim=8,
            moe_intermediate_size=I,
            num_experts=E,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        )
    if arch == "olmoe":
        return t.OlmoeConfig(
            **COMMON,
            num_key_value_heads=2,
            intermediate_size=I,
            num_experts=E,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        )
    if arch == "deepseek_v2":
        return t.DeepseekV2Config(
            **COMMON,
            **MLA,
            q_lora_rank=None,
            intermediate_size=40,
            moe_intermediate_size=I,
            n_routed_experts=E,
            num_experts_per_tok=3,
            n_shared_experts=2,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
        )
    if arch == "deepseek_v3":
        return t.DeepseekV3Config(
            **COMMON,
            **MLA,
            q_lora_rank=24,
            intermediate_size=40,
            moe_intermediate_size=I,
            n_routed_experts=E,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        )
    if arch == "gpt_oss":
        return t.GptOssConfig(
            **COMMON,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=I,
            num_local_experts=E,
            num_experts_per_tok=2,
            sliding_window=6,
        )
    if arch == "switch_transformers":
        return t.SwitchTransformersConfig(
            vocab_size=V,
            d_model=H,
            d_kv=8,
            d_ff=I,
            num_layers=4,
            num_decoder_layers=4,
            num_heads=4,
            num_experts=4,
            expert_capacity=1,
            encoder_sparse_step=2,
            decoder_sparse_step=2,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            initializer_factor=4.0,
        )
    raise AssertionError(arch)


ARCHS = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "switch_transformers",
]

#: Bytes of one routed expert of the tiny models (float32), worked out from the configs:
#: gated experts hold 3 hidden x intermediate matrices; GPT-OSS adds biases (2I + H); Switch's
#: experts are two-matrix (wi, wo), no bias.
EXPERT_BYTES = {
    "mixtral": 3 * H * I * 4,
    "qwen2_moe": 3 * H * I * 4,
    "qwen3_moe": 3 * H * I * 4,
    "olmoe": 3 * H * I * 4,
    "deepseek_v2": 3 * H * I * 4,
    "deepseek_v3": 3 * H * I * 4,
    "gpt_oss": (3 * H * I + 2 * I + H) * 4,
    "switch_transformers": 2 * H * I * 4,
}
#: (shared experts per MoE layer, bytes of one): Qwen2-MoE's shared MLP is one expert of
#: intermediate 40; DeepSeek fuses n_shared_experts experts of intermediate I.
SHARED = {
    "qwen2_moe": (1, 3 * H * 40 * 4),
    "deepseek_v2": (2, 3 * H * I * 4),
    "deepseek_v3": (1, 3 * H * I * 4),
}

PROMPTS = [[5, 6, 7], [3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15]]
MAX_NEW = 5


def make_model(arch: str):
    torch.manual_seed(0)
    config = make_config(arch)
    auto = (
        transformers.AutoModelForSeq2SeqLM
        if config.is_encoder_decoder
        else transformers.AutoModelForCausalLM
    )
    model = auto.from_config(config).eval()
    for module in model.modules():  # a non-zero correction bias exercises DeepSeek-V3's rule
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(torch.linspace(-0.3, 0.3, bias.numel()))
    return model


# ----------------------------------------------------------------------------- reference
def reference_route(arch, config, router, x):
    """Experts chosen for router inputs ``x`` ([T, H], one sequence), worked out from the
    architecture's published rule. Returns (experts[T][k], weights[T][k], margin[T]):
    ``margin`` is how far the last chosen expert's selection score is ahead of the best
    unchosen one (rows within float noise of a tie are not compared)."""
    x = x.double()
    w = (
        router.weight.detach().double()
        if arch != "switch_transformers"
        else (router.classifier.weight.detach().double())
    )
    logits = x @ w.T
    if arch == "gpt_oss":
        logits = logits + router.bias.detach().double()
    k = getattr(router, "top_k", 1)
    if arch in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        select = logits.softmax(-1)
        weight = select
    elif arch == "deepseek_v2":
        select = logits.softmax(-1)
        groups = select.view(len(x), config.n_group, -1).amax(-1)
        keep = groups.topk(config.topk_group, -1).indices
        mask = (
            torch.zeros_like(groups)
            .scatter(1, keep, 1.0)
            .repeat_interleave(E // config.n_group, dim=1)
        )
        select = select * mask
        weight = select * config.routed_scaling_factor
    elif arch == "deepseek_v3":
        score = logits.sigmoid()
        select = score + router.e_score_correction_bias.double()
        groups = select.view(len(x), config.n_group, -1).topk(2, -1).values.sum(-1)
        keep = groups.topk(config.topk_group, -1).indices
        mask = (
            torch.zeros_like(groups)
            .scatter(1, keep, 1.0)
            .repeat_interleave(E // config.n_group, dim=1)
        )
        select = select.masked_fill(mask == 0, -1e9)
        weight = score
    elif arch == "gpt_oss":
        select = logits
        weight = None
    else:  # switch: top-1 of the softmax
        select = logits.softmax(-1)
        weight = select
    top = select.topk(k + 1 if k < select.shape[1] else k, -1)
    chosen = top.indices[:, :k]
    margin = (top.values[:, k - 1] - top.values[:, k]) if k < select.shape[1] else None
    if arch == "gpt_oss":
        wts = top.values[:, :k].softmax(-1)
    else:
        wts = weight.gather(1, chosen)
        if arch == "deepseek_v3":
            wts = wts / wts.sum(-1, keepdim=True) * config.routed_scaling_factor
        elif getattr(config, "norm_topk_prob", False) or arch == "mixtral":
            wts = wts / wts.sum(-1, keepdim=True)
    return chosen.tolist(), wts.tolist(), margin.tolist()


def reference_rows(arch, model, layers, prompts, sequences, eos, max_new, batch_size):
    """{(seq, layer, pos): (phase, token, step, experts, weights, margin, preds{j: experts})}
    from one unbatched, uncached forward pass per sequence over its real tokens."""
    config = model.config
    inputs = {}
    hooks = [
        layer.router.register_forward_hook(
            lambda m, a, o, i=layer.index: inputs.__setitem__(i, a[0].detach().reshape(-1, H))
        )
        for layer in layers
    ]
    expected = {}
    # generation feeds the decoder one token per pass, so its expert capacity never binds;
    # this one pass over the whole decoder sequence must not apply it either
    capacity = {
        layer.index: layer.router.expert_capacity
        for layer in layers
        if layer.stack == "decoder" and hasattr(layer.router, "expert_capacity")
    }
    for layer in layers:
        if layer.index in capacity:
            layer.router.expert_capacity = 10**6
    try:
        step = 0
        for b0 in range(0, len(prompts), batch_size):
            batch = range(b0, min(b0 + batch_size, len(prompts)))
            longest = 0
            for s in batch:
                prompt, gen = prompts[s], sequences[s]
                first_eos = next((i for i, t in enumerate(gen) if t in eos), len(gen))
                fed = gen[: min(max_new - 1, first_eos)]
                with torch.no_grad():
                    if config.is_encoder_decoder:
                        dec = [config.decoder_start_token_id] + fed
                        model(
                            input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([dec])
                        )
                    else:
                        model(input_ids=torch.tensor([prompt + fed]))
                for layer in layers:
                    x = inputs[layer.index]
                    enc = layer.stack == "encoder"
                    tokens = prompt if enc else (dec if config.is_encoder_decoder else prompt + fed)
                    ex, wt, mg = reference_route(arch, config, layer.router, x)
                    if arch == "switch_transformers" and enc:  # capacity, per sequence
                        used = {}
                        for t in range(len(ex)):
                            used[ex[t][0]] = used.get(ex[t][0], 0) + 1
                            if used[ex[t][0]] > config.expert_capacity:
                                ex[t], wt[t] = [], []
                    preds = {}
                    for j in (1, 2):
                        src = layer.index - j
                        if src >= 0 and layers[src].stack == layer.stack:
                            preds[j] = reference_route(arch, config, layer.router, inputs[src])[0]
                    for pos, tok in enumerate(tokens):
                        if config.is_encoder_decoder:
                            phase, st = (0, step) if enc else (1, step + 1 + pos)
                        else:
                            phase = 0 if pos < len(prompt) else 1
                            st = step + (0 if phase == 0 else pos - len(prompt) + 1)
                        expected[(s, layer.index, pos)] = (
                            phase,
                            tok,
                            st,
                            ex[pos],
                            wt[pos],
                            mg[pos] if mg else 1.0,
                            {j: p[pos] for j, p in preds.items()},
                        )
                longest = max(longest, len(fed) + (1 if config.is_encoder_decoder else 0))
            step += 1 + longest  # the prefill (or encoder) step, then the decode steps
    finally:
        for h in hooks:
            h.remove()
        for layer in layers:
            if layer.index in capacity:
                layer.router.expert_capacity = capacity[layer.index]
    return expected


def run_capture(model, arch, path, *, batch_size, eos, lookahead=2, on_batch=None, text=False):
    """Capture PROMPTS; returns (layers, meta, per-batch generate kwargs and outputs)."""
    a = get_arch(model.config.model_type, arch)
    layers = find_moe_layers(model, a, arch)
    meta = build_meta(arch, model.config, a, layers, source="test", extra={})
    calls = []
    plain = model.generate

    def spy(**kwargs):  # the same generate, also returning the logits for comparison
        out = plain(**kwargs, output_logits=True, return_dict_in_generate=True)
        calls.append((kwargs, out))
        return out

    model.generate = spy
    try:
        sink = TraceSink(path, meta, optional_columns(lookahead, text))
        capture(
            model,
            a,
            layers,
            PROMPTS,
            sink,
            batch_size=batch_size,
            max_new_tokens=MAX_NEW,
            lookahead=lookahead,
            eos_ids=eos,
            pad_id=0,
            on_batch=on_batch,
        )
    finally:
        del model.generate
    return layers, meta, calls


@needs_capture
@pytest.mark.parametrize("arch", ARCHS)
def test_capture_matches_reference_routing(arch, tmp_path):
    model = make_model(arch)
    enc_dec = model.config.is_encoder_decoder
    # pick an end-of-sequence token that sequence 0 generates early, so that one sequence of
    # the first batch finishes while the others go on
    probe = model.generate(
        input_ids=torch.tensor([PROMPTS[0]]),
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        pad_token_id=0,
    )
    eos = (int(probe[0, -2]),)
    path = tmp_path / "t.parquet"
    layers, meta, calls = run_capture(model, arch, path, batch_size=3, eos=eos)
    trace = read_trace(path)

    # metadata from the model's own shapes
    assert meta.num_layers == len(layers) == (4 if enc_dec else 2 if "deepseek" in arch else 3)
    assert meta.experts_per_layer == [layers[0].num_experts] * meta.num_layers
    assert meta.top_k == (None if enc_dec else model.config.num_experts_per_tok)
    assert meta.expert_bytes == [EXPERT_BYTES[arch]] * meta.num_layers
    count, each = SHARED.get(arch, (0, 0))
    assert meta.shared_experts == [count] * meta.num_layers and meta.shared_expert_bytes == each
    assert meta.dtype == "float32" and meta.pred_horizons == [1, 2]
    assert trace.meta.layer_ids == (
        [1, 3, 5, 7] if enc_dec else [1, 2] if "deepseek" in arch else [0, 1, 2]
    )

    # the hooks left every logit bit-identical: rerun each batch's generate without them
    sequences = []
    for kwargs, out in calls:
        again = model.generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        assert torch.equal(again.sequences, out.sequences)
        assert len(again.logits) == len(out.logits)
        assert all(torch.equal(a, b) for a, b in zip(again.logits, out.logits, strict=True))
        start = 1 if enc_dec else kwargs["input_ids"].shape[1]
        sequences += [row[start:].tolist() for row in out.sequences]

    expected = reference_rows(arch, model, layers, PROMPTS, sequences, set(eos), MAX_NEW, 3)
    got_keys = list(zip(trace.seq.tolist(), trace.layer.tolist(), trace.pos.tolist(), strict=True))
    assert sorted(got_keys) == sorted(expected)  # exactly the real tokens, each once
    fed = {
        s: sum(1 for (q, lay, _) in expected if q == s and lay == layers[-1].index)
        for s in range(len(PROMPTS))
    }
    assert fed[0] < len(PROMPTS[0]) + MAX_NEW - 1 + enc_dec  # sequence 0 stopped early

    compared = 0
    for i, key in enumerate(got_keys):
        phase, tok, step, ex, wt, margin, preds = expected[key]
        assert (trace.phase[i], trace.token_id[i], trace.step[i]) == (phase, tok, step), key
        row = trace.experts[trace.offsets[i] : trace.offsets[i + 1]].tolist()
        w = trace.weights[trace.offsets[i] : trace.offsets[i + 1]]
        assert np.all(np.diff(w) <= 0)  # rank order: descending gate weight
        for j in (1, 2):
            po, pv = trace.preds[j]
            got_pred = pv[po[i] : po[i + 1]].tolist()
            if j in preds and margin > 1e-4:
                assert sorted(got_pred) == sorted(preds[j]), (key, j)
            elif j not in preds:
                assert got_pred == []  # the first j layers of a stack have no prediction
        if margin < 1e-4:
            continue  # a near-tie: float noise may pick either expert
        compared += 1
        assert sorted(row) == sorted(ex), key
        ref = dict(zip(ex, wt, strict=True))
        np.testing.assert_allclose(w, [ref[e] for e in row], rtol=1e-4, atol=1e-6)
    assert compared >= 0.95 * len(got_keys)
    if arch == "switch_transformers":  # expert capacity 1 < tokens: some tokens dropped
        assert (np.diff(trace.offsets) == 0).any()


@needs_capture
def test_batched_and_unbatched_capture_agree(tmp_path):
    model = make_model("qwen2_moe")
    run_capture(model, "qwen2_moe", tmp_path / "b1.parquet", batch_size=1, eos=(), lookahead=1)
    run_capture(model, "qwen2_moe", tmp_path / "b4.parquet", batch_size=4, eos=(), lookahead=1)
    one, four = read_trace(tmp_path / "b1.parquet"), read_trace(tmp_path / "b4.parquet")
    key1 = list(zip(one.seq.tolist(), one.layer.tolist(), one.pos.tolist(), strict=True))
    key4 = list(zip(four.seq.tolist(), four.layer.tolist(), four.pos.tolist(), strict=True))
    assert sorted(key1) == sorted(key4) and len(key1) == 3 * sum(
        len(p) + MAX_NEW - 1 for p in PROMPTS
    )
    # one prefill step per prompt and MAX_NEW - 1 decode steps per batch
    assert len(np.unique(one.step)) == len(PROMPTS) * MAX_NEW
    assert len(np.unique(four.step)) == MAX_NEW
    agree = [
        four.experts[four.offsets[key4.index(k)] : four.offsets[key4.index(k) + 1]].tolist()
        == one.experts[one.offsets[i] : one.offsets[i + 1]].tolist()
        for i, k in enumerate(key1)
    ]
    assert np.mean(agree) > 0.97


@needs_capture
def test_capture_refuses_a_router_that_did_not_run(tmp_path):
    from traces.capture import CaptureError

    model = make_model("olmoe")
    model.model.layers[1].mlp.forward = lambda hidden: torch.zeros_like(hidden)  # no router call
    with pytest.raises(CaptureError, match=r"model\.layers\.1\.mlp: its router did not run"):
        run_capture(model, "olmoe", tmp_path / "t.parquet", batch_size=2, eos=())
    assert not (tmp_path / "t.parquet").exists()


@needs_capture
def test_stopped_capture_keeps_finished_batches(tmp_path):
    model = make_model("mixtral")

    def stop_after_first(report):
        if report.index == 0:
            raise KeyboardInterrupt

    path = tmp_path / "stopped.parquet"
    with pytest.raises(KeyboardInterrupt):
        run_capture(model, "mixtral", path, batch_size=2, eos=(), on_batch=stop_after_first)
    trace = read_trace(path)  # readable, validated
    assert sorted(set(trace.seq.tolist())) == [0, 1]
    assert len(trace.step) == 3 * (len(PROMPTS[0]) + len(PROMPTS[1]) + 2 * (MAX_NEW - 1))
    # a folder of parts: one complete part per batch
    folder = tmp_path / "parts"
    folder.mkdir()
    with pytest.raises(KeyboardInterrupt):
        run_capture(model, "mixtral", folder, batch_size=2, eos=(), on_batch=stop_after_first)
    assert [p.name for p in folder.glob("*.parquet")] == ["part-00000.parquet"]
    assert len(read_trace(folder).step) == len(trace.step)
    # a failure before any batch finished: nothing written, no file left behind

    def fail(module, args):
        raise RuntimeError("device lost")

    handle = model.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            run_capture(model, "mixtral", tmp_path / "none.parquet", batch_size=2, eos=())
    finally:
        handle.remove()
    assert not (tmp_path / "none.parquet").exists()
    assert not list(tmp_path.glob(".none.parquet.*"))  # no temporary file either


# ----------------------------------------------------------------------------- the CLI
def save_tiny(folder: Path, arch: str = "mixtral", chat: bool = True) -> None:
    """A tiny model with a word-level tokenizer (w0..w96) and, with ``chat``, a chat template
    "[user] CONTENT [assistant]" ([user] = w96, [assistant] = w9), saved as a model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(V - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    if chat:
        fast.chat_template = (
            "{% for m in messages %}w96 {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}w9{% endif %}"
        )
    make_model(arch).save_pretrained(folder)
    fast.save_pretrained(folder)


class Result:
    def __init__(self, code, out, err):
        self.returncode, self.stdout, self.stderr = code, out, err


def moesim(capsys, monkeypatch, command: str):
    """Run ``moesim COMMAND`` (words split on spaces) in this process, offline; returns its
    exit code and output."""
    from simulator.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    code = main(command.split())
    out, err = capsys.readouterr()
    return Result(code, out, err)


@needs_capture
def test_cli_capture_end_to_end(tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "tiny"
    save_tiny(model_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1 w2 w3 w4\nw10 w11\n\nw20 w21 w22\n")
    out = tmp_path / "run.parquet"
    r = moesim(
        capsys,
        monkeypatch,
        f"capture --model {model_dir} --prompts {prompts} -o {out} "
        "--max-new-tokens 4 --batch-size 2 --lookahead 1 --ignore-eos --device cpu",
    )
    assert r.returncode == 0, r.stderr
    assert "batch 2/2" in r.stderr and f"wrote {out}" in r.stdout
    trace = read_trace(out, load_text=True)
    meta = trace.meta
    assert meta.model == str(model_dir) and meta.num_layers == 3 and meta.top_k == 2
    assert meta.expert_bytes == [EXPERT_BYTES["mixtral"]] * 3 and meta.pred_horizons == [1]
    assert meta.pred_source == "gate-lookahead" and "--batch-size 2" in meta.source
    assert meta.extra["architecture"] == "mixtral" and meta.extra["prompts"] == 3
    # the prompt's tokens, with their texts, at positions 0..n-1 of each sequence, layer 0
    first = (trace.seq == 0) & (trace.layer == 0) & (trace.phase == 0)
    assert trace.pos[first].tolist() == [0, 1, 2, 3]
    assert trace.token[first].tolist() == ["w1", "w2", "w3", "w4"]
    assert trace.token_id[first].tolist() == [5, 6, 7, 8]
    # 3 prompts of 4, 2, 3 tokens and 3 decode tokens each, at 3 layers
    assert len(trace.step) == 3 * (4 + 2 + 3 + 3 * 3)

    # token ids, text and a chat in JSONL; a folder of parts; prefill only
    jl = tmp_path / "p.jsonl"
    jl.write_text(
        json.dumps({"input_ids": [5, 6, 7]})
        + "\n"
        + json.dumps("w3 w4")
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "w7"}]})
        + "\n"
    )
    r = moesim(
        capsys,
        monkeypatch,
        f"capture --model {model_dir} --prompts {jl} "
        f"-o {tmp_path}/parts/ --max-new-tokens 0 --no-text --device cpu",
    )
    assert r.returncode == 0, r.stderr
    parts = read_trace(tmp_path / "parts")
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == [
        f"part-0000{i}.parquet" for i in range(3)
    ]
    assert (parts.phase == 0).all() and len(parts.step) == 3 * (3 + 2 + 3)
    # the tiny tokenizer's chat template: "[user] CONTENT [assistant]" = w96 w7 w9
    assert parts.token_id[(parts.seq == 2) & (parts.layer == 0)].tolist() == [100, 11, 13]
    assert read_meta(tmp_path / "parts").pred_horizons == []


@needs_capture
def test_cli_capture_errors(tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1 w2\n")
    x = tmp_path / "x.parquet"
    r = moesim(
        capsys,
        monkeypatch,
        f"capture --model no-such-org/no-such-model --prompts {prompts} -o {x} --device cpu",
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not found locally" in lines[0]
    assert "moesim never downloads models" in lines[0]
    # a model type capture does not know
    folder = tmp_path / "llama"
    transformers.LlamaConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=4, intermediate_size=I
    ).save_pretrained(folder)
    r = moesim(
        capsys, monkeypatch, f"capture --model {folder} --prompts {prompts} -o {x} --device cpu"
    )
    assert r.returncode == 2 and "model type 'llama' is not supported" in r.stderr
    # a prompt outside the vocabulary; a horizon the model cannot have; no chat template
    model_dir = tmp_path / "tiny"
    save_tiny(model_dir, chat=False)
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"input_ids": [5, 500]}\n')
    r = moesim(
        capsys, monkeypatch, f"capture --model {model_dir} --prompts {jl} -o {x} --device cpu"
    )
    assert r.returncode == 2
    assert "line 1: token id 500 is outside the model's vocabulary (0..100)" in r.stderr
    r = moesim(
        capsys,
        monkeypatch,
        f"capture --model {model_dir} --prompts {prompts} -o {x} --lookahead 3 --device cpu",
    )
    assert r.returncode == 2 and "--lookahead 3: the model has 3 MoE layers" in r.stderr
    r = moesim(
        capsys,
        monkeypatch,
        f"capture --model {model_dir} --prompts {prompts} -o {x} --chat --device cpu",
    )
    assert r.returncode == 2 and "line 1: the tokenizer has no chat template" in r.stderr
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "part-00000.parquet").write_bytes(b"old")
    r = moesim(
        capsys,
        monkeypatch,
        f"capture --model {model_dir} --prompts {prompts} -o {tmp_path}/parts/ --device cpu",
    )
    assert r.returncode == 2 and "parts: folder already holds *.parquet files" in r.stderr
    if not torch.cuda.is_available():
        r = moesim(
            capsys,
            monkeypatch,
            f"capture --model {model_dir} --prompts {prompts} -o {x} --device cuda",
        )
        assert r.returncode == 2 and "--device cuda: no CUDA device is visible" in r.stderr
    assert not x.exists()
