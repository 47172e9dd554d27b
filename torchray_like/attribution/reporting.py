r"""What a long call tells its user while it runs: a progress bar, and warnings that point at
the user's line.

* :func:`progress_bar` — a tqdm bar that is off unless stderr is a terminal (or asked for), and
  never leaves tqdm's monitor thread running.
* :func:`warn_caller` — :func:`warnings.warn` attributed to the first frame outside this
  package, however deep inside it the warning is raised.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
import warnings
from typing import Any, Iterator, Optional

from tqdm.auto import tqdm

__all__ = ["progress_bar", "warn_caller"]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def warn_caller(message: str, category: type = UserWarning) -> None:
    """:func:`warnings.warn` pointing at the first frame outside this package (and
    :mod:`contextlib`, whose frames the package's ``with`` blocks add) — the user's line that
    called the method — however deep inside the package the warning is raised."""
    frame: Optional[types.FrameType] = sys._getframe(1)
    level = 2
    while frame is not None and (os.path.abspath(frame.f_code.co_filename).startswith(
            _PACKAGE_DIR + os.sep) or frame.f_code.co_filename == contextlib.__file__):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


class _NoBar:
    """What :func:`progress_bar` yields when the bar is off."""

    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, progress: Optional[bool], desc: str, unit: str = "it"
                 ) -> Iterator[Any]:
    """A tqdm bar with ``update(n)``, shown when ``progress`` (``None``: when stderr is a TTY).

    No tqdm object is made when the bar is off (even a disabled one starts tqdm's monitor
    thread), and a monitor thread that the bar started is stopped when the block ends, also when
    it raises.
    """
    show = progress if progress is not None else bool(getattr(sys.stderr, "isatty", None)
                                                      and sys.stderr.isatty())
    if not show:
        yield _NoBar()
        return
    had_monitor = getattr(tqdm, "monitor", None) is not None
    bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
    try:
        yield bar
    finally:
        bar.close()
        cls = type(bar)
        monitor = getattr(cls, "monitor", None)
        if not had_monitor and monitor is not None and not getattr(cls, "_instances", True):
            monitor.exit()
            cls.monitor = None
