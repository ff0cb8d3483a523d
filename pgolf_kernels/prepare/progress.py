"""Progress bars: tqdm when installed (it is on development machines), otherwise silent stand-ins.

The GPU machine tokenises a carried archive and may have no tqdm; preparation must not depend on it.
"""
from __future__ import annotations

import sys

__all__ = ["progress"]


class _Silent:
    def __init__(self, total=None, **_kwargs):
        self.total = total
        self.n = 0

    def update(self, amount=1):
        self.n += amount

    def set_postfix_str(self, *_args, **_kwargs):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __iter__(self):
        return iter(())


def progress(iterable=None, **kwargs):
    """tqdm(iterable, file=sys.stderr, **kwargs), or a silent bar (iterating `iterable` unchanged)."""
    kwargs.setdefault("file", sys.stderr)
    try:
        from tqdm import tqdm
    except ImportError:
        if iterable is not None:
            return iterable
        kwargs.pop("file", None)
        return _Silent(**kwargs)
    return tqdm(iterable, **kwargs) if iterable is not None else tqdm(**kwargs)
