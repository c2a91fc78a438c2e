"""`qrun tune`: a thin layer over qrun.runtime.tune.tune_decode."""
from __future__ import annotations


def cmd_tune(a) -> int:
    import qrun
    from qrun.errors import QRunError
    from qrun.runtime.loader import resolve_device
    from qrun.runtime.tune import tune_decode

    dev = resolve_device(a.device)
    if dev.type != "cuda":
        raise QRunError("qrun tune picks GPU kernel configs: it needs a CUDA device")
    # the KV cache length sets the attention's slices, which run between the GEMVs: as qrun bench's
    # --prompt-len 128 --gen-len 256 by default
    llm = qrun.load(a.model, device=str(dev), max_seq_len=a.max_seq_len or a.prompt_len + max(a.steps, 256),
                    progress=False)

    def shape(r):
        if a.quiet:
            return
        t_before = next((t for t, c in r.times_ms if c == r.before), float("nan"))
        change = "kept" if r.after == r.before else f"now {r.after} ({r.times_ms[0][0] * 1e3:.1f} us)"
        print(f"{r.name:34s} {t_before * 1e3:8.1f} us a step with {r.before}; {change}", flush=True)

    r = tune_decode(llm, prompt_len=a.prompt_len, steps=a.steps, passes=a.passes, store=not a.dry_run,
                    on_shape=shape)
    print(f"decode step {r.before_ms * 1e3:.1f} -> {r.after_ms * 1e3:.1f} us ({1e3 / r.before_ms:.1f} -> "
          f"{1e3 / r.after_ms:.1f} tok/s at positions {a.prompt_len}..{a.prompt_len + a.steps}) in "
          f"{r.seconds:.0f} s; picks {'not stored (--dry-run)' if a.dry_run else 'stored for later runs'}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="pick the decode kernels' configs by timing the whole decode step (GPU)",
                       description="Times each decode GEMV's candidate configs inside the CUDA-graph decode step "
                                   "and stores the fastest in qrun's tuning cache, which later runs on this GPU "
                                   "model use. Run once per GPU, model shape and qrun version.")
    p.add_argument("--model", required=True, help=".stcmp file")
    p.add_argument("--device", default=None, help="cuda or cuda:N (default: cuda)")
    p.add_argument("--prompt-len", type=int, default=128, help="KV cache position the timed steps start at")
    p.add_argument("--steps", type=int, default=48, help="decode steps timed per config")
    p.add_argument("--passes", type=int, default=1, help="rounds over the shapes")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache length (default prompt + 256)")
    p.add_argument("--dry-run", action="store_true", help="report, but do not store the picks")
    p.add_argument("-q", "--quiet", action="store_true", help="only the summary line")
    p.set_defaults(func=cmd_tune)
