"""qrun: run block-quantized Qwen2/Llama-style LLMs from one compressed .stcmp file."""
__version__ = "0.1.0"


def load(path, device="cpu", max_seq_len=None, **kw):
    """Load a .stcmp model for generation. See qrun.runtime.loader.load."""
    from qrun.runtime.loader import load as _load
    return _load(path, device=device, max_seq_len=max_seq_len, **kw)
