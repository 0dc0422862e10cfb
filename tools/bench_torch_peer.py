"""The PyTorch peer of ``tools/benchmark.py``: the same model shape and batch trained by PyTorch + transformers.

    python -m tools.bench_torch_peer --config=configs/internlm2_1_8b.py [--config.data.micro_bsz=2 ...] \\
        [--compile] [--attn sdpa] [--steps 10] [--warmup 3] [--json OUT.json]

What it runs: ``transformers.LlamaForCausalLM`` built from the config's model section (``hf_config.hf_config``: the
Llama layout of the same widths, heads, GQA, vocabulary and RoPE), fp32 master weights under ``torch.autocast``
in the config's dtype, AdamW (fused on CUDA) with the config's betas, eps and weight decay, gradient clipping at
``hybrid_zero_optimizer.clip_grad_norm``, and one optimizer step per ``data.micro_num`` micro-batches of
``[micro_bsz, seq_len]`` tokens, as our step does. ``--compile`` wraps the model in ``torch.compile``; ``--attn``
picks transformers' attention (``sdpa`` uses PyTorch's flash/cuDNN kernels on a GPU).

Differences that favour the peer, so a win over it is a real one: its rows are whole causal sequences (SDPA has no
document mask, our packed rows mask every document), and it runs on one device only. Reported like
``tools/benchmark.py``: median step time to ``torch.cuda.synchronize`` after ``--warmup`` untimed steps, tokens/s,
MFU with causal FLOPs (``metrics.causal_flops_per_token``), peak memory (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import statistics
import sys
import time
from datetime import datetime

from internevo_jax import config as config_lib
from internevo_jax.convert import hf_config
from internevo_jax.monitoring.metrics import causal_flops_per_token, mfu, peak_tflops
from tools.benchmark import markdown_table, parse_timing_args, report, timing_parser

DTYPES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32", "torch.tf32": "float32"}


def build(config, attn: str, compile_model: bool, device: str):
    """The peer model (fp32 masters on ``device``), its optimizer, and the autocast dtype."""
    import torch
    import transformers

    hf = hf_config.hf_config(config.model, "llama")
    hf.pop("architectures", None)
    hf.pop("model_type", None)
    hf.pop("torch_dtype", None)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf, attn_implementation=attn)).to(device)
    model.train()
    adam = config.adam
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=adam.lr,
        betas=(adam.adam_beta1, adam.adam_beta2),
        eps=adam.adam_eps,
        weight_decay=adam.weight_decay,
        fused=device == "cuda",
    )
    if compile_model:
        model = torch.compile(model)
    dtype = getattr(torch, DTYPES[config.model.dtype])
    torch.backends.cuda.matmul.allow_tf32 = config.model.dtype == "torch.tf32"  # as our "tf32" means backend default
    return model, optimizer, dtype


def run(config, steps: int, warmup: int, attn: str, compile_model: bool, config_path: str) -> dict:
    """Times ``steps`` optimizer steps after ``warmup``; returns the fields (the same names as benchmark.py's)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model, optimizer, dtype = build(config, attn, compile_model, device)
    data = config.data
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    shape = (data.micro_num, data.micro_bsz, data.seq_len)
    clip = config.hybrid_zero_optimizer.clip_grad_norm

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    times, first_step = [], None
    for i in range(warmup + steps):
        tokens = torch.randint(0, config.model.vocab_size, shape, generator=gen).to(device)
        sync()
        start = time.perf_counter()
        for m in range(data.micro_num):
            with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(input_ids=tokens[m], labels=tokens[m]).loss / data.micro_num
            loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if first_step is None:
            first_step = time.perf_counter() - t0  # build + first step: includes torch.compile's compile time
        if i >= warmup:
            times.append(time.perf_counter() - start)

    step_s = statistics.median(times)
    tokens_per_step = data.micro_num * data.micro_bsz * data.seq_len
    tgs = tokens_per_step / step_s
    kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    dtype_name = config_lib.jax_dtype_name(config.model)
    peak = peak_tflops(kind, dtype_name)
    flops_per_token = causal_flops_per_token(config.model, data.seq_len)
    return dict(
        date=datetime.now().strftime("%Y-%m-%d %H:%M"),
        config=config_path,
        device_kind=kind,
        torch_version=torch.__version__,
        cudnn_version=torch.backends.cudnn.version() if device == "cuda" else None,
        attn=attn,
        compiled=compile_model,
        dtype=dtype_name,
        num_params=sum(p.numel() for p in model.parameters()),
        global_batch_tokens=tokens_per_step,
        seq_len=data.seq_len,
        steps=steps,
        warmup=warmup,
        step_seconds=times,
        step_seconds_median=step_s,
        tokens_per_second_per_device=tgs,
        first_step_seconds=first_step,
        flops_per_token_causal=flops_per_token,
        peak_tflops=peak,
        mfu=mfu(flops_per_token, tgs, peak),
        peak_memory_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None,
        final_loss=float(loss.detach()) * data.micro_num,
    )


def table(r: dict) -> str:
    """One markdown table: a header row and the measured row."""
    mfu_text = f"n/a (unknown peak for {r['device_kind']})" if r["mfu"] is None else f"{r['mfu']:.1%}"
    memory = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"
    cells = {
        "date": r["date"],
        "device": r["device_kind"],
        "torch / cuDNN": f"{r['torch_version']} / {r['cudnn_version']}",
        "config": f"`{r['config']}` ({r['dtype']})",
        "peer": f"LlamaForCausalLM, attn {r['attn']}{', torch.compile' if r['compiled'] else ''}",
        "params": f"{r['num_params'] / 1e6:.2f}M",
        "tokens/step": str(r["global_batch_tokens"]),
        "tokens/s/device": f"{r['tokens_per_second_per_device']:.1f}",
        "step time (median)": f"{r['step_seconds_median'] * 1e3:.1f} ms",
        "first step (build + compile)": f"{r['first_step_seconds']:.1f} s",
        "MFU (causal)": mfu_text,
        "peak memory": memory,
    }
    return markdown_table(cells)


def main(argv: list[str] | None = None) -> int:
    parser = timing_parser(__doc__)
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"), help="HF attention")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = parse_timing_args(parser, argv)
    try:
        config = config_lib.load(args.config, args.overrides)
        result = run(config, args.steps, args.warmup, args.attn, args.compile, args.config)
    except (config_lib.ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    report(table(result), result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
