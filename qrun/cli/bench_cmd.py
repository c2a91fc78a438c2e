"""`qrun bench`: a thin layer over qrun.runtime.bench.bench."""
from __future__ import annotations

import json


def cmd_bench(a) -> int:
    from qrun.runtime.bench import bench
    model = a.model
    if model is None:
        from qrun.runtime.demo import demo_model_path
        model = demo_model_path()
    r = bench(model, device=a.device, prompt_len=a.prompt_len, gen_len=a.gen_len, batch=a.batch, runs=a.runs,
              graph=not a.no_graph, max_seq_len=a.max_seq_len, compare_hf=a.compare == "hf",
              progress=not a.json, pipeline=not a.no_run_ahead)
    if a.json:
        print(json.dumps(r))
        return 0
    pct = f" ({r['pct_of_copy']:.0f}% of the {r['copy_gbps']:.0f} GB/s copy bandwidth)" if r["pct_of_copy"] else ""
    print(f"model        {r['model']} on {r['device']}, batch {r['batch']}, "
          f"cuda graph {'on' if r['cuda_graph'] else 'off'}")
    print(f"load         {r['load_s']:.2f} s ({r['load_gbps_compressed']:.2f} GB/s of file, "
          f"{r['load_gbps_raw']:.2f} GB/s decompressed)")
    print(f"prefill      {r['prefill_tok_s']:.0f} tok/s ({r['prompt_len']} tokens; time to first token "
          f"{r['ttft_s'] * 1e3:.1f} ms)")
    print(f"decode       {r['decode_tok_s']:.1f} tok/s ({r['gen_len']} tokens x batch {r['batch']}, "
          f"median of {a.runs} runs)")
    print(f"bandwidth    {r['achieved_gbps']:.0f} GB/s{pct}; "
          f"{r['bytes_per_token']['total'] / 1e6:.1f} MB read per decode step")
    if r["peak_gpu_bytes"]:
        print(f"peak memory  {r['peak_gpu_bytes'] / 2**30:.2f} GiB (warm-up, with the tuner's weight copies: "
              f"{r.get('peak_gpu_bytes_warmup', 0) / 2**30:.2f} GiB)")
    if "hf" in r:
        print(f"transformers {r['hf']['decode_tok_s']:.1f} tok/s decode ({r['hf']['dtype']}); qrun is "
              f"{r['speedup_vs_hf']:.2f}x")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure load time, prefill and decode speed")
    p.add_argument("--model", help=".stcmp file (default: the demo model)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (tok/s counts all)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache length (default prompt + gen)")
    p.add_argument("--no-graph", action="store_true", help="launch the decode step eagerly (no CUDA graph)")
    p.add_argument("--no-run-ahead", action="store_true",
                   help="read each token before launching the next step (the loop before run-ahead decoding)")
    p.add_argument("--compare", choices=["hf"], help="also run Hugging Face transformers on the same weights")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
