"""Progress of evon_jax's long loops (`laplace.fit`'s passes, the prior-precision search).

A tqdm bar when standard error is a terminal and tqdm is installed; otherwise INFO records
on the ``"evon_jax"`` logger (silent unless the application configures logging, e.g.
``logging.basicConfig(level=logging.INFO)``): at the start, about every 10 %, and at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

logger = logging.getLogger("evon_jax")

T = TypeVar("T")


def _interactive() -> bool:
  try:
    return sys.stderr.isatty()
  except (AttributeError, ValueError):
    return False


def progress(items: Iterable[T], desc: str, total: Optional[int] = None) -> Iterator[T]:
  """Yields `items` while reporting how far the loop `desc` is (see the module docstring)."""
  if total is None and hasattr(items, "__len__"):
    total = len(items)
  if _interactive():
    try:
      from tqdm.auto import tqdm
    except ImportError:
      pass
    else:
      yield from tqdm(items, desc=desc, total=total, mininterval=0.5, leave=False)
      return
  start = time.perf_counter()
  every = max(1, (total or 10) // 10)
  logger.info("%s: started%s", desc, f" ({total} steps)" if total else "")
  done = 0
  for item in items:
    yield item
    done += 1
    if done % every == 0 and done != total:
      logger.info("%s: %d%s done (%.1f s)", desc, done, f"/{total}" if total else "",
                  time.perf_counter() - start)
  logger.info("%s: finished %d steps in %.1f s", desc, done, time.perf_counter() - start)
