"""A real corpus every machine has: the Python standard library's own source files.

The benchmark trains a byte-level language model (vocabulary 256, one token per
byte) on a fixed selection of top-level stdlib modules, read from
``sysconfig.get_paths()["stdlib"]`` of the interpreter that runs it. Nobody in
this project wrote these files, and no download is needed.

Selection rule (deterministic, documented so results can be reproduced):

- Two fixed, sorted tuples of module names, :data:`TRAIN_MODULES` and
  :data:`VAL_MODULES`, with no name in both: the split is **by file**, never by
  position inside a file.
- A module name resolves to ``<stdlib>/<name>.py`` or, when a later Python turned
  the module into a package (``pathlib`` in 3.13, ``zipfile`` in 3.12),
  ``<stdlib>/<name>/__init__.py``. Every name was chosen to exist on CPython
  3.10 - 3.13 (none of the modules PEP 594 removed). A name that resolves to no
  file on some other version is **skipped and listed** in :func:`manifest`, so the
  run still works and the report says what changed.
- Files are concatenated in sorted order; each split is capped at ``max_bytes``
  (the file that crosses the cap is truncated, the ones after it dropped).

The text of a module changes a little between Python versions, so losses are
comparable within one interpreter, and the manifest (files and bytes) is written
next to every result.

Batches are a pure function of ``(split, step, batch_size, seq_len, rank,
world_size, seed)``: every row of an ablation sees the same data in the same
order, and each rank a different slice of the same global batch.
"""

from __future__ import annotations

import functools
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MAX_BYTES",
    "TRAIN_MODULES",
    "VAL_MODULES",
    "VOCAB_SIZE",
    "Corpus",
    "get_batch",
    "load_corpus",
    "manifest",
]

VOCAB_SIZE = 256  # one token per byte
DEFAULT_MAX_BYTES = {"train": 2_000_000, "val": 400_000}

TRAIN_MODULES: tuple[str, ...] = tuple(
    sorted(
        (
            "argparse",
            "ast",
            "base64",
            "bdb",
            "calendar",
            "codecs",
            "configparser",
            "contextlib",
            "copy",
            "csv",
            "dataclasses",
            "datetime",
            "dis",
            "enum",
            "ftplib",
            "functools",
            "gettext",
            "gzip",
            "heapq",
            "inspect",
            "locale",
            "mailbox",
            "mimetypes",
            "ntpath",
            "optparse",
            "os",
            "pathlib",
            "pdb",
            "pickle",
            "pickletools",
            "platform",
            "pstats",
            "pydoc",
            "random",
            "shutil",
            "smtplib",
            "socket",
            "socketserver",
            "ssl",
            "string",
            "subprocess",
            "tarfile",
            "tempfile",
            "threading",
            "trace",
            "traceback",
            "typing",
            "uuid",
            "warnings",
            "weakref",
            "zipfile",
        )
    )
)
VAL_MODULES: tuple[str, ...] = tuple(
    sorted(("difflib", "fractions", "ipaddress", "pprint", "statistics", "textwrap", "tokenize"))
)
_SPLITS = {"train": TRAIN_MODULES, "val": VAL_MODULES}


@dataclass(frozen=True)
class Corpus:
    """The byte streams of both splits and where they came from.

    Attributes:
        tokens: split name -> 1-D uint8 tensor of bytes (the token ids).
        files: split name -> list of (path, bytes used) in concatenation order.
        missing: module names that resolved to no file on this Python.
        stdlib: the stdlib directory read.
    """

    tokens: dict[str, Tensor]
    files: dict[str, list[tuple[str, int]]]
    missing: list[str] = field(default_factory=list)
    stdlib: str = ""

    def get_batch(
        self,
        split: str,
        step: int,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """Inputs and next-byte targets of one rank's slice of a global batch.

        The global batch of ``world_size * batch_size`` windows is drawn from a
        generator seeded by ``(seed, split, step)`` only; rank ``k`` takes rows
        ``k * batch_size`` to ``(k + 1) * batch_size``. So all ranks together see
        the same windows whatever the rank, and repeated calls return the same
        tensors.

        Args:
            split: "train" or "val".
            step: training step (any int >= 0).
            batch_size: windows per rank.
            seq_len: tokens per window.
            rank, world_size: this rank and the number of ranks.
            seed: data-order seed.

        Returns:
            ``(x, y)``, int64 tensors of shape (batch_size, seq_len); ``y`` is ``x``
            shifted by one byte.
        """
        stream = self._stream(split, seq_len)
        if not 0 <= rank < world_size:
            raise ValueError(f"Invalid rank: {rank}; expected 0 <= rank < world_size={world_size}")
        gen = torch.Generator().manual_seed(_mix(seed, _split_id(split), step))
        starts = torch.randint(
            0, stream.numel() - seq_len, (world_size * batch_size,), generator=gen
        )
        return _windows(stream, starts[rank * batch_size : (rank + 1) * batch_size], seq_len)

    def eval_windows(
        self, split: str, n_windows: int, seq_len: int, rank: int = 0, world_size: int = 1
    ) -> tuple[Tensor, Tensor]:
        """A fixed evaluation set: ``n_windows`` windows evenly spaced over the split.

        Independent of any seed, so every row and seed is scored on the same bytes;
        rank ``k`` takes windows ``k, k + world_size, ...``.

        Args:
            split: "train" or "val".
            n_windows: windows in the whole evaluation set (all ranks).
            seq_len: tokens per window.
            rank, world_size: this rank's share.

        Returns:
            ``(x, y)`` of shape (windows of this rank, seq_len).
        """
        stream = self._stream(split, seq_len)
        last = stream.numel() - seq_len - 1
        starts = torch.linspace(0, last, n_windows).long()[rank::world_size]
        return _windows(stream, starts, seq_len)

    def _stream(self, split: str, seq_len: int) -> Tensor:
        if split not in self.tokens:
            raise ValueError(f"Invalid split: {split!r}; expected one of {sorted(self.tokens)}")
        stream = self.tokens[split]
        if stream.numel() <= seq_len + 1:
            raise ValueError(f"split {split!r} has {stream.numel()} bytes, too few for {seq_len=}")
        return stream


def _split_id(split: str) -> int:
    return {"train": 1, "val": 2}.get(split, 3)


def _mix(seed: int, split_id: int, step: int) -> int:
    """One 63-bit generator seed from (seed, split, step); no two small triples collide."""
    return ((seed * 1_000_003 + split_id) * 1_000_000_007 + step) & 0x7FFF_FFFF_FFFF_FFFF


def _windows(stream: Tensor, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    chunk = stream[idx].long()
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def resolve_module(stdlib: Path, name: str) -> Path | None:
    """``<stdlib>/<name>.py``, else ``<stdlib>/<name>/__init__.py``, else None."""
    for candidate in (stdlib / f"{name}.py", stdlib / name / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _read_split(stdlib: Path, names: tuple[str, ...], max_bytes: int, missing: list[str]):
    parts: list[bytes] = []
    files: list[tuple[str, int]] = []
    total = 0
    for name in names:
        path = resolve_module(stdlib, name)
        if path is None:
            missing.append(name)
            continue
        if total >= max_bytes:
            break
        data = path.read_bytes()[: max_bytes - total]
        parts.append(data)
        files.append((str(path.relative_to(stdlib)), len(data)))
        total += len(data)
    stream = torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
    return stream, files


@functools.lru_cache(maxsize=4)
def load_corpus(
    train_bytes: int = DEFAULT_MAX_BYTES["train"],
    val_bytes: int = DEFAULT_MAX_BYTES["val"],
    stdlib: str | None = None,
) -> Corpus:
    """Read the stdlib corpus (cached per arguments).

    Args:
        train_bytes: cap of the training split in bytes.
        val_bytes: cap of the validation split in bytes.
        stdlib: directory to read (default: this interpreter's stdlib).

    Returns:
        The :class:`Corpus`.
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    missing: list[str] = []
    tokens, files = {}, {}
    for split, cap in (("train", train_bytes), ("val", val_bytes)):
        tokens[split], files[split] = _read_split(root, _SPLITS[split], cap, missing)
        if not files[split]:
            raise FileNotFoundError(f"no {split} module of the corpus found under {root}")
    return Corpus(tokens=tokens, files=files, missing=missing, stdlib=str(root))


def get_batch(
    split: str,
    step: int,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """:meth:`Corpus.get_batch` on the default corpus (see there for the arguments)."""
    return load_corpus().get_batch(split, step, batch_size, seq_len, rank, world_size, seed)


def manifest(corpus: Corpus | None = None) -> dict:
    """Which files and how many bytes each split holds, for the report.

    Args:
        corpus: the corpus (default: the default corpus).

    Returns:
        ``{"stdlib", "python", "splits": {split: {"bytes", "files": [[path, bytes], ...]}},
        "missing"}``.
    """
    import platform

    corpus = corpus or load_corpus()
    splits = {
        split: {"bytes": sum(n for _, n in files), "files": [list(f) for f in files]}
        for split, files in corpus.files.items()
    }
    return {
        "stdlib": corpus.stdlib,
        "python": platform.python_version(),
        "splits": splits,
        "missing": list(corpus.missing),
    }
