"""PyTorch baseline for tools/bench_train.py: a transformers LlamaForCausalLM of the same shape.

    python tools/bench_train_torch.py --config 125m --seq 2048 --batch 8 [--compile]

GPU only. bf16 autocast over float32 params (the same master-weight setup as jaxlm), SDPA
attention, fused AdamW, random tokens; median step time after warmup; one JSON object out.
MFU uses the same accounting.training_flops_per_token and peak as the JAX benchmark. Not
imported by tests; needs torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv=None) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxlm import accounting
    from jaxlm.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="125m")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--remat", action="store_true", help="gradient checkpointing")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="h100", choices=sorted(accounting.DEVICES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this baseline needs a CUDA GPU", file=sys.stderr)
        return 1
    cfg = load_config(args.config).model
    hf_config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim,
        max_position_embeddings=max(cfg.max_seq_len, args.seq), rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")
    model = LlamaForCausalLM(hf_config).cuda()
    if args.remat:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    forward = torch.compile(model) if args.compile else model
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device="cuda")
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    times = []
    for i in range(args.warmup + args.repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    tokens_per_sec = args.batch * args.seq / step_time
    flops = accounting.training_flops_per_token(cfg, args.seq)
    print(json.dumps({
        "framework": "torch", "torch": torch.__version__, "config": args.config, "seq": args.seq,
        "batch": args.batch, "compile": args.compile, "remat": args.remat,
        "device": torch.cuda.get_device_name(), "step_time_median_s": step_time,
        "tokens_per_sec": tokens_per_sec,
        "mfu": accounting.mfu(tokens_per_sec, flops, 1, accounting.DEVICES[args.device].peak_flops),
        "final_loss": float(loss), "max_memory_bytes": torch.cuda.max_memory_allocated(),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
