"""Progress for long work: tqdm's live bar on a terminal and in notebooks, plain log lines with the rate and the
ETA anywhere else (SLURM .out files, CI, `> log`)."""

import datetime
import logging
import sys
import time

try:  # tqdm comes with huggingface_hub (timm and accelerate need it); its notebook bars need ipywidgets
    import ipywidgets  # noqa: F401
    from tqdm.auto import tqdm
except ImportError:
    from tqdm import tqdm


class PlainProgress:
    """tqdm's interface for output that is not a terminal (SLURM .out files, CI, `> log`): a plain log line at
    the first update (unless leave=False) and then every `interval` seconds, instead of a frame per update."""

    def __init__(self, iterable=None, total=None, initial=0, desc="", disable=False, leave=True, interval=60, **_):
        self.iterable = iterable
        self.desc = desc
        self.disable = disable
        self.interval = interval
        self.postfix = {}
        self.first_line = leave  # a short-lived bar (leave=False) speaks only once it has run `interval`
        self.total = total
        if total is None and hasattr(iterable, "__len__"):
            self.total = len(iterable)
        self.n = initial
        self.initial = initial
        self.start = time.time()
        self.last = time.time()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n=1):
        self.n += n
        first = self.first_line and self.n - self.initial == n
        if self.disable or (not first and time.time() - self.last < self.interval):
            return
        self.last = time.time()
        rate = (self.n - self.initial) / max(self.last - self.start, 1e-9)
        line = f"{self.desc}: {self.n}" + (f"/{self.total} ({100 * self.n / self.total:.1f}%)" if self.total else "")
        if self.total and rate > 0:
            line += f", {rate:.2f} it/s, ETA {datetime.timedelta(seconds=round((self.total - self.n) / rate))}"
        logging.getLogger("wfas").info(line + "".join(f", {k} {v}" for k, v in self.postfix.items()))

    def set_postfix(self, **postfix):
        self.postfix = postfix

    def close(self):  # the lines stay
        pass


def progress_bar(iterable=None, **kwargs):
    """A live tqdm bar on a terminal and in notebooks; plain progress lines anywhere else."""
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    return (tqdm if interactive else PlainProgress)(iterable, **kwargs)
