"""`qrun generate` and `qrun chat`: thin argparse layers over qrun.load(...).stream(...).

Generated text goes to stdout as it forms (never the prompt); the progress bar and the stats line go to stderr.
"""
from __future__ import annotations

import argparse
import sys

from qrun.errors import QRunError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="a .stcmp file (default: the demo model, built on first use)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="KV cache length: prompt + reply (default: min(model limit, 4096))")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--no-graph", action="store_true", help="cuda: launch the decode step eagerly")


def _sampling_args(p: argparse.ArgumentParser, max_new: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", "-n", type=int, default=max_new)
    g.add_argument("--temperature", "-t", type=float, default=0.7, help="0 is greedy (default 0.7)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1: off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1: off)")
    g.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop before this text (repeatable)")


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt",
                       description="Stream a completion of --prompt to stdout; stats go to stderr.")
    _model_args(g)
    g.add_argument("--prompt", "-p", required=True, help='the prompt; "-" reads it from stdin')
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _sampling_args(g, 256)
    g.add_argument("--no-progress", action="store_true", help="no loading progress bar")
    g.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="Chat with the model. /reset clears the history, /exit (or Ctrl-D) quits.")
    _model_args(c)
    c.add_argument("--system", default=None, help="a system message to start every conversation with")
    _sampling_args(c, 512)
    c.add_argument("--no-progress", action="store_true", help="no loading progress bar")
    c.set_defaults(func=run_chat)


def sampling_params(args):
    from qrun.runtime.sampling import SamplingParams
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=list(args.stop)).validate()


def _load(args):
    """Checks that need no model first (device, flags), then the model."""
    from qrun.runtime.loader import load, resolve_device
    device = resolve_device(args.device)
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise QRunError(f"--max-seq-len must be at least 2, not {args.max_seq_len}")
    path = args.model
    if path is None:
        try:
            from qrun.runtime.demo import demo_model_path
        except ImportError:
            raise QRunError("no --model given and the demo model is not available in this install") from None
        path = demo_model_path(progress=not args.no_progress)
    return load(path, device=device, max_seq_len=args.max_seq_len, dtype=args.dtype,
                progress=not args.no_progress, require_tokenizer=True, graph=not args.no_graph)


def stats_line(st) -> str:
    return (f"prompt tokens: {st.prompt_tokens}, generated tokens: {st.generated_tokens}, "
            f"prefill: {st.prefill_tok_s:.1f} tok/s, decode: {st.decode_tok_s:.1f} tok/s")


def run_generate(args) -> int:
    params = sampling_params(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = _load(args)
    ids = llm.encode(prompt, chat=args.chat)
    out = sys.stdout
    ended_newline = True
    for piece in llm.stream_ids(ids, params):
        out.write(piece)
        out.flush()
        ended_newline = piece.endswith("\n")
    if out.isatty() and not ended_newline:
        out.write("\n")
    out.flush()
    print(stats_line(llm.stats), file=sys.stderr)
    return 0


def run_chat(args) -> int:
    params = sampling_params(args)
    llm = _load(args)
    if not llm.tokenizer.chat_template:
        raise QRunError("this model has no chat template, so it cannot chat; use `qrun generate`")
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        print("qrun chat: /reset clears the history, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        ids = llm.encode(messages=history)
        reply = []
        try:
            for piece in llm.stream_ids(ids, params):
                sys.stdout.write(piece)
                sys.stdout.flush()
                reply.append(piece)
        except QRunError as e:  # e.g. the history no longer fits: say so and keep the session
            history.pop()
            print(f"qrun: {e} (/reset starts over)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0
