"""`qrun eval perplexity --model M --text FILE`: a thin layer over qrun.runtime.evaluate.perplexity."""
from __future__ import annotations

import json
import sys


def cmd_perplexity(a) -> int:
    from qrun.runtime.evaluate import perplexity, read_text
    text = read_text(a.text)
    r = perplexity(a.model, text, ctx=a.ctx, max_tokens=a.max_tokens, device=a.device, progress=not a.json)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"perplexity {r['perplexity']:.4f} over {r['tokens']} tokens "
              f"(windows of {a.ctx}, {a.model} on {a.text})")
    sys.stdout.flush()
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="measure a model's quality")
    esub = p.add_subparsers(dest="eval_command", metavar="METRIC")
    esub.required = True
    q = esub.add_parser("perplexity", help="perplexity on a text file (non-overlapping windows)")
    q.add_argument("--model", required=True, help=".stcmp file")
    q.add_argument("--text", required=True, help="UTF-8 text file")
    q.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    q.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the text")
    q.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    q.add_argument("--json", action="store_true", help='print {"perplexity": float, "tokens": int}')
    q.set_defaults(func=cmd_perplexity)
